"""Packed training rows: several documents in one row, each isolated from the others.

Why: documents are short next to a training row (the synthetic corpus averages ~90 tokens
against 256 encoder slots), so one document per row spends most of the compute on padding.
Packing fills rows with several documents, and the segment ids it returns let the model
(`segment_ids` in `EncoderDecoderLM` / `DecoderOnlyLM`) keep attention, positions and loss
inside each document, so a packed document trains exactly as it would alone.

Everything here is a pure function of its arguments (random choices come from the
`random.Random` passed in), so the streaming data path can call it from any worker.

The corpus is a flat token stream in which every document is followed by one EOS, cut
into fixed windows of `window_length` tokens. The data path hands `pack_window` the
document pieces of one window (`Piece`: ids without the stored EOS, and whether the window
holds the document's start and end); each piece becomes one segment:

- causal_lm: [bos if the piece starts its document] + ids + [eos if it ends it]. Window
  length max_source - 1: a window holding one whole document (n ids + its EOS) fills the row
  exactly (bos + n + eos). Every further document start costs one bos slot, so a window
  with k starts loses its last k - 1 tokens, and one holding no start leaves one slot of
  padding. Synthetic corpus at 256: 0.99998 of slots used, 0.7% of tokens cut.
- span_corruption: `objectives.span_corruption` on each piece (sentinels restart at
  <extra_id_0> in every segment, the target ends with eos). Window length: the longest
  text whose corrupted source and target fit (`objectives.span_corruption_length`, 285 at
  256/64 and T5's 15% / 3), plus one for the stored EOS. Synthetic corpus at 256/64:
  0.986 of slots used (encoder 0.995, decoder 0.95), 0.02% of tokens cut.
- prefix_lm: `objectives.prefix_lm` on each piece, split at the configured random fraction
  of the piece. A fixed 256 + 64 row cannot be full here: it holds max_source prefix tokens
  per max_target continuation tokens (a prefix fraction of 0.8 of every token), while splits
  drawn from [min_prefix_frac, max_prefix_frac] = [0.2, 0.8] put on average half of every
  document in the decoder, so the decoder fills when the encoder holds about as many tokens
  (0.37 of 320 fixed slots measured on the synthetic corpus). Filling the encoder anyway
  would mean cutting every continuation to a quarter of its prefix (or clamping the split to
  0.8), making every example ~0.8 prefix whatever the configuration says, so this module
  does not. The window holds what the decoder takes on average, (max_target - 1) / (1 - mean
  prefix fraction) tokens + 1 (127 at 64 and 0.2/0.8), only the row's last continuation is
  cut to the room left (prefix_lm's own rule), and `collate_packed` pads a batch only to its
  longest row, so the unused encoder slots cost nothing: 0.71 of the batch's slots are real
  tokens (measured, batches of the synthetic corpus at 256/64). For a longer encoder side,
  raise min_prefix_frac towards max_source / (max_source + max_target).

Truncation is the only way a window token is not trained on, and it is counted
(`PackedRow.dropped`): a piece's objective output is cut to the room left in the row,
never beyond it, pieces that come after a full row are dropped whole, and a piece too
short to train on (1 token, or a causal segment of 1 token) is dropped.

Seq2seq pairs are packed greedily instead (`pack_pairs`), and `collate_packed` turns rows
into model inputs (each segment's decoder input is its own [bos] + target[:-1]).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slmctl.data import objectives
from slmctl.data.objectives import IGNORE_INDEX, SpecialIds

PACKED_OBJECTIVES = ("causal_lm", "prefix_lm", "span_corruption")


@dataclass(frozen=True)
class Piece:
    """A document, or part of one, inside a window: its ids (no EOS) and whether the window
    holds the document's start and its end."""

    ids: list[int]
    starts_doc: bool
    ends_doc: bool


@dataclass
class PackedRow:
    """One training row: the encoder ids (for causal rows the whole sequence) and the
    decoder labels, each with its segment ids (1, 2, ... in order; target segment k belongs
    to source segment k). `dropped` counts the window's document tokens the row does not
    hold (truncation); the capacities are what `collate_packed` pads to."""

    max_source: int
    max_target: int = 0
    source: list[int] = field(default_factory=list)
    segment_ids: list[int] = field(default_factory=list)
    target: list[int] = field(default_factory=list)
    target_segment_ids: list[int] = field(default_factory=list)
    dropped: int = 0

    @property
    def n_segments(self) -> int:
        return self.segment_ids[-1] if self.segment_ids else 0

    def add(self, source: Sequence[int], target: Sequence[int] = ()) -> None:
        k = self.n_segments + 1
        self.source += source
        self.segment_ids += [k] * len(source)
        self.target += target
        self.target_segment_ids += [k] * len(target)


def _option(cfg: Any, key: str, default: Any) -> Any:
    """`cfg.key` of an objective config (structured config, DictConfig or dict), else `default`."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _check_objective(objective_name: str) -> None:
    if objective_name not in PACKED_OBJECTIVES:
        raise ValueError(f"objective {objective_name!r} is not packed from windows; packed objectives are "
                         f"{', '.join(PACKED_OBJECTIVES)} (seq2seq pairs: pack_pairs)")


def window_length(objective_name: str, objective_cfg: Any, max_source: int, max_target: int) -> int:
    """How many stream tokens (documents and their EOS) one packed row consumes (see the
    module docstring for each objective's reasoning)."""
    _check_objective(objective_name)
    if max_source < 2 or (objective_name != "causal_lm" and max_target < 2):
        raise ValueError(f"packed rows need max_source >= 2 and max_target >= 2, got {max_source}, {max_target}")
    if objective_name == "causal_lm":
        return max_source - 1
    if objective_name == "span_corruption":
        length = objectives.span_corruption_length(
            max_source + max_target, _option(objective_cfg, "noise_density", 0.15),
            _option(objective_cfg, "mean_span_length", 3.0), max_source, max_target)
        if length < 2:
            raise ValueError(f"span corruption fits no text into max_source={max_source}, max_target={max_target}")
        return length + 1
    mean_prefix = (_option(objective_cfg, "min_prefix_frac", 0.2) + _option(objective_cfg, "max_prefix_frac", 0.8)) / 2
    return min(max_source + max_target, round((max_target - 1) / max(1.0 - mean_prefix, 1e-6))) + 1


def _pack_causal(pieces: Sequence[Piece], special: SpecialIds, max_source: int) -> PackedRow:
    row = PackedRow(max_source=max_source)
    for piece in pieces:
        ids = list(piece.ids)
        # causal_lm's framing, where the window holds the document's start / end
        sequence = [special.bos] * piece.starts_doc + ids + [special.eos] * piece.ends_doc
        room = max_source - len(row.source)
        if len(sequence) < 2 or room < 2:  # a 1-token segment has nothing to predict
            row.dropped += len(ids)
            continue
        row.add(sequence[:room])
        row.dropped += max(0, len(ids) - max(0, room - piece.starts_doc))
    return row


def _prefix_lm_fit(n: int, room: int, min_frac: float, max_frac: float) -> int:
    """The longest n' <= n whose longest prefix_lm split still fits `room` source tokens, so
    a prefix is never cut from the left (the continuation is what truncation takes)."""
    while n > 2 and objectives.prefix_lm_split_range(n, min_frac, max_frac)[1] > room:
        n -= 1
    return n


def _segment(ids: list[int], objective_name: str, objective_cfg: Any, special: SpecialIds, room_source: int,
             room_target: int, rng: random.Random) -> tuple[list[int], list[int], int] | None:
    """(source, target, how many of `ids` they hold) for one piece under an encoder-decoder
    objective, cut to the room left; None when no trainable part of the piece fits."""
    if objective_name == "prefix_lm":
        low = _option(objective_cfg, "min_prefix_frac", 0.2)
        high = _option(objective_cfg, "max_prefix_frac", 0.8)
        if len(ids) < 2 or room_source < 1 or room_target < 2:
            return None
        ids = ids[:_prefix_lm_fit(len(ids), room_source, low, high)]
        source, target = objectives.prefix_lm(ids, rng, special, room_source, room_target, low, high)
        return source, target, len(source) + len(target) - 1  # the target's eos is not from the text
    noise = _option(objective_cfg, "noise_density", 0.15)
    span = _option(objective_cfg, "mean_span_length", 3.0)
    used = objectives.span_corruption_length(len(ids), noise, span, room_source, room_target)
    if used < 2:
        return None
    source, target = objectives.span_corruption(ids, rng, special, noise, span, max_source=room_source,
                                                max_target=room_target)
    return source, target, used


def pack_window(pieces: Sequence[Piece], objective_name: str, objective_cfg: Any, special: SpecialIds,
                max_source: int, max_target: int, rng: random.Random) -> PackedRow:
    """One packed row from the document pieces of one window: the objective applied to each
    piece on its own, in order, each result cut to the room left in the row. `pieces` may
    be any objects with `ids`, `starts_doc` and `ends_doc`."""
    _check_objective(objective_name)
    if objective_name == "causal_lm":
        return _pack_causal(pieces, special, max_source)
    row = PackedRow(max_source=max_source, max_target=max_target)
    for piece in pieces:
        ids = list(piece.ids)
        made = _segment(ids, objective_name, objective_cfg, special, max_source - len(row.source),
                        max_target - len(row.target), rng)
        if made is None:
            row.dropped += len(ids)
            continue
        source, target, used = made
        row.add(source, target)
        row.dropped += len(ids) - used
    return row


def pack_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], special: SpecialIds, max_source: int,
               max_target: int) -> list[PackedRow]:
    """Seq2seq (source, target) pairs packed greedily, in order: each pair is truncated as
    `objectives.seq2seq` does (source to max_source, target to max_target - 1 plus eos) and
    goes into the current row, or starts a new one when it does not fit the room left."""
    rows: list[PackedRow] = []
    row = PackedRow(max_source=max_source, max_target=max_target)
    for source_ids, target_ids in pairs:
        source, target = objectives.seq2seq(list(source_ids), list(target_ids), special, max_source, max_target)
        if not source:
            raise ValueError("pack_pairs got an empty source; each pair needs at least one source token")
        if len(row.source) + len(source) > max_source or len(row.target) + len(target) > max_target:
            rows.append(row)
            row = PackedRow(max_source=max_source, max_target=max_target)
        row.add(source, target)
    if row.source:
        rows.append(row)
    return rows


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _width(lengths: list[int], capacity: int) -> int:
    """The batch's width: its longest row rounded up to a multiple of 8 (few distinct shapes for
    kernels and compilers), at most the capacity. Rows that do not fill up (prefix_lm's encoder
    side) cost no compute beyond the longest of them."""
    longest = max(lengths)
    return max(longest, min(capacity, -(-longest // 8) * 8))


def _segment_starts(segments: torch.Tensor) -> torch.Tensor:
    """True where a segment begins (padding excluded)."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts & (segments > 0)


def collate_packed(rows: Sequence[PackedRow], special: SpecialIds, causal: bool) -> dict[str, torch.Tensor]:
    """Packed rows -> int64 tensors right-padded to the batch's longest row (`_width`): input_ids,
    attention_mask, labels, segment_ids, and for encoder-decoder rows decoder_input_ids (each
    segment's own [bos] + target[:-1]), decoder_attention_mask and decoder_segment_ids. Causal
    labels are -100 on padding and on every segment's first token (the model predicts
    labels[t + 1] at t: nothing predicts a document from the previous one); encoder-decoder
    labels are the targets, -100 on padding."""
    if not rows:
        raise ValueError("collate_packed got an empty batch")
    if any(not row.source for row in rows):
        raise ValueError("collate_packed got an empty row")
    width = _width([len(row.source) for row in rows], max(row.max_source for row in rows))
    input_ids = _pad([row.source for row in rows], width, special.pad)
    segment_ids = _pad([row.segment_ids for row in rows], width, 0)
    batch = {"input_ids": input_ids, "attention_mask": (segment_ids > 0).long(), "segment_ids": segment_ids}
    if causal:
        batch["labels"] = input_ids.masked_fill((segment_ids == 0) | _segment_starts(segment_ids), IGNORE_INDEX)
        return batch
    for row in rows:
        if not row.target or set(row.target_segment_ids) != set(row.segment_ids):
            raise ValueError("every segment of an encoder-decoder row needs both source and target tokens")
    width = _width([len(row.target) for row in rows], max(row.max_target for row in rows))
    labels = _pad([row.target for row in rows], width, IGNORE_INDEX)
    decoder_segment_ids = _pad([row.target_segment_ids for row in rows], width, 0)
    shifted = torch.cat([labels.new_full((len(rows), 1), special.pad), labels[:, :-1]], dim=1)
    shifted = shifted.masked_fill(_segment_starts(decoder_segment_ids), special.bos)
    batch.update(
        labels=labels,
        decoder_input_ids=shifted.masked_fill(decoder_segment_ids == 0, special.pad),
        decoder_attention_mask=(decoder_segment_ids > 0).long(),
        decoder_segment_ids=decoder_segment_ids,
    )
    return batch


def packing_efficiency(batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, slots) of a collated batch, encoder and decoder together: the
    non-padding fraction is real / slots."""
    real, slots = int(batch["attention_mask"].sum()), batch["attention_mask"].numel()
    if "decoder_attention_mask" in batch:
        real += int(batch["decoder_attention_mask"].sum())
        slots += batch["decoder_attention_mask"].numel()
    return real, slots


def windows_of(documents: Sequence[Sequence[int]], window: int) -> list[list[Piece]]:
    """Reference cut of a corpus into windows (what the token store does at scale): the
    documents, each followed by one EOS, as one stream cut into `window`-token windows (the
    tail is dropped); each window as its non-empty document pieces."""
    rows: list[list[Piece]] = []
    pieces: list[Piece] = []
    at = 0  # stream tokens in the current window
    for ids in documents:
        start = 0
        framed = len(ids) + 1  # the ids and their EOS
        while start < framed:
            take = min(framed - start, window - at)
            end = start + take
            text = list(ids[start:min(end, len(ids))])
            if text:  # a window that opens on a document's EOS holds no piece of it, as in the store
                pieces.append(Piece(text, starts_doc=start == 0, ends_doc=end == framed))
            at += take
            start = end
            if at == window:
                rows.append(pieces)
                pieces, at = [], 0
    return rows
