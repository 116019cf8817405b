"""Packed rows: several documents in one row, each seeing only itself (segment ids).

Every document of a packed row must get the logits and loss it gets when run alone,
unpacked: attention never crosses a segment, and positions restart in every segment
(centred in the encoder, from 0 in the decoder).

Two models each: the training init in fp32 (max abs logit difference < 1e-5), and the
conftest's randomised weights in fp64. Those weights (large, on purpose) amplify fp32
summation-order noise to ~7e-4 abs on logits of ~15, while in fp64 a packed document
matches its unpacked run to ~1e-14; a leak across segments or a wrong position gives ~1.
"""

import torch

from slmctl.model import build_model

SOURCES = [7, 4, 9]  # encoder lengths of the three documents
TARGETS = [5, 3, 6]  # decoder lengths of their targets
CAUSAL = [6, 3, 8]  # decoder-only documents
PAD, IGNORE = 0, -100
LOSS_TOLERANCE = 1e-5  # the loss is computed in fp32 for every model dtype


def docs(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 512, (n,), generator=g) for n in lengths]


def pack(pieces, width, fill):
    """Concatenate `pieces` into one row of `width` -> (row [width], segment ids [width])."""
    row = torch.full((width,), fill, dtype=torch.long)
    segments = torch.zeros(width, dtype=torch.long)
    at = 0
    for k, piece in enumerate(pieces, start=1):
        row[at:at + len(piece)] = piece
        segments[at:at + len(piece)] = k
        at += len(piece)
    return row, segments


def spans(lengths):
    """The slice of each piece in its packed row."""
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return [slice(starts[i], starts[i + 1]) for i in range(len(lengths))]


def packed_encdec_batch(model, sources, targets, extra_source=3, extra_target=2):
    """Two packed rows: the documents in order, then in reverse order; both right-padded."""
    S, T = sum(map(len, sources)) + extra_source, sum(map(len, targets)) + extra_target
    rows = []
    for order in (range(len(sources)), reversed(range(len(sources)))):
        order = list(order)
        ids, seg = pack([sources[i] for i in order], S, PAD)
        labels, dec_seg = pack([targets[i] for i in order], T, IGNORE)
        rows.append((order, ids, seg, labels, dec_seg))
    batch = {
        "input_ids": torch.stack([r[1] for r in rows]),
        "attention_mask": torch.stack([(r[2] > 0).long() for r in rows]),
        "segment_ids": torch.stack([r[2] for r in rows]),
        "labels": torch.stack([r[3] for r in rows]),
        "decoder_segment_ids": torch.stack([r[4] for r in rows]),
    }
    batch["decoder_input_ids"] = model.shift_right(batch["labels"], batch["decoder_segment_ids"])
    batch["decoder_attention_mask"] = (batch["decoder_segment_ids"] > 0).long()
    return batch, [r[0] for r in rows]


def alone_encdec(model, source, target):
    decoder_input_ids = torch.cat([torch.tensor([model.config.bos_token_id]), target[:-1]])
    return model(input_ids=source[None], decoder_input_ids=decoder_input_ids[None], labels=target[None])


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


def models(randomised, preset):
    """(model, tolerance): the training init in fp32, the randomised fixture in fp64."""
    return [(build_model(preset, seed=0).eval(), 1e-5), (randomised.double(), 1e-10)]


def check_encdec(model):
    sources, targets = docs(SOURCES, seed=1), docs(TARGETS, seed=2)
    batch, orders = packed_encdec_batch(model, sources, targets)
    out = model(**batch)
    alone = [alone_encdec(model, s, t) for s, t in zip(sources, targets)]
    worst = 0.0
    for b, order in enumerate(orders):
        enc_spans, dec_spans = spans([SOURCES[i] for i in order]), spans([TARGETS[i] for i in order])
        for i, enc, dec in zip(order, enc_spans, dec_spans):
            worst = max(worst, max_abs_diff(out.logits[b, dec], alone[i].logits[0]),
                        max_abs_diff(out.encoder_hidden_states[b, enc], alone[i].encoder_hidden_states[0]))
    n = torch.tensor(TARGETS, dtype=torch.float)
    weighted = sum(o.loss * k for o, k in zip(alone, n)) / n.sum()  # both rows hold every document once
    return worst, (out.loss - weighted).abs().item(), out


def test_encdec_packed_documents_match_each_alone(encdec):
    for model, tolerance in models(encdec, "tiny"):
        worst, loss_error, out = check_encdec(model)
        assert worst < tolerance, worst
        assert loss_error < LOSS_TOLERANCE, loss_error
        assert torch.isfinite(out.logits).all()  # padding rows too


def test_encdec_packed_decoder_inputs_default_to_per_segment_shift(encdec):
    sources, targets = docs(SOURCES, seed=1), docs(TARGETS, seed=2)
    batch, _ = packed_encdec_batch(encdec, sources, targets)
    bos = encdec.config.bos_token_id
    dec = batch["decoder_input_ids"][0]
    starts = [0, 5, 8]  # every segment begins with its own BOS, never the previous document's last token
    assert dec[starts].tolist() == [bos] * 3
    assert dec[1:5].tolist() == targets[0][:-1].tolist() and dec[9:14].tolist() == targets[2][:-1].tolist()
    assert dec[14:].tolist() == [PAD, PAD]
    explicit = encdec(**batch).logits
    implicit = encdec(**{k: v for k, v in batch.items() if k != "decoder_input_ids"}).logits
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)


def test_deconly_packed_documents_match_each_alone(deconly):
    documents = docs(CAUSAL, seed=3)
    width = sum(CAUSAL) + 4
    rows = [pack(documents, width, PAD), pack(documents[::-1], width, PAD)]
    ids, seg = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    labels = ids.masked_fill(seg == 0, IGNORE)  # segment starts left in: the model must not predict them
    for model, tolerance in models(deconly, "deconly-tiny"):
        out = model(input_ids=ids, attention_mask=(seg > 0).long(), labels=labels, segment_ids=seg)
        alone = [model(input_ids=d[None], labels=d[None]) for d in documents]
        for b, order in enumerate([[0, 1, 2], [2, 1, 0]]):
            for i, where in zip(order, spans([CAUSAL[i] for i in order])):
                assert max_abs_diff(out.logits[b, where], alone[i].logits[0]) < tolerance
        n = torch.tensor(CAUSAL, dtype=torch.float) - 1  # predicted tokens per document
        weighted = sum(o.loss * k for o, k in zip(alone, n)) / n.sum()
        assert (out.loss - weighted).abs().item() < LOSS_TOLERANCE
        assert torch.isfinite(out.logits).all()


def test_one_segment_is_the_plain_forward(encdec, deconly):
    ids = docs([9], seed=4)[0][None]
    target = docs([5], seed=5)[0][None]
    ones_src, ones_tgt = torch.ones_like(ids), torch.ones_like(target)
    plain = encdec(input_ids=ids, labels=target)
    packed = encdec(input_ids=ids, labels=target, segment_ids=ones_src, decoder_segment_ids=ones_tgt)
    torch.testing.assert_close(packed.logits, plain.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.loss, plain.loss)
    plain, packed = deconly(input_ids=ids, labels=ids), deconly(input_ids=ids, labels=ids, segment_ids=ones_src)
    torch.testing.assert_close(packed.logits, plain.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.loss, plain.loss)


def test_all_padding_row_stays_finite_and_trains(encdec):
    sources, targets = docs(SOURCES, seed=1), docs(TARGETS, seed=2)
    batch, _ = packed_encdec_batch(encdec, sources, targets)
    for key in ("segment_ids", "decoder_segment_ids", "attention_mask", "decoder_attention_mask"):
        batch[key][1] = 0
    batch["labels"][1] = IGNORE
    encdec.train()
    out = encdec(**batch)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in encdec.parameters() if p.grad is not None)


def test_segment_ids_must_come_in_pairs(encdec):
    ids = docs([4], seed=0)[0][None]
    try:
        encdec(input_ids=ids, labels=ids, segment_ids=torch.ones_like(ids))
    except ValueError as error:
        assert "decoder_segment_ids" in str(error)
    else:
        raise AssertionError("encoder segment ids alone were accepted")
