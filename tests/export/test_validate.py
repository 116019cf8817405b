"""The export's validation gate: logits within tolerance are not enough, greedy tokens must agree too."""

from slmctl.export.validate import validate


class FlippedAt:
    """A candidate runtime that computes what the model computes, except that at decoding step `step` it
    raises the runner-up logit of row 0 just past the top one (a flip far inside a loose tolerance)."""

    def __init__(self, model, step: int):
        self.model, self.step = model, step

    def start_decoding(self, input_ids, attention_mask, steps):
        session, flip_at = self.model.start_decoding(input_ids, attention_mask, steps), self.step
        calls = iter(range(steps))

        def flipped(logits):
            logits = logits.clone()
            if next(calls) == flip_at:
                top2 = logits[0].topk(2)
                logits[0, top2.indices[1]] = top2.values[0] + 1e-3
            return logits

        class Session:
            def first_logits(self):
                return flipped(session.first_logits())

            def step(self, tokens):
                return flipped(session.step(tokens))

        return Session()


def test_validation_fails_when_greedy_tokens_diverge_though_the_logits_are_within_tolerance(encdec):
    report = validate(encdec, FlippedAt(encdec, step=3), prompt_lens=[7], steps=8, batch=2, tolerance=1e3, seed=0)
    assert report["max_abs_logit_diff"] <= report["tolerance"]  # the logits pass
    assert not report["greedy_identical"] and report["cases"][0]["first_divergence"] == 3
    assert not report["passed"]
    same = validate(encdec, FlippedAt(encdec, step=99), prompt_lens=[7], steps=8, batch=2, tolerance=1e3, seed=0)
    assert same["passed"] and same["max_abs_logit_diff"] == 0.0
