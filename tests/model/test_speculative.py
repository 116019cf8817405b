"""Drafted decoding (slmctl.model.drafting, generation's speculative loop): the same tokens as plain
decoding, the cache cut back past a rejected draft, drafts clipped to the room left, EOS inside an
accepted draft, and sampling that keeps plain sampling's distribution."""

import math

import pytest
import torch

from conftest import Scripted, randomize, random_prompts
from slmctl.model import build_model
from slmctl.model.drafting import PromptLookup


@pytest.fixture(scope="module")
def model():
    return randomize(build_model("tiny", seed=0), seed=1).eval()


@pytest.mark.parametrize("penalty", [1.3, 1.0])  # 1.0: greedy's one-argmax walk; 1.3: the walk token by token
def test_drafted_greedy_gives_plain_greedys_tokens_alone_and_in_a_padded_batch(model, penalty):
    ids, mask, rows = random_prompts([9, 4, 7], vocab=model.config.vocab_size, seed=2, side="left")
    settings = {"max_new_tokens": 24, "min_new_tokens": 20, "repetition_penalty": penalty}
    plain = model.generate(ids, attention_mask=mask, **settings)
    drafter = Scripted(plain, wrong=3)  # two right, one wrong: accepting, rejecting mid-draft, cutting back
    assert torch.equal(model.generate(ids, attention_mask=mask, drafter=drafter, **settings), plain)
    assert 0 < drafter.stats.accepted < drafter.stats.drafted
    for b, row in enumerate(rows):
        alone = model.generate(row[None], **settings)
        assert torch.equal(model.generate(row[None], drafter=Scripted(alone, wrong=4), **settings), alone)
        assert torch.equal(alone[0], plain[b, :alone.shape[1]])


def test_prompt_lookup_is_accepted_where_the_output_repeats_and_changes_nothing():
    echo = build_model("tiny", seed=0).eval()  # the training init repeats a few tokens: output that copies itself
    ids, mask, _ = random_prompts([12, 8], vocab=echo.config.vocab_size, seed=4)
    settings = {"max_new_tokens": 30, "min_new_tokens": 30}
    drafter = PromptLookup(max_tokens=6)
    assert torch.equal(echo.generate(ids, attention_mask=mask, drafter=drafter, **settings),
                       echo.generate(ids, attention_mask=mask, **settings))
    assert drafter.stats.accepted > 0.8 * drafter.stats.drafted and drafter.stats.accepted_per_pass >= 2


def test_prompt_lookup_drafts_what_followed_the_longest_most_recent_match():
    lookup = PromptLookup(ngram=3)
    source = [5, 1, 2, 3, 9, 9, 7, 2, 3, 8, 8, 8]
    assert lookup.row_draft(source, [4, 1, 2, 3], 2) == [9, 9]  # 1 2 3 occurs once: not the later 2 3
    assert lookup.row_draft(source, [4, 6, 2, 3], 2) == [8, 8]  # only 2 3 occurs: its most recent occurrence
    assert lookup.row_draft(source, [2, 3, 6, 6, 2, 3], 2) == [6, 6]  # the output's own text before the source
    assert lookup.row_draft([1, 2, 7, 1, 2, 6], [1, 2], 3) == [7, 1, 2]  # the recent one has too few tokens after
    assert lookup.row_draft([7, 5], [6, 5], 2) == []  # nothing follows the source's last token: no match across


def test_a_rejection_mid_draft_cuts_the_cache_back_to_the_last_kept_token(model):
    prompt = random_prompts([6], vocab=model.config.vocab_size, seed=5)[0]
    plain = model.start_decoding(prompt, None, 8)
    tokens = [int(plain.first_logits().argmax())]
    expected = []
    for _ in range(3):
        logits = plain.step(torch.tensor(tokens[-1:]))
        expected.append(logits)
        tokens.append(int(logits.argmax()))
    drafted = model.start_decoding(prompt, None, 8)
    drafted.first_logits()
    wrong = (tokens[2] + 1) % model.config.vocab_size
    verified = drafted.verify(torch.tensor([[tokens[0], tokens[1], wrong, 7]]))  # 4 positions fed, the 3rd drafted token wrong
    torch.testing.assert_close(verified[0, :2], torch.cat(expected[:2]))  # the right drafts' logits are the steps'
    assert drafted.cached == 5
    drafted.cut(3)  # keep BOS, tokens[0], tokens[1]: drop the wrong draft and what followed it
    torch.testing.assert_close(drafted.step(torch.tensor([tokens[2]])), expected[2])


def test_a_draft_longer_than_the_room_left_is_clipped(model):
    prompt = random_prompts([5], vocab=model.config.vocab_size, seed=6)[0]
    settings = {"max_new_tokens": 7, "min_new_tokens": 7}
    plain = model.generate(prompt, max_new_tokens=40, min_new_tokens=40)
    drafter = Scripted(plain, ignore_limit=True)  # 40 tokens every pass: more than the cache holds
    out = model.generate(prompt, drafter=drafter, **settings)
    assert torch.equal(out, plain[:, :7])
    assert drafter.kept == [5]  # the prompt's pass gives the 1st token; one pass: 5 drafted kept, the 7th its own


def test_eos_inside_an_accepted_draft_ends_the_row_there(model):
    ids, mask, rows = random_prompts([6, 9], vocab=model.config.vocab_size, seed=7)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12)
    at = next(i for i in range(3, 12) if int(free[0, i]) not in free[0, :i].tolist())
    eos = int(free[0, at])  # row 0 says it first at `at` (row 1 maybe elsewhere, maybe never)
    settings = {"max_new_tokens": 12, "eos_token_id": eos}
    plain = model.generate(ids, attention_mask=mask, **settings)
    assert int(plain[0, at]) == eos and (plain[0, at + 1:] == model.config.pad_token_id).all()
    drafter = Scripted(torch.cat([free, free], dim=1))  # the whole continuation, EOS inside and tokens after it
    assert torch.equal(model.generate(ids, attention_mask=mask, drafter=drafter, **settings), plain)
    alone = model.generate(rows[0][None], **settings)  # one row: generation ends at its EOS, nothing after it
    assert alone.shape[1] == at + 1
    assert torch.equal(model.generate(rows[0][None], drafter=Scripted(free[:1].repeat(1, 2)), **settings), alone)
    held = {**settings, "min_new_tokens": at + 2}  # EOS is not allowed at `at`, inside the draft too
    plain = model.generate(ids, attention_mask=mask, **held)
    assert int(plain[0, at]) != eos
    assert torch.equal(model.generate(ids, attention_mask=mask, drafter=Scripted(torch.cat([free, free], dim=1)), **held), plain)


def chi_square_quantile(df: int, z: float = 3.72) -> float:
    """The chi-square distribution's (1 - 1e-4) quantile (Wilson-Hilferty; z is the normal's)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_drafted_sampling_keeps_plain_samplings_distribution(model):
    """Speculative sampling's rule keeps a draft with its probability and otherwise samples the rest:
    the joint distribution of three sampled tokens must not tell the two apart (two-sample
    chi-square at p = 1e-4 over the 27 cells of {182, 308, any other}^3, 600 samples each)."""
    prompt = random_prompts([6], vocab=model.config.vocab_size, seed=3)[0]
    settings = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": True, "temperature": 1.0}
    plain = model.generate(prompt.repeat(600, 1), generator=torch.Generator().manual_seed(0), **settings)
    generator, drafter = torch.Generator().manual_seed(1), Scripted(torch.full((2, 4), 182))
    # 2 rows a call: both keep a draft often enough that passes keep one, two or three drafted tokens
    drafted = torch.cat([model.generate(prompt.repeat(2, 1), generator=generator, drafter=drafter, **settings)
                         for _ in range(300)])
    assert {0, 1, 2} <= set(drafter.kept)

    def cells(out):
        coarse = torch.where(out[:, 1:] == 182, 0, torch.where(out[:, 1:] == 308, 1, 2))
        return torch.bincount(coarse[:, 0] * 9 + coarse[:, 1] * 3 + coarse[:, 2], minlength=27).double()

    a, b = cells(plain), cells(drafted)
    seen = (a + b) > 0
    statistic = float(((a - b) ** 2 / (a + b))[seen].sum())
    assert statistic < chi_square_quantile(int(seen.sum()) - 1), statistic


def test_a_model_drafting_for_itself_keeps_its_drafts_and_another_model_changes_nothing(model):
    """The machinery check: a model drafting for itself keeps >= 0.9 of its drafts; a draft model that
    disagrees costs passes but never changes a token (padded batch, its own cache cut back each pass)."""
    from slmctl.model.drafting import DraftModel

    ids, mask, _ = random_prompts([9, 4, 7], vocab=model.config.vocab_size, seed=2, side="left")
    settings = {"max_new_tokens": 24, "min_new_tokens": 20}
    plain = model.generate(ids, attention_mask=mask, **settings)
    itself = DraftModel(model, max_tokens=4)
    assert torch.equal(model.generate(ids, attention_mask=mask, drafter=itself, **settings), plain)
    assert itself.stats.accepted >= 0.9 * itself.stats.drafted > 0
    other = DraftModel(randomize(build_model("tiny", seed=0), seed=5).eval(), max_tokens=4)
    assert torch.equal(model.generate(ids, attention_mask=mask, drafter=other, **settings), plain)
    assert other.stats.passes > 0


def test_a_draft_model_stops_drafting_at_its_eos(model):
    """Past a drafted EOS nothing is ever kept, so the draft model drafts no further (each draft costs it a step)."""
    from slmctl.model.drafting import DraftModel

    ids, _, _ = random_prompts([9], vocab=model.config.vocab_size, seed=3)
    generated, finished = ids[:, :1], torch.zeros(1, dtype=torch.bool)

    def drafts(eos_id):
        drafter = DraftModel(model, max_tokens=8)
        drafter.eos_id = eos_id
        drafter.start(ids, None, max_new_tokens=24)
        return drafter.propose(generated, finished, limit=8)[0].tolist()

    full = drafts(eos_id=-1)  # no token is EOS: all 8
    assert len(full) == 8
    eos = full[3]
    assert drafts(eos_id=eos) == full[:full.index(eos) + 1]  # up to and with the first EOS drafted
