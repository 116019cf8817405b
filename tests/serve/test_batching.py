"""Continuous batching: rows that join and leave between steps decode exactly as if alone."""

import threading
import time

import pytest
import torch
from conftest import max_logit_error

from slmctl.data.tokenizer import TextTokenizer
from slmctl.model.directory import load_model
from slmctl.runtime.generator import Generator, generate_text
from slmctl.serve.batching import TorchBatch
from slmctl.serve.engine import Engine, QueueFull, Request, held_back


def single_logits(model, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """Logits of each step of one prompt decoded alone, the decoder fed `forced`."""
    with torch.inference_mode():
        session = model.start_decoding(torch.tensor([prompt]), None, len(forced) + 1)
        steps = [session.first_logits()[0]]
        steps += [session.step(torch.tensor([t]))[0] for t in forced[:-1]]
    return torch.stack(steps)


def test_rows_joining_and_leaving_decode_as_if_alone(encdec):
    """Five prompts of different lengths through 3 slots: two join at once, others join while rows
    are mid-answer, finished rows leave (the last row moving into their slot): every row's logits
    equal its single-sequence decoding."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (7, 19, 3, 30, 11)]
    lengths = [9, 4, 12, 6, 8]  # answer lengths: rows leave at different steps
    forced = [torch.randint(5, 500, (n,), generator=g).tolist() for n in lengths]
    expected = [single_logits(encdec, p, f) for p, f in zip(prompts, forced)]
    got = join_and_leave(TorchBatch(encdec, slots=3, capacity=13), prompts, forced, encdec.config.bos_token_id)
    for i in range(5):
        assert max_logit_error(got[i], expected[i]) < 1e-5, f"prompt {i}"


def join_and_leave(batch, prompts, forced, bos: int) -> dict:
    """Drive `batch` through five prompts in 3 slots: two join at once, the others one at a time every
    third step while rows are mid-answer, each leaves after its own number of steps -> logits per prompt."""
    lengths = [len(f) for f in forced]
    rows, got, waiting, step = [], {i: [] for i in range(len(prompts))}, list(range(len(prompts))), 0
    while waiting or rows:
        joining = waiting[:2] if step == 0 else waiting[:min(1, batch.slots - len(rows))]
        if joining and (step == 0 or step % 3 == 0):
            batch.join([prompts[i] for i in joining])
            rows += joining
            waiting = waiting[len(joining):]
        tokens = torch.tensor([forced[i][len(got[i]) - 1] if got[i] else bos for i in rows])
        logits = batch.step(tokens)
        for r, i in enumerate(rows):
            got[i].append(logits[r])
        for r in sorted((r for r, i in enumerate(rows) if len(got[i]) == lengths[i]), reverse=True):
            moved, last = batch.leave(r), rows.pop()
            if moved is not None:
                rows[r] = last
        step += 1
    assert batch.active == 0
    return {i: torch.stack(steps) for i, steps in got.items()}


@pytest.mark.parametrize("cache", ["in_place", "grow"])
def test_on_onnx_runtime_rows_joining_and_leaving_decode_as_if_alone(tmp_path, tiny_model_dir, cache):
    """The same on an export: the decoder graph's per-row positions let rows of different lengths share a
    call, whether it writes its cache buffers in place (GroupQueryAttention) or returns them grown."""
    from conftest import cli, newest_run

    from slmctl.runtime.generator import load_generator
    from slmctl.serve.onnx_batching import OnnxBatch

    result = cli("export", "onnx", tiny_model_dir, f"cache={cache}", "validation.prompt_lens=[5,19]", "validation.steps=6",
                 "validation.tolerance=1e-2", runs=tmp_path)
    assert result.exit_code == 0, result.output
    lm = load_generator(newest_run(tmp_path, "export")).model
    assert lm.in_place == (cache == "in_place")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (7, 19, 3, 30, 11)]
    forced = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (9, 4, 12, 6, 8)]
    expected = [single_logits(lm, p, f) for p, f in zip(prompts, forced)]
    got = join_and_leave(OnnxBatch(lm, slots=3, capacity=13), prompts, forced, lm.config.bos_token_id)
    for i in range(5):
        assert max_logit_error(got[i], expected[i]) < 1e-5, f"prompt {i}"


def test_a_batch_refuses_more_rows_than_slots(encdec):
    batch = TorchBatch(encdec, slots=2, capacity=4)
    batch.join([[5, 6], [7]])
    with pytest.raises(RuntimeError, match="slots"):
        batch.join([[8]])


def test_stop_strings_hold_back_only_what_could_still_match():
    assert held_back("The answer is Par", ("Paris",)) == 3
    assert held_back("The answer is X", ("Paris",)) == 0
    assert held_back("abc\n", ("\n\n", "c\nq")) == 2


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    return Generator(model, TextTokenizer.load(tiny_model_dir), "encdec", tiny_model_dir)


def collect(engine, **settings):
    """Submit a request; returns (request, events list, done Event)."""
    events, done = [], threading.Event()

    def on_event(event):
        events.append(event)
        if event["type"] == "done":
            done.set()

    request = Request(on_event=on_event, **settings)
    engine.submit(request)
    return request, events, done


def text_of(events):
    return "".join(e["text"] for e in events if e["type"] == "text")


PROMPTS = ["Where does Ana live?", "What is the job of the person who lives in Oslo? Answer briefly.", "Who?",
           "Name the city of the teacher and the colour of the car that Bo owns."]


def test_concurrent_requests_get_what_each_would_get_alone(generator):
    """Greedy answers of requests decoded together (joining at different times) equal `generate_text`
    of each prompt alone, with finish reason and usage counts."""
    tokenizer = generator.tokenizer
    alone = [generate_text(generator, p, max_new_tokens=n) for p, n in zip(PROMPTS, (12, 20, 7, 16))]
    engine = Engine(TorchBatch(generator.model, slots=3, capacity=21), tokenizer, [tokenizer.eos_id],
                    generator.model.config.bos_token_id).start()
    try:
        submitted = []
        for prompt, n in zip(PROMPTS, (12, 20, 7, 16)):
            submitted.append(collect(engine, prompt=tokenizer.encode(prompt), max_tokens=n))
        for (request, events, done), expected, n in zip(submitted, alone, (12, 20, 7, 16)):
            assert done.wait(30)
            assert text_of(events) == expected
            final = events[-1]
            assert final["finish_reason"] in ("stop", "length")
            assert final["completion_tokens"] == len(request.tokens) <= n
            assert final["prompt_tokens"] == len(request.prompt)
    finally:
        engine.stop(5)


def test_a_stop_string_ends_the_answer_before_it(generator):
    tokenizer = generator.tokenizer
    full = generate_text(generator, PROMPTS[1], max_new_tokens=20)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop and stop in full
    engine = Engine(TorchBatch(generator.model, slots=2, capacity=21), tokenizer, [tokenizer.eos_id],
                    generator.model.config.bos_token_id).start()
    try:
        _, events, done = collect(engine, prompt=tokenizer.encode(PROMPTS[1]), max_tokens=20, stop=(stop,))
        assert done.wait(30)
        assert text_of(events) == full[:full.index(stop)]
        assert events[-1]["finish_reason"] == "stop"
    finally:
        engine.stop(5)


def test_a_cancelled_request_frees_its_slot_and_a_full_queue_refuses(generator):
    """One slot, one waiting place: a third request is refused; cancelling the running one lets the
    waiting one through."""
    tokenizer = generator.tokenizer
    engine = Engine(TorchBatch(generator.model, slots=1, capacity=257), tokenizer, eos_ids=[-1],  # never stops early
                    bos_id=generator.model.config.bos_token_id, max_queue=1)
    gate = threading.Event()
    step = engine.batch.step

    def slow_step(tokens):  # hold the first request in its slot until the test has looked
        gate.wait(10)
        return step(tokens)

    engine.batch.step = slow_step
    engine.start()
    try:
        first, first_events, first_done = collect(engine, prompt=tokenizer.encode("a"), max_tokens=256)
        while engine.active == 0:
            time.sleep(0.01)
        second, _, second_done = collect(engine, prompt=tokenizer.encode("b"), max_tokens=3)
        with pytest.raises(QueueFull):
            collect(engine, prompt=tokenizer.encode("c"), max_tokens=3)
        engine.cancel(first)
        gate.set()
        assert first_done.wait(30) and second_done.wait(30)
        assert first_events[-1]["finish_reason"] == "cancelled" and len(first.tokens) < 256
        assert len(second.tokens) == 3
    finally:
        gate.set()
        engine.stop(5)


def test_a_prompt_the_model_cannot_take_fails_its_request_not_the_server(generator):
    tokenizer = generator.tokenizer
    batch = TorchBatch(generator.model, slots=2, capacity=9)
    join = batch.join

    def picky_join(prompts=None, embeds=None):
        if prompts and any(len(p) > 30 for p in prompts):
            raise RuntimeError("prompt too long for this test")
        return join(prompts=prompts, embeds=embeds)

    batch.join = picky_join
    engine = Engine(batch, tokenizer, [tokenizer.eos_id], generator.model.config.bos_token_id).start()
    try:
        _, failed_events, failed = collect(engine, prompt=list(range(5, 45)), max_tokens=4)
        assert failed.wait(30) and failed_events[-1]["finish_reason"] == "error"
        assert "prompt too long" in failed_events[-1]["message"]
        _, events, done = collect(engine, prompt=tokenizer.encode(PROMPTS[0]), max_tokens=8)
        assert done.wait(30) and text_of(events) == generate_text(generator, PROMPTS[0], max_new_tokens=8)
        assert engine.failure is None
    finally:
        engine.stop(5)


def held_engine(generator, slots: int = 4):
    """An engine whose loop waits at its first step until `gate` is set, so requests join in one group."""
    tokenizer = generator.tokenizer
    engine = Engine(TorchBatch(generator.model, slots=slots, capacity=17), tokenizer, [tokenizer.eos_id],
                    generator.model.config.bos_token_id)
    gate, join = threading.Event(), engine._join

    def held_join(requests):
        gate.wait(10)
        return join(requests)

    engine._join = held_join
    return engine.start(), gate


def test_bad_requests_among_good_ones_end_alone_and_the_engine_goes_on(generator):
    """A seed the generator cannot take and a prompt the model cannot encode, admitted in one group
    with good requests: those two end with an error, the good ones get what they would get alone."""
    tokenizer = generator.tokenizer
    engine, gate = held_engine(generator)
    join = engine.batch.join

    def picky_join(prompts=None, embeds=None):
        if prompts and any(p and p[0] == 4 for p in prompts):  # this test's unencodable prompt starts with id 4
            raise ValueError("this prompt cannot be encoded")
        return join(prompts=prompts, embeds=embeds)

    engine.batch.join = picky_join
    try:
        good = [collect(engine, prompt=tokenizer.encode(p), max_tokens=8) for p in PROMPTS[:2]]
        bad_seed = collect(engine, prompt=tokenizer.encode(PROMPTS[2]), max_tokens=8, temperature=0.7, seed=2 ** 64)
        bad_prompt = collect(engine, prompt=[4, 5, 6], max_tokens=8)
        gate.set()
        for (_, events, done), prompt in zip(good, PROMPTS[:2]):
            assert done.wait(30) and text_of(events) == generate_text(generator, prompt, max_new_tokens=8)
        for (_, events, done), why in ((bad_seed, "seed"), (bad_prompt, "cannot be encoded")):
            assert done.wait(30) and events[-1]["finish_reason"] == "error" and why in events[-1]["message"]
        _, events, done = collect(engine, prompt=tokenizer.encode(PROMPTS[3]), max_tokens=8)
        assert done.wait(30) and text_of(events) == generate_text(generator, PROMPTS[3], max_new_tokens=8)
        assert engine.failure is None
    finally:
        gate.set()
        engine.stop(5)


def test_nan_logits_in_one_row_end_that_request_and_a_failed_step_only_the_requests_in_it(generator):
    tokenizer = generator.tokenizer
    engine, gate = held_engine(generator)
    verify, calls = engine.batch.verify, []

    def faulty_verify(tokens):
        logits = verify(tokens)
        calls.append(len(calls))
        if len(calls) == 3:  # row 1's logits turn to NaN at the third step
            logits[1] = float("nan")
        if len(calls) == 6:
            raise RuntimeError("a step that fails for no request's fault")
        return logits

    engine.batch.verify = faulty_verify
    try:
        submitted = [collect(engine, prompt=tokenizer.encode(p), max_tokens=16, ignore_eos=True) for p in PROMPTS[:3]]
        gate.set()
        for _, _, done in submitted:
            assert done.wait(30)
        reasons = [events[-1]["finish_reason"] for _, events, _ in submitted]
        assert reasons == ["error", "error", "error"]
        assert "not finite" in submitted[1][1][-1]["message"] and len(submitted[1][0].tokens) == 2
        assert all("fails for no request" in events[-1]["message"] for _, events, _ in (submitted[0], submitted[2]))
        _, events, done = collect(engine, prompt=tokenizer.encode(PROMPTS[0]), max_tokens=8)  # the engine serves on
        assert done.wait(30) and text_of(events) == generate_text(generator, PROMPTS[0], max_new_tokens=8)
        assert engine.failure is None and engine.active == 0
    finally:
        gate.set()
        engine.stop(5)


@pytest.fixture(scope="module")
def echo_dir(tiny_model_dir, tmp_path_factory):
    """The tiny preset's initial weights with the tiny model's tokenizer: an untrained model that echoes its
    input, so its answers copy the prompt and drafts from the prompt are kept (at rates that differ by prompt)."""
    from slmctl.model import build_model
    from slmctl.model.config import vocab_size_for
    from slmctl.model.store import save_model

    tokenizer = TextTokenizer.load(tiny_model_dir)
    model = build_model("tiny", seed=0, vocab_size=vocab_size_for(len(tokenizer)), **tokenizer.special_ids)
    return save_model(model, tmp_path_factory.mktemp("echo") / "model", tokenizer)


def four_requests(engine, tokenizer) -> list:
    """Start `engine`, submit the four PROMPTS (12, 20, 7 and 16 tokens, EOS ignored), wait for all, stop
    it -> [(request, events, done)]."""
    engine.start()
    try:
        submitted = [collect(engine, prompt=tokenizer.encode(p), max_tokens=n, ignore_eos=True)
                     for p, n in zip(PROMPTS, (12, 20, 7, 16))]
        for _, _, done in submitted:
            assert done.wait(60)
    finally:
        engine.stop(5)
    return submitted


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_drafted_serving_gives_each_request_its_plain_tokens_at_its_own_rate(echo_dir, tmp_path, runtime):
    """Requests decoded together with drafts from their own prompts: each gets the tokens it gets without
    drafts, each keeps drafts at its own rate, the cache of each row cut back to what it kept; the metrics
    count drafted and kept tokens."""
    from conftest import cli, newest_run

    from slmctl.model.drafting import PromptLookup
    from slmctl.runtime.generator import load_generator
    from slmctl.serve.metrics import ServerMetrics
    from slmctl.serve.stage import open_batch

    source = echo_dir
    if runtime == "onnx":
        assert cli("export", "onnx", echo_dir, "validation.prompt_lens=[5]", "validation.steps=4", runs=tmp_path).exit_code == 0
        source = newest_run(tmp_path, "export")
    generator = load_generator(source, runs_dir=tmp_path)
    tokenizer, bos = generator.tokenizer, generator.model.config.bos_token_id
    answers = {}
    for name, drafter in (("plain", None), ("drafted", PromptLookup(max_tokens=4))):
        metrics = ServerMetrics()
        submitted = four_requests(Engine(open_batch(generator, 3, 32), tokenizer, [tokenizer.eos_id], bos, metrics=metrics,
                                         drafter=drafter), tokenizer)
        answers[name] = [request.tokens for request, _, _ in submitted]
        finals = [events[-1] for _, events, _ in submitted]
        if drafter is not None:
            kept = [f["accepted_tokens"] for f in finals]
            assert all(f["drafted_tokens"] > 0 for f in finals) and sum(kept) > 0 and len(set(kept)) > 1
            snapshot = metrics.snapshot()
            assert snapshot["slmctl_draft_accepted_total"] == sum(kept)
            assert snapshot["slmctl_draft_tokens_total"] == sum(f["drafted_tokens"] for f in finals)
    assert answers["drafted"] == answers["plain"]


def test_a_draft_model_serves_row_for_row_and_changes_no_token(echo_dir, tiny_model_dir, tmp_path):
    """`--draft MODEL`: a draft model's own batch follows the served rows (four requests through three
    slots: rows join mid-answer and leave, the last moving into their place). The model drafting for
    itself keeps nearly every draft; an untrained draft model with the same tokenizer, exported (drafting
    on ONNX Runtime), keeps fewer; the tokens are the plain ones either way."""
    from conftest import cli, newest_run

    from slmctl.runtime.generator import load_generator
    from slmctl.serve.draft_batch import DraftBatch
    from slmctl.serve.stage import open_batch

    generator = load_generator(tiny_model_dir, runs_dir=tmp_path)
    tokenizer, bos = generator.tokenizer, generator.model.config.bos_token_id
    assert cli("export", "onnx", echo_dir, "validation.prompt_lens=[5]", "validation.steps=4", runs=tmp_path).exit_code == 0
    onnx_echo = newest_run(tmp_path, "export")
    answers, rates = {}, {}
    for name, source in (("plain", None), ("self", tiny_model_dir), ("echo", onnx_echo)):
        drafter = None
        if source is not None:
            drafter = DraftBatch(open_batch(load_generator(source, runs_dir=tmp_path), 3, 32 + 4), 4, f"model {name}", bos,
                                 tokenizer.eos_id)
        submitted = four_requests(Engine(open_batch(generator, 3, 32), tokenizer, [tokenizer.eos_id], bos, drafter=drafter),
                                  tokenizer)
        answers[name] = [request.tokens for request, _, _ in submitted]
        if drafter is not None:
            finals = [events[-1] for _, events, _ in submitted]
            rates[name] = sum(f["accepted_tokens"] for f in finals) / sum(f["drafted_tokens"] for f in finals)
            assert not drafter.seen and drafter.batch.active == 0  # every row left both batches
    assert answers["self"] == answers["plain"] and answers["echo"] == answers["plain"]
    assert rates["self"] >= 0.9 and rates["echo"] < rates["self"]


def test_a_served_draft_model_stops_drafting_once_every_row_drafted_eos(tiny_model_dir, tmp_path):
    from slmctl.runtime.generator import load_generator
    from slmctl.serve.draft_batch import DraftBatch
    from slmctl.serve.stage import open_batch

    generator = load_generator(tiny_model_dir, runs_dir=tmp_path)
    bos = generator.model.config.bos_token_id
    anna, porto = generator.tokenizer.encode("Who is Anna?"), generator.tokenizer.encode("Where is Porto?")

    def drafts(prompts, eos):
        drafter = DraftBatch(open_batch(generator, 2, 40), 8, "model itself", bos, eos)
        drafter.join(prompts)
        return drafter.drafts([[], []], [8, 8])

    full = drafts([anna, porto], eos=-1)  # no token is EOS: 8 each
    assert [len(row) for row in full] == [8, 8]
    eos = full[0][2]
    if eos not in full[1]:  # one row still drafting: every row goes on
        assert [len(row) for row in drafts([anna, porto], eos)] == [8, 8]
    both = drafts([anna, anna], eos)  # both rows drafted it at the same place: drafting stopped there
    assert [len(row) for row in both] == [full[0].index(eos) + 1] * 2
