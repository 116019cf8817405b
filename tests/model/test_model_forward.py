"""Forward passes: shapes, padding invariance, positions, loss, dropout."""

import torch

from conftest import max_logit_error, random_prompts
from slmctl.model import build_model


def test_encdec_forward_shapes_and_loss(encdec):
    ids, mask, _ = random_prompts([7, 4])
    labels = torch.randint(3, 512, (2, 5))
    out = encdec(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 5, 512)
    assert out.encoder_hidden_states.shape == (2, 7, 64)
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.loss, expected)
    # labels without decoder inputs mean: the decoder reads BOS + labels[:-1]
    shifted = torch.cat([torch.full((2, 1), encdec.config.bos_token_id), labels[:, :-1]], dim=1)
    torch.testing.assert_close(encdec(input_ids=ids, attention_mask=mask, decoder_input_ids=shifted).logits, out.logits)


def test_ignored_labels_do_not_count(encdec):
    ids, mask, _ = random_prompts([6, 6])
    labels = torch.randint(3, 512, (2, 5))
    partial = labels.clone()
    partial[:, 3:] = -100
    full = encdec(input_ids=ids, decoder_input_ids=encdec.shift_right(labels)).logits
    loss = encdec(input_ids=ids, decoder_input_ids=encdec.shift_right(labels), labels=partial).loss
    expected = torch.nn.functional.cross_entropy(full[:, :3].flatten(0, 1), labels[:, :3].flatten())
    torch.testing.assert_close(loss, expected)


def test_encdec_padded_batch_matches_single_rows(encdec):
    trained_init = build_model("tiny", seed=0).eval()
    for model in (encdec, trained_init):
        for side in ("right", "left"):
            ids, mask, rows = random_prompts([9, 3, 6], side=side, seed=1)
            dec = torch.randint(3, 512, (3, 5))
            batched = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            for i, row in enumerate(rows):
                alone = model(input_ids=row[None], decoder_input_ids=dec[i:i + 1]).logits
                # fp32 summation order alone gives up to ~1.3e-5 on some CPUs; a padding leak gives ~1
                assert max_logit_error(batched[i], alone[0]) <= 1e-4, side


def test_encdec_padded_decoder_targets_match_single_rows(encdec):
    ids, _, _ = random_prompts([5, 5])
    dec, dec_mask, rows = random_prompts([6, 3], seed=3)
    batched = encdec(input_ids=ids, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
    for i, row in enumerate(rows):
        alone = encdec(input_ids=ids[i:i + 1], decoder_input_ids=row[None]).logits
        assert max_logit_error(batched[i, :len(row)], alone[0]) <= 1e-5


def test_deconly_padded_batch_matches_single_rows(deconly):
    trained_init = build_model("deconly-tiny", seed=0).eval()
    for model in (deconly, trained_init):
        for side in ("right", "left"):
            ids, mask, rows = random_prompts([8, 2, 5], side=side, seed=2)
            batched = model(input_ids=ids, attention_mask=mask).logits
            for i, row in enumerate(rows):
                alone = model(input_ids=row[None]).logits[0]
                assert max_logit_error(batched[i][mask[i].bool()], alone) <= 1e-5, side


def test_decoder_is_causal(encdec, deconly):
    ids, _, _ = random_prompts([6])
    dec = torch.randint(3, 512, (1, 6))
    changed = dec.clone()
    changed[0, 4] = (changed[0, 4] + 7) % 512
    a = encdec(input_ids=ids, decoder_input_ids=dec).logits
    b = encdec(input_ids=ids, decoder_input_ids=changed).logits
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    a, b = deconly(input_ids=dec).logits, deconly(input_ids=changed).logits
    torch.testing.assert_close(a[:, :4], b[:, :4])


def test_encoder_is_bidirectional_and_centred(encdec):
    ids, _, _ = random_prompts([7])
    out = encdec.encode(ids)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 512
    assert not torch.allclose(out[:, 0], encdec.encode(changed)[:, 0])  # the first token sees the last


def test_rope_factor_only_acts_beyond_the_trained_length():
    short = build_model("tiny", seed=0).eval()
    scaled = build_model("tiny", seed=0, rope_factor=4.0).eval()
    ids = torch.randint(3, 512, (1, 16))
    dec = torch.randint(3, 512, (1, 4))
    torch.testing.assert_close(short(input_ids=ids, decoder_input_ids=dec).logits,
                               scaled(input_ids=ids, decoder_input_ids=dec).logits)
    assert scaled.rope.base(4 * scaled.config.max_seq_len) > scaled.rope.base(scaled.config.max_seq_len)


def test_dropout_is_configurable_and_off_in_eval():
    model = build_model("tiny", seed=0, dropout=0.5)
    ids, dec = torch.randint(3, 512, (2, 8)), torch.randint(3, 512, (2, 4))
    model.train()
    assert not torch.allclose(model(input_ids=ids, decoder_input_ids=dec).logits,
                              model(input_ids=ids, decoder_input_ids=dec).logits)
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=dec).logits,
                               model(input_ids=ids, decoder_input_ids=dec).logits)


def test_gradients_reach_every_parameter(encdec, deconly):
    ids, mask, _ = random_prompts([6, 4])
    encdec(input_ids=ids, attention_mask=mask, labels=torch.randint(3, 512, (2, 5))).loss.backward()
    deconly(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for model in (encdec, deconly):
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing


def test_bf16_forward_runs(encdec):
    model = encdec.to(torch.bfloat16)
    ids, mask, _ = random_prompts([6, 4])
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :3]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
