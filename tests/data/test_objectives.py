"""Training objectives, collation and packing, checked by decoding toy token ids."""

import random

import pytest
import torch

from slmctl.data.objectives import (
    OBJECTIVES,
    SpecialIds,
    causal_lm,
    collate_causal,
    collate_seq2seq,
    prefix_lm,
    random_spans_noise_mask,
    seq2seq,
    span_corruption,
)
from slmctl.model import build_model

# The tiny models' special ids (pad 0, bos 1, eos 2) and 100 sentinels at the top of
# their 512-token vocabulary, counting down as T5's <extra_id_i> do.
SPECIAL = SpecialIds(pad=0, bos=1, eos=2, sentinels=[511 - i for i in range(100)])
FIRST_WORD = 10
VOCAB = {FIRST_WORD + i: f"w{i}" for i in range(400)}
NAMES = {0: "<pad>", 1: "<s>", 2: "</s>", **{s: f"<extra_id_{i}>" for i, s in enumerate(SPECIAL.sentinels)}}


def decode(ids):
    return [VOCAB.get(i) or NAMES[i] for i in ids]


def text(n, seed=0):
    """n random word ids."""
    rng = random.Random(seed)
    return [rng.randrange(FIRST_WORD, FIRST_WORD + len(VOCAB)) for _ in range(n)]


def uncorrupt(source, target):
    """Put each span of the target back in place of its sentinel in the source."""
    spans, current = {}, None
    assert target[-1] == "</s>"
    for word in target[:-1]:
        if word.startswith("<extra_id_"):
            current = word
            spans[current] = []
        else:
            spans[current].append(word)
    out = []
    for word in source:
        out.extend(spans.pop(word) if word.startswith("<extra_id_") else [word])
    assert not spans, "target has spans the source does not mention"
    return out


# ---------------------------------------------------------------------------
# prefix_lm


def test_prefix_lm_reconstructs_the_text():
    ids = text(50)
    for seed in range(20):
        source, target = prefix_lm(ids, random.Random(seed), SPECIAL, max_source=100, max_target=100)
        assert target[-1] == SPECIAL.eos
        assert decode(source + target[:-1]) == decode(ids)
        assert 10 <= len(source) <= 40  # 0.2 .. 0.8 of 50 tokens


def test_prefix_lm_split_is_random_and_deterministic():
    ids = text(100)
    splits = {len(prefix_lm(ids, random.Random(seed), SPECIAL, 200, 200)[0]) for seed in range(200)}
    assert min(splits) == 20 and max(splits) == 80 and len(splits) > 40
    a = prefix_lm(ids, random.Random(7), SPECIAL, 200, 200)
    b = prefix_lm(ids, random.Random(7), SPECIAL, 200, 200)
    assert a == b


def test_prefix_lm_truncates_source_from_left_and_target_from_right():
    ids = text(100)
    source, target = prefix_lm(ids, random.Random(0), SPECIAL, max_source=5, max_target=4,
                               min_prefix_frac=0.5, max_prefix_frac=0.5)
    assert source == ids[45:50]  # the 5 tokens just before the split
    assert target == ids[50:53] + [SPECIAL.eos]


def test_prefix_lm_short_texts():
    source, target = prefix_lm(text(2), random.Random(0), SPECIAL, 10, 10)
    assert len(source) == 1 and len(target) == 2
    for n in range(3, 12):  # a split always leaves a token on each side
        for seed in range(10):
            source, target = prefix_lm(text(n), random.Random(seed), SPECIAL, 50, 50)
            assert source and len(target) >= 2
    with pytest.raises(ValueError, match="at least 2 tokens"):
        prefix_lm(text(1), random.Random(0), SPECIAL, 10, 10)
    with pytest.raises(ValueError, match="min_prefix_frac"):
        prefix_lm(text(10), random.Random(0), SPECIAL, 10, 10, min_prefix_frac=0.9, max_prefix_frac=0.1)


# ---------------------------------------------------------------------------
# span_corruption


def test_span_corruption_interleaves_back_into_the_text():
    ids = text(200)
    for seed in range(20):
        source, target = span_corruption(ids, random.Random(seed), SPECIAL, max_source=512, max_target=512)
        assert uncorrupt(decode(source), decode(target)) == decode(ids)
        # sentinels are used in order, each once, in both source and target
        used = [i for i in source if i in SPECIAL.sentinels]
        assert used == SPECIAL.sentinels[: len(used)]
        assert [i for i in target if i in SPECIAL.sentinels] == used


def test_span_corruption_matches_t5_statistics():
    rng = random.Random(0)
    noise = total = spans = 0
    lengths = []
    for n in (57, 100, 128, 233, 512):
        for _ in range(40):
            source, target = span_corruption(text(n, seed=rng.random()), rng, SPECIAL, max_source=600, max_target=600)
            n_spans = sum(i in SPECIAL.sentinels for i in source)
            n_noise = len(target) - n_spans - 1
            noise, total, spans = noise + n_noise, total + n, spans + n_spans
            assert n_noise == round(0.15 * n)  # exact, as in T5
            # every span's length, read off the target
            run = None
            for i in target:
                if i in SPECIAL.sentinels or i == SPECIAL.eos:
                    if run is not None:
                        lengths.append(run)
                    run = 0
                else:
                    run += 1
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.15
    assert min(lengths) == 1 and max(lengths) > 5  # span lengths are random, not all 3


def test_noise_mask_layout():
    mask = random_spans_noise_mask(100, 0.15, 3.0, random.Random(1))
    assert len(mask) == 100 and sum(mask) == 15
    assert not mask[0] and mask[-1]  # T5: starts with kept tokens, ends with a hole
    starts = sum(mask[i] and (i == 0 or not mask[i - 1]) for i in range(100))
    assert starts == 5


def test_span_corruption_is_deterministic_given_rng():
    ids = text(80)
    a = span_corruption(ids, random.Random(3), SPECIAL, max_source=100, max_target=100)
    b = span_corruption(ids, random.Random(3), SPECIAL, max_source=100, max_target=100)
    c = span_corruption(ids, random.Random(4), SPECIAL, max_source=100, max_target=100)
    assert a == b and a != c


def test_span_corruption_truncates_to_fit():
    ids = text(1000)
    for seed in range(5):
        source, target = span_corruption(ids, random.Random(seed), SPECIAL, max_source=64, max_target=20)
        assert len(source) <= 64 and len(target) <= 20
        restored = uncorrupt(decode(source), decode(target))
        assert restored == decode(ids[: len(restored)])  # a whole prefix of the text
        assert len(restored) > 50  # and as long a one as fits


def test_span_corruption_errors():
    with pytest.raises(ValueError, match="sentinel"):
        span_corruption(text(100), random.Random(0), SpecialIds(0, 1, 2, sentinels=[500, 501]),
                        max_source=200, max_target=200)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        span_corruption(text(1), random.Random(0), SPECIAL, max_source=10, max_target=10)
    with pytest.raises(ValueError, match="noise_density"):
        span_corruption(text(10), random.Random(0), SPECIAL, noise_density=1.0, max_source=10, max_target=10)
    with pytest.raises(ValueError, match="max_target"):
        span_corruption(text(10), random.Random(0), SPECIAL, max_source=10, max_target=0)


# ---------------------------------------------------------------------------
# seq2seq and causal_lm


def test_seq2seq_truncates_and_appends_eos():
    src, tgt = text(10, seed=1), text(8, seed=2)
    assert seq2seq(src, tgt, SPECIAL, 20, 20) == (src, tgt + [SPECIAL.eos])
    source, target = seq2seq(src, tgt, SPECIAL, max_source=4, max_target=3)
    assert source == src[:4] and target == tgt[:2] + [SPECIAL.eos]
    with pytest.raises(ValueError, match="max_source"):
        seq2seq(src, tgt, SPECIAL, 0, 5)


def test_causal_lm_frames_and_truncates():
    ids = text(6)
    assert decode(causal_lm(ids, SPECIAL, 100)) == ["<s>", *decode(ids), "</s>"]
    assert causal_lm(ids, SPECIAL, 4) == [SPECIAL.bos] + ids[:3]


def test_objectives_registry():
    assert OBJECTIVES == {"prefix_lm": prefix_lm, "span_corruption": span_corruption,
                          "seq2seq": seq2seq, "causal_lm": causal_lm}


# ---------------------------------------------------------------------------
# collation


def test_collate_seq2seq_shifts_and_pads():
    pairs = [([11, 12, 13], [21, 22, 2]), ([14], [23, 2])]
    batch = collate_seq2seq(pairs, SPECIAL)
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert batch["input_ids"].tolist() == [[11, 12, 13], [14, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["decoder_input_ids"].tolist() == [[1, 21, 22], [1, 23, 0]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[21, 22, 2], [23, 2, -100]]
    with pytest.raises(ValueError, match="empty"):
        collate_seq2seq([([], [2])], SPECIAL)
    with pytest.raises(ValueError, match="empty batch"):
        collate_seq2seq([], SPECIAL)


def test_collate_causal_masks_padding():
    batch = collate_causal([[1, 11, 12, 2], [1, 13]], SPECIAL)
    assert batch["input_ids"].tolist() == [[1, 11, 12, 2], [1, 13, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 11, 12, 2], [1, 13, -100, -100]]
    assert all(t.dtype == torch.int64 for t in batch.values())


def test_collated_seq2seq_batch_trains_the_encoder_decoder():
    torch.manual_seed(0)
    model = build_model("tiny", seed=0).eval()
    assert (model.config.pad_token_id, model.config.bos_token_id) == (SPECIAL.pad, SPECIAL.bos)
    rng = random.Random(0)
    pairs = [span_corruption(text(40, seed=1), rng, SPECIAL, max_source=64, max_target=32),
             prefix_lm(text(25, seed=2), rng, SPECIAL, max_source=64, max_target=32),
             seq2seq(text(7, seed=3), text(3, seed=4), SPECIAL, 64, 32)]
    batch = collate_seq2seq(pairs, SPECIAL)
    # our decoder inputs are the model's own shift of the labels wherever they count
    real = batch["decoder_attention_mask"].bool()
    assert torch.equal(batch["decoder_input_ids"][real], model.shift_right(batch["labels"])[real])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(512.0)).item(), rel=0.2)
    from_labels = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(out.loss, from_labels.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_collated_causal_batch_trains_the_decoder_only():
    model = build_model("deconly-tiny", seed=0).eval()
    seqs = [causal_lm(text(n, seed=n), SPECIAL, 32) for n in (10, 40, 3)]
    batch = collate_causal(seqs, SPECIAL)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # the loss is next-token cross-entropy over real tokens only
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
