"""Packed rows (slmctl.data.packing): windows of the document stream -> rows of isolated segments."""

import random

import pytest
import torch

from slmctl.data import packing
from slmctl.data.objectives import SpecialIds, collate_causal, collate_seq2seq, prefix_lm_split_range
from slmctl.data.packing import PackedRow, Piece
from slmctl.data.synthetic import SyntheticWorld
from slmctl.data.tokenizer import train_bpe
from slmctl.model import build_model

S, T = 256, 64  # the default max_source_len / max_target_len
CFG = {"min_prefix_frac": 0.2, "max_prefix_frac": 0.8, "noise_density": 0.15, "mean_span_length": 3.0}
TOY = SpecialIds(pad=0, bos=1, eos=2, sentinels=[511 - i for i in range(100)])


@pytest.fixture(scope="module")
def corpus():
    """(documents as ids, special ids): the synthetic world's paragraphs under a small BPE."""
    texts = SyntheticWorld(seed=0, n_people=200).texts("train", 600)
    tokenizer = train_bpe(texts, vocab_size=400)
    special = SpecialIds(pad=tokenizer.pad_id, bos=tokenizer.bos_id, eos=tokenizer.eos_id,
                         sentinels=tokenizer.sentinel_ids)
    return tokenizer.encode_batch(texts), special


def pack_corpus(corpus, name, max_source=S, max_target=T, seed=0):
    documents, special = corpus
    windows = packing.windows_of(documents, packing.window_length(name, CFG, max_source, max_target))
    rng = random.Random(seed)
    return windows, [packing.pack_window(w, name, CFG, special, max_source, max_target, rng) for w in windows]


def segments(row: PackedRow):
    """[(source tokens, target tokens)] of each segment of a row, in order."""
    out = []
    for k in range(1, row.n_segments + 1):
        source = [t for t, s in zip(row.source, row.segment_ids) if s == k]
        target = [t for t, s in zip(row.target, row.target_segment_ids) if s == k]
        out.append((source, target))
    return out


def uncorrupt(source, target, sentinels):
    """The text a span-corrupted (source, target) pair came from."""
    holes, current = {}, None
    for t in target[:-1]:
        if t in sentinels:
            current = t
            holes[current] = []
        else:
            holes[current].append(t)
    text = []
    for t in source:
        text.extend(holes[t] if t in sentinels else [t])
    return text


def check_texts(pieces, texts, dropped):
    """Every segment's text is its piece's ids or (the row's last segment only) their start;
    pieces without a segment are dropped whole; `dropped` counts exactly what is missing."""
    j = 0
    for piece in pieces:
        if j < len(texts) and texts[j] and list(piece.ids[:len(texts[j])]) == texts[j]:
            assert len(texts[j]) == len(piece.ids) or j == len(texts) - 1, "only the last segment may be cut"
            j += 1
    assert j == len(texts), "a segment matches no piece, or pieces came out of order"
    assert dropped == sum(len(p.ids) for p in pieces) - sum(map(len, texts))


def test_windows_of_cuts_the_stream_into_pieces():
    documents = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    windows = packing.windows_of(documents, 4)
    stream = [5, 6, 7, 2, 8, 2, 9, 10, 11, 12, 13, 2]
    assert windows == [
        [Piece([5, 6, 7], True, True)],
        [Piece([8], True, True), Piece([9, 10], True, False)],
        [Piece([11, 12, 13], False, True)],
    ]
    rebuilt = [t for w in windows for p in w for t in [*p.ids, *([2] * p.ends_doc)]]
    assert rebuilt == stream
    # a window opening on a document's EOS: no empty piece for it (the store drops them too)
    assert packing.windows_of(documents, 3)[1] == [Piece([8], True, True)]


def test_window_lengths():
    assert packing.window_length("causal_lm", CFG, S, T) == S - 1
    assert packing.window_length("span_corruption", CFG, S, T) == 286  # 285 tokens corrupt into 256 / 58, + EOS
    assert packing.window_length("prefix_lm", CFG, S, T) == 127  # (64 - 1) / (1 - 0.5) + EOS
    with pytest.raises(ValueError, match="pack_pairs"):
        packing.window_length("seq2seq", CFG, S, T)


def test_causal_rows_frame_documents_and_lose_only_the_cut_tail(corpus):
    windows, rows = pack_corpus(corpus, "causal_lm")
    bos, eos = corpus[1].bos, corpus[1].eos
    for pieces, row in zip(windows, rows):
        assert len(row.source) <= S and not row.target
        texts = []
        live = [p for p in pieces if len(p.ids) + p.starts_doc + p.ends_doc >= 2]
        for (seq, _), piece in zip(segments(row), live):
            framed = [bos] * piece.starts_doc + list(piece.ids) + [eos] * piece.ends_doc
            assert seq == framed[:len(seq)]  # bos exactly where a document starts, eos where it ends
            texts.append(seq[piece.starts_doc:piece.starts_doc + len(piece.ids)])
        check_texts(pieces, texts, row.dropped)


def test_span_corruption_rows_restore_their_pieces(corpus):
    windows, rows = pack_corpus(corpus, "span_corruption")
    special = corpus[1]
    sentinels = set(special.sentinels)
    for pieces, row in zip(windows, rows):
        assert len(row.source) <= S and len(row.target) <= T
        texts = []
        for source, target in segments(row):
            used = [t for t in source if t in sentinels]
            assert used == special.sentinels[:len(used)]  # every segment starts again at <extra_id_0>
            assert target[-1] == special.eos
            texts.append(uncorrupt(source, target, sentinels))
        check_texts(pieces, texts, row.dropped)


def test_prefix_lm_rows_split_each_piece_within_the_configured_fractions(corpus):
    windows, rows = pack_corpus(corpus, "prefix_lm")
    for pieces, row in zip(windows, rows):
        assert len(row.source) <= S and len(row.target) <= T
        texts = [source + target[:-1] for source, target in segments(row)]
        check_texts(pieces, texts, row.dropped)
        for i, ((source, target), text) in enumerate(zip(segments(row), texts)):
            assert target[-1] == corpus[1].eos
            if i < row.n_segments - 1:  # the last one's continuation may be cut to the room left
                low, high = prefix_lm_split_range(len(text), 0.2, 0.8)
                assert low <= len(source) <= high


def efficiency(corpus, name):
    windows, rows = pack_corpus(corpus, name)
    real, slots = packing.packing_efficiency(packing.collate_packed(rows, corpus[1], causal=name == "causal_lm"))
    text = sum(len(p.ids) for w in windows for p in w)
    return real / slots, sum(r.dropped for r in rows) / text


def test_causal_lm_and_span_corruption_rows_come_out_full(corpus):
    for name in ("causal_lm", "span_corruption"):
        used, dropped = efficiency(corpus, name)
        assert used >= 0.97, (name, used)
        assert dropped < 0.01, (name, dropped)  # measured: causal 0.7%, span corruption 0.01%


def test_prefix_lm_efficiency_is_what_the_docstring_says(corpus):
    # on average half of every document is continuation: the decoder fills when the encoder holds
    # ~64 tokens, so rows are padded only to the batch's longest encoder side (see slmctl.data.packing):
    # measured 0.71 of the batch's slots (0.37 of a fixed 256 + 64)
    used, dropped = efficiency(corpus, "prefix_lm")
    assert 0.6 < used < 0.8, used
    assert dropped < 0.08, dropped


def test_collate_packed_causal_boundaries():
    row = PackedRow(max_source=8)
    row.add([1, 10, 11, 2])  # a whole document
    row.add([1, 12, 13])  # the start of the next
    batch = packing.collate_packed([row], TOY, causal=True)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 2, 1, 12, 13, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 2, 2, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 10, 11, 2, -100, 12, 13, -100]]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "segment_ids"}
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_packed_encoder_decoder_boundaries():
    rows = [PackedRow(max_source=6, max_target=6), PackedRow(max_source=6, max_target=6)]
    rows[0].add([10, 11], [20, 21, 2])
    rows[0].add([12], [22, 2])
    rows[1].add([13, 14, 15, 16, 17, 18], [23, 2])
    batch = packing.collate_packed(rows, TOY, causal=False)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0, 0], [13, 14, 15, 16, 17, 18]]
    assert batch["segment_ids"].tolist() == [[1, 1, 2, 0, 0, 0], [1] * 6]
    assert batch["labels"].tolist() == [[20, 21, 2, 22, 2, -100], [23, 2, -100, -100, -100, -100]]
    # each segment's own [bos] + target[:-1]: the shift never carries a token across a boundary
    assert batch["decoder_input_ids"].tolist() == [[1, 20, 21, 1, 22, 0], [1, 23, 0, 0, 0, 0]]
    assert batch["decoder_segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    assert packing.packing_efficiency(batch) == (3 + 6 + 5 + 2, 24)
    broken = PackedRow(max_source=4, max_target=4)
    broken.add([10], [])  # a source segment without a target
    broken.add([11], [20, 2])
    with pytest.raises(ValueError, match="both source and target"):
        packing.collate_packed([broken], TOY, causal=False)


def test_pack_pairs_greedy_in_order_with_seq2seq_truncation():
    pairs = [([10, 11, 12], [20, 21]), ([13] * 9, [22] * 9), ([14], [23]), ([15, 16], [24]), ([17], [27, 28])]
    rows = packing.pack_pairs(pairs, TOY, max_source=6, max_target=5)
    # pair 2 is cut like seq2seq (6 source tokens, 4 target tokens + eos) and fits no room left in
    # row 1; pair 3 no source room in row 2; pair 5's target (3) no target room in row 3
    assert [r.source for r in rows] == [[10, 11, 12], [13] * 6, [14, 15, 16], [17]]
    assert [r.segment_ids for r in rows] == [[1, 1, 1], [1] * 6, [1, 2, 2], [1]]
    assert [r.target for r in rows] == [[20, 21, 2], [22] * 4 + [2], [23, 2, 24, 2], [27, 28, 2]]
    assert rows[2].target_segment_ids == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="empty source"):
        packing.pack_pairs([([], [20])], TOY, 6, 5)


def test_pack_window_takes_any_piece_like_object_and_rejects_seq2seq():
    class StorePiece:  # the token store's own piece type: only the three fields matter
        def __init__(self, ids, starts_doc, ends_doc):
            self.ids, self.starts_doc, self.ends_doc = ids, starts_doc, ends_doc

    row = packing.pack_window([StorePiece([10, 11], True, True)], "causal_lm", None, TOY, 8, 0, random.Random(0))
    assert row.source == [1, 10, 11, 2]
    with pytest.raises(ValueError, match="pack_pairs"):
        packing.pack_window([], "seq2seq", None, TOY, 8, 8, random.Random(0))


@pytest.mark.parametrize("name", ["span_corruption", "prefix_lm", "causal_lm"])
def test_packed_rows_train_like_unpacked_documents(corpus, name):
    """End to end: the model's loss on packed rows is the token-weighted mean of its losses on
    each segment alone, collated the unpacked way (collate_seq2seq / collate_causal)."""
    _, rows = pack_corpus(corpus, name)
    rows = rows[:2]
    causal = name == "causal_lm"
    model = build_model("deconly-tiny" if causal else "tiny", seed=0).eval()
    batch = packing.collate_packed(rows, corpus[1], causal=causal)
    with torch.no_grad():
        packed = model(**batch)
        total, count, worst = 0.0, 0, 0.0
        for b, row in enumerate(rows):
            for k, (source, target) in enumerate(segments(row), start=1):
                if causal:
                    alone = model(**collate_causal([source], corpus[1]))
                    n = len(source) - 1
                    where = batch["segment_ids"][b] == k
                else:
                    alone = model(**collate_seq2seq([(source, target)], corpus[1]))
                    n = len(target)
                    where = batch["decoder_segment_ids"][b] == k
                worst = max(worst, (packed.logits[b][where] - alone.logits[0]).abs().max().item())
                total, count = total + alone.loss.item() * n, count + n
    assert worst < 1e-5, worst
    assert abs(packed.loss.item() - total / count) < 1e-5
