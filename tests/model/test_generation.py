"""Cached generation against uncached full forward passes, batching, beams, sampling."""

import math

import pytest
import torch

from conftest import random_prompts
from slmctl.model import GenerationConfig


def uncached_greedy(model, prompt, steps, eos=None):
    """Step-by-step argmax over full forward passes: no cache, no shortcuts."""
    new = []
    for _ in range(steps):
        if model.config.is_encoder_decoder:
            dec = torch.tensor([[model.config.bos_token_id] + new])
            logits = model(input_ids=prompt[None], decoder_input_ids=dec).logits[0, -1]
        else:
            logits = model(input_ids=torch.cat([prompt, torch.tensor(new, dtype=torch.long)])[None]).logits[0, -1]
        new.append(int(logits.argmax()))
        if new[-1] == eos:
            break
    return new


def sequence_logprob(model, prompt, tokens):
    """Sum of log p(token) under teacher forcing."""
    tokens = torch.as_tensor(tokens)
    if model.config.is_encoder_decoder:
        dec = torch.cat([torch.tensor([model.config.bos_token_id]), tokens[:-1]])
        logits = model(input_ids=prompt[None], decoder_input_ids=dec[None]).logits[0]
    else:
        logits = model(input_ids=torch.cat([prompt, tokens[:-1]])[None]).logits[0, len(prompt) - 1:]
    return logits.log_softmax(-1).gather(1, tokens[:, None]).sum().item()


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_cached_greedy_equals_uncached_argmax(arch, request):
    model = request.getfixturevalue(arch)
    eos = model.config.eos_token_id
    _, _, rows = random_prompts([5, 11, 8], seed=4)
    for row in rows:
        expected = uncached_greedy(model, row, 24, eos=eos)
        got = model.generate(row[None], max_new_tokens=24)[0].tolist()
        assert got[:len(expected)] == expected
        assert len(expected) > 10 and len(set(expected)) > 3  # a real sequence, not an echo


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_rows_equal_running_them_alone(arch, side, request):
    model = request.getfixturevalue(arch)
    ids, mask, rows = random_prompts([3, 12, 7, 9], side=side, seed=5)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=20)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=20)[0]
        assert batched[i, :len(alone)].tolist() == alone.tolist()
        assert (batched[i, len(alone):] == model.config.pad_token_id).all()


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_beam_search(arch, request):
    model = request.getfixturevalue(arch)
    _, _, rows = random_prompts([6, 9, 4], seed=6)
    for row in rows:
        greedy = model.generate(row[None], max_new_tokens=12, min_new_tokens=12)[0]
        one_beam = model.generate(row[None], max_new_tokens=12, min_new_tokens=12, num_beams=1)[0]
        assert one_beam.tolist() == greedy.tolist()
        beams = model.generate(row[None], max_new_tokens=12, min_new_tokens=12, num_beams=4)[0]
        assert beams.numel() == 12
        assert sequence_logprob(model, row, beams) >= sequence_logprob(model, row, greedy) - 1e-4


def test_beam_search_batched_rows_equal_alone(encdec):
    ids, mask, rows = random_prompts([4, 9], seed=7)
    batched = encdec.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=3)
    for i, row in enumerate(rows):
        alone = encdec.generate(row[None], max_new_tokens=10, num_beams=3)[0]
        assert batched[i, :len(alone)].tolist() == alone.tolist()


def test_eos_stops_and_pads(encdec):
    prompt = random_prompts([6], seed=8)[2][0]
    free = encdec.generate(prompt[None], max_new_tokens=16)[0].tolist()
    stop = free[5]  # pretend the 6th token is the end-of-sequence token
    out = encdec.generate(prompt[None], max_new_tokens=16, eos_token_id=stop)[0].tolist()
    assert out == free[:free.index(stop) + 1]
    forced = encdec.generate(prompt[None], max_new_tokens=16, eos_token_id=stop, min_new_tokens=10)[0].tolist()
    assert len(forced) > 9 and stop not in forced[:10]
    ids, mask, _ = random_prompts([6, 9], seed=8)
    both = encdec.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[stop, free[2]])
    assert both.shape[1] <= 16


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_in_a_padded_batch_a_row_that_ends_stays_ended_while_the_others_go_on(arch, request):
    """EOS is a token one row emits early and another never: the first row's tokens equal its own run
    alone, then only padding (no token after its EOS leaks in); the other row runs its 20 tokens as alone."""
    model = request.getfixturevalue(arch)
    ids, mask, rows = random_prompts([5, 10], seed=9)
    free = [model.generate(row[None], max_new_tokens=20, min_new_tokens=20)[0].tolist() for row in rows]
    stop = next(t for t in free[0][2:] if t not in free[1])  # ends row 0 early; row 1 never emits it
    ended, full = (model.generate(row[None], max_new_tokens=20, eos_token_id=stop)[0].tolist() for row in rows)
    assert len(ended) < 20 and ended[-1] == stop and len(full) == 20 and stop not in full
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=stop).tolist()
    assert batched[0][:len(ended)] == ended
    assert batched[0][len(ended):] == [model.config.pad_token_id] * (20 - len(ended))
    assert batched[1] == full


def test_streamer_sees_every_token(deconly):
    ids, mask, _ = random_prompts([5, 8], seed=9)
    seen = []
    out = deconly.generate(ids, attention_mask=mask, max_new_tokens=7, streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, dim=1), out)


def test_sampling_is_seeded_and_filters(encdec):
    prompt = random_prompts([6], seed=10)[2][0][None]
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.3)
    a = encdec.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    b = encdec.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    greedy = encdec.generate(prompt, max_new_tokens=12)
    top1 = encdec.generate(prompt, generator=torch.Generator().manual_seed(2), top_k=1, **kw)
    assert torch.equal(top1, greedy)  # top-k 1 is greedy
    tiny_p = encdec.generate(prompt, generator=torch.Generator().manual_seed(3), top_p=1e-6, **kw)
    assert torch.equal(tiny_p, greedy)  # top-p keeps at least the best token


def test_repetition_penalty_discourages_repeats(deconly):
    prompt = random_prompts([5], seed=11)[2][0][None]
    plain = deconly.generate(prompt, max_new_tokens=30)[0].tolist()
    penalised = deconly.generate(prompt, max_new_tokens=30, repetition_penalty=50.0)[0].tolist()
    assert len(set(penalised)) > len(set(plain))


def test_filters_keep_what_they_promise():
    from slmctl.model.generation import apply_repetition_penalty, apply_top_k, apply_top_p

    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert torch.isinf(apply_top_k(scores, 2)).tolist() == [[False, False, True, True]]
    probs = scores.softmax(-1)[0]
    kept = ~torch.isinf(apply_top_p(scores, float(probs[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False]]
    penalised = apply_repetition_penalty(scores, torch.tensor([[0, 3]]), 2.0)
    assert penalised.tolist() == [[1.0, 1.0, 0.5, -2.0]]


def test_bad_generation_settings_are_clear(encdec):
    prompt = torch.randint(3, 512, (1, 4))
    with pytest.raises(ValueError, match="unknown generation settings: beams"):
        encdec.generate(prompt, beams=3)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        encdec.generate(prompt, max_new_tokens=0)
    with pytest.raises(ValueError, match="streaming is not available with beam search"):
        encdec.generate(prompt, num_beams=2, streamer=print)
    assert GenerationConfig().num_beams == 1 and not math.isnan(GenerationConfig().temperature)


def test_generate_leaves_training_mode_alone(encdec):
    encdec.train()
    encdec.generate(torch.randint(3, 512, (1, 4)), max_new_tokens=2)
    assert encdec.training



def exhaustive_best(model, prompt, steps, length_penalties):
    """For each length penalty, the best hypothesis among every sequence of up to `steps` tokens
    (ending at the first EOS, or `steps` long), scored as beam search scores finished hypotheses:
    sum log p / length ** length_penalty."""
    import itertools

    V, eos, bos = model.config.vocab_size, model.config.eos_token_id, model.config.bos_token_id
    every = torch.tensor(list(itertools.product(range(V), repeat=steps)))  # [V ** steps, steps]
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            decoder = torch.cat([torch.full((len(every), 1), bos), every[:, :-1]], dim=1)
            logits = model(input_ids=prompt.expand(len(every), -1), decoder_input_ids=decoder).logits
        else:
            full = torch.cat([prompt.expand(len(every), -1), every[:, :-1]], dim=1)
            logits = model(input_ids=full).logits[:, prompt.shape[1] - 1:]
    cumulative = logits.log_softmax(-1).gather(2, every[..., None])[..., 0].cumsum(dim=1).tolist()
    hypotheses = {}
    for row, tokens in enumerate(every.tolist()):
        length = tokens.index(eos) + 1 if eos in tokens else steps
        hypotheses[tuple(tokens[:length])] = cumulative[row][length - 1]
    best = {}
    for penalty in length_penalties:
        scored = sorted(((total / len(tokens) ** penalty, tokens) for tokens, total in hypotheses.items()), reverse=True)
        assert scored[0][0] - scored[1][0] > 1e-5  # a unique optimum
        best[penalty] = list(scored[0][1])
    return best


@pytest.mark.parametrize("preset", ["tiny", "deconly-tiny"])
def test_beam_search_with_enough_beams_finds_the_exhaustive_optimum(preset):
    """Over a vocabulary of 6 and 3 steps, num_beams = 6 ** 2 keeps every prefix (at most 5 * 6 live
    ones, every candidate ranks within the beams until the last step, whose best candidate is kept),
    so beam search must return the best-scoring of all sequences (for each length penalty), where
    greedy need not."""
    from conftest import randomize
    from slmctl.model import build_model

    V, steps = 6, 3
    model = randomize(build_model(preset, seed=0, vocab_size=V), seed=3).eval()
    with torch.no_grad():  # flatter distributions: near-ties, so greedy, beams and length penalties disagree
        (model.decoder.norm if model.config.is_encoder_decoder else model.norm).weight.mul_(0.15)
    g = torch.Generator().manual_seed(0)
    greedy_optimal, lengths = set(), set()
    for _ in range(3):
        prompt = torch.randint(3, V, (1, 5), generator=g)
        greedy = model.generate(prompt, max_new_tokens=steps)[0].tolist()
        for length_penalty, best in exhaustive_best(model, prompt, steps, (1.0, 0.0)).items():
            beams = model.generate(prompt, max_new_tokens=steps, num_beams=V ** (steps - 1), length_penalty=length_penalty)
            assert beams[0].tolist() == best, length_penalty
            greedy_optimal.add(greedy == best)
            lengths.add(len(best))
    assert greedy_optimal == {True, False} and lengths == {1, 3}  # greedy is not always optimal; EOS ends some
