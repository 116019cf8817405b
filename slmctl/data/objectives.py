"""Training objectives: token ids in, model inputs out.

An encoder-decoder learns from (source, target) pairs, and pretraining has to invent
those pairs from plain text. This module holds the ways of doing that, kept apart from
any tokenizer so they can be tested with toy ids and reused by every data module:

- `prefix_lm`: the encoder reads the start of a text, the decoder writes the rest.
- `span_corruption`: T5's denoising objective; spans are cut out of the text, the
  encoder reads the text with one sentinel per hole, the decoder writes the holes.
- `seq2seq`: a supervised pair (question -> answer, article -> summary), truncated.
- `causal_lm`: one sequence for the decoder-only baseline.

Then the collators that right-pad a batch into tensors for `EncoderDecoderLM` and
`DecoderOnlyLM` (packing several documents per row, isolated from each other, is
slmctl.data.packing). Every random choice comes from the `random.Random` passed in, so a seeded
data pipeline gives the same examples every time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100  # labels with this value are not counted by the loss


@dataclass
class SpecialIds:
    """The special token ids the objectives insert; `sentinels` are T5's
    <extra_id_0>, <extra_id_1>, ... in the order they are used."""

    pad: int
    bos: int
    eos: int
    sentinels: list[int] = field(default_factory=list)


def _check_positive(**limits: int) -> None:
    for name, value in limits.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


# ---------------------------------------------------------------------------
# Objectives: one example -> (source, target) or one sequence


def prefix_lm_split_range(n: int, min_prefix_frac: float, max_prefix_frac: float) -> tuple[int, int]:
    """The (lowest, highest) prefix length `prefix_lm` may draw for a text of n >= 2 tokens."""
    low = min(max(1, math.ceil(min_prefix_frac * n)), n - 1)
    high = max(low, min(n - 1, math.floor(max_prefix_frac * n)))
    return low, high


def prefix_lm(ids: list[int], rng: random.Random, special: SpecialIds, max_source: int, max_target: int,
              min_prefix_frac: float = 0.2, max_prefix_frac: float = 0.8) -> tuple[list[int], list[int]]:
    """Split a text in two at a random point: the encoder reads the prefix, the decoder
    writes the continuation. The split keeps between `min_prefix_frac` and
    `max_prefix_frac` of the tokens (at least one on each side) in the prefix. The
    prefix keeps its last `max_source` tokens (the ones next to the continuation); the
    continuation keeps its first `max_target - 1` tokens and ends with eos."""
    _check_positive(max_source=max_source, max_target=max_target)
    if not 0.0 <= min_prefix_frac <= max_prefix_frac <= 1.0:
        raise ValueError(f"need 0 <= min_prefix_frac <= max_prefix_frac <= 1, got {min_prefix_frac}, {max_prefix_frac}")
    n = len(ids)
    if n < 2:
        raise ValueError(f"prefix_lm needs at least 2 tokens to split, got {n}")
    split = rng.randint(*prefix_lm_split_range(n, min_prefix_frac, max_prefix_frac))
    source = list(ids[:split][-max_source:])
    target = list(ids[split:][: max_target - 1]) + [special.eos]
    return source, target


def _noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a text of `length` tokens, as T5 counts them."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(1, round(num_noise / mean_span_length))
    # T5 assumes each noise span can be followed by a non-noise one; keep that true
    # even for densities near 1.
    num_spans = min(num_spans, length - num_noise)
    return num_noise, num_spans


def _random_segmentation(num_items: int, num_segments: int, rng: random.Random) -> list[int]:
    """Cut `num_items` into `num_segments` non-empty runs at uniformly random places."""
    cuts = sorted(rng.sample(range(1, num_items), num_segments - 1))
    bounds = [0, *cuts, num_items]
    return [bounds[i + 1] - bounds[i] for i in range(num_segments)]


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: random.Random) -> list[bool]:
    """T5's `random_spans_noise_mask`: True marks a token to cut out.

    Exactly `round(length * noise_density)` tokens (at least 1) are noise, in
    `round(noise / mean_span_length)` spans (at least 1) whose lengths are a random
    segmentation of the noise tokens; the kept tokens are segmented the same way, and
    the two alternate, kept span first (so the text never starts with a hole and always
    ends with one, as in T5 without `random_roll`).
    """
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise, num_spans = _noise_counts(length, noise_density, mean_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    kept_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    mask: list[bool] = []
    for kept, noise in zip(kept_lengths, noise_lengths):
        mask.extend([False] * kept)
        mask.extend([True] * noise)
    return mask


def span_corruption_length(length: int, noise_density: float, mean_span_length: float, max_source: int,
                           max_target: int) -> int:
    """The longest prefix (at most `length` tokens) of a text whose span-corrupted source (kept
    tokens + one sentinel per span) and target (noise + one sentinel per span + eos) fit
    `max_source` / `max_target`; below 2 when none does."""
    # source + target > length, which bounds the search.
    length = min(length, max_source + max_target)
    while length >= 2:
        num_noise, num_spans = _noise_counts(length, noise_density, mean_span_length)
        if length - num_noise + num_spans <= max_source and num_noise + num_spans + 1 <= max_target:
            break
        length -= 1
    return length


def span_corruption(ids: list[int], rng: random.Random, special: SpecialIds, noise_density: float = 0.15,
                    mean_span_length: float = 3.0, *, max_source: int,
                    max_target: int) -> tuple[list[int], list[int]]:
    """T5's span corruption: each noise span is replaced by the next sentinel in the
    source; the target is sentinel_i followed by span i's tokens, for every span, then
    eos. A text whose corrupted form would not fit `max_source` / `max_target` is
    truncated (from the end) beforehand, so the pair always describes one whole text."""
    _check_positive(max_source=max_source, max_target=max_target)
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_span_length < 1.0:
        raise ValueError(f"mean_span_length must be at least 1, got {mean_span_length}")
    length = span_corruption_length(len(ids), noise_density, mean_span_length, max_source, max_target)
    if length < 2:
        raise ValueError(f"span_corruption needs at least 2 tokens that fit max_source={max_source} and "
                         f"max_target={max_target}; got {len(ids)} tokens")
    num_spans = _noise_counts(length, noise_density, mean_span_length)[1]
    if num_spans > len(special.sentinels):
        raise ValueError(f"span_corruption needs {num_spans} sentinel ids for {length} tokens but got "
                         f"{len(special.sentinels)}; pass more SpecialIds.sentinels or lower noise_density")

    mask = random_spans_noise_mask(length, noise_density, mean_span_length, rng)
    source: list[int] = []
    target: list[int] = []
    span = -1
    for i in range(length):
        if not mask[i]:
            source.append(ids[i])
            continue
        if i == 0 or not mask[i - 1]:  # first token of a new noise span
            span += 1
            source.append(special.sentinels[span])
            target.append(special.sentinels[span])
        target.append(ids[i])
    target.append(special.eos)
    return source, target


def seq2seq(source_ids: list[int], target_ids: list[int], special: SpecialIds, max_source: int,
            max_target: int) -> tuple[list[int], list[int]]:
    """A supervised pair: the source keeps its first `max_source` tokens, the target its
    first `max_target - 1` tokens, and the target ends with eos."""
    _check_positive(max_source=max_source, max_target=max_target)
    return list(source_ids[:max_source]), list(target_ids[: max_target - 1]) + [special.eos]


def causal_lm(ids: list[int], special: SpecialIds, max_length: int) -> list[int]:
    """One decoder-only training sequence: [bos] + ids + [eos], cut to `max_length`."""
    _check_positive(max_length=max_length)
    return ([special.bos] + list(ids) + [special.eos])[:max_length]


def prompt_completion(source_ids: list[int], target_ids: list[int], special: SpecialIds,
                      max_length: int) -> tuple[list[int], int]:
    """Seq2seq data for a decoder-only model: [bos] + source + target + [eos] and the number of
    leading prompt tokens (whose labels the caller masks). The source is cut from the left and
    the target kept whole where possible, so the answer is never what gets truncated."""
    _check_positive(max_length=max_length)
    completion = [*target_ids, special.eos][: max(1, max_length - 2)]
    room = max_length - 1 - len(completion)
    prompt = [special.bos, *(source_ids[-room:] if room > 0 else [])]
    return prompt + completion, len(prompt)


OBJECTIVES = {
    "prefix_lm": prefix_lm,
    "span_corruption": span_corruption,
    "seq2seq": seq2seq,
    "causal_lm": causal_lm,
}


# ---------------------------------------------------------------------------
# Collation: lists of ids -> right-padded int64 tensors


def _pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad `rows` with `value` into an int64 tensor [len(rows), longest row]."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _mask_rows(rows: list[list[int]]) -> torch.Tensor:
    """1 over each row's real tokens, 0 over its right padding."""
    return _pad_rows([[1] * len(row) for row in rows], 0)


def collate_seq2seq(pairs: list[tuple[list[int], list[int]]], special: SpecialIds) -> dict[str, torch.Tensor]:
    """Batch (source, target) pairs for `EncoderDecoderLM.forward`: the encoder reads the
    source, the decoder reads [bos] + target[:-1] and is scored on target (padding in
    `labels` is -100). Every tensor is int64 [B, T], right-padded."""
    if not pairs:
        raise ValueError("collate_seq2seq got an empty batch")
    sources = [list(source) for source, _ in pairs]
    targets = [list(target) for _, target in pairs]
    if any(not row for row in sources) or any(not row for row in targets):
        raise ValueError("collate_seq2seq got an empty source or target; each needs at least one token")
    decoder_inputs = [[special.bos] + target[:-1] for target in targets]
    return {
        "input_ids": _pad_rows(sources, special.pad),
        "attention_mask": _mask_rows(sources),
        "decoder_input_ids": _pad_rows(decoder_inputs, special.pad),
        "decoder_attention_mask": _mask_rows(decoder_inputs),
        "labels": _pad_rows(targets, IGNORE_INDEX),
    }


def collate_causal(seqs: list[list[int]], special: SpecialIds) -> dict[str, torch.Tensor]:
    """Batch sequences for `DecoderOnlyLM.forward`: right-padded input_ids and
    attention_mask, and labels equal to input_ids except -100 on padding (the model
    shifts labels itself)."""
    if not seqs:
        raise ValueError("collate_causal got an empty batch")
    if any(not row for row in seqs):
        raise ValueError("collate_causal got an empty sequence")
    input_ids = _pad_rows(seqs, special.pad)
    attention_mask = _mask_rows(seqs)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
