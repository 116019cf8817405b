"""330M-scale numerics (run with `make test-slow` / `pytest -m slow`; CI skips them)."""

import pytest
import torch
from reference_numerics import random_reference_state, reference_greedy, reference_logits

from slmctl.model import build_model, count_parameters, load_model

pytestmark = pytest.mark.slow


def test_330m_reference_checkpoint_parity(tmp_path):
    state = random_reference_state(vocab=32128, d=1024, H=6, KV=3, hd=64, d_ff=4096, n_enc=20, n_dec=10, seed=3,
                                   scale=1.0, embed_std=0.1)  # logits of a trained model's magnitude (~10)
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": state}, path)
    model = load_model(path).eval()
    assert model.num_parameters() == count_parameters(model.config) == 332_042_240
    assert model.config.eos_token_id == 32000  # the reference's Phi-3.5 tokenizer
    enc = torch.randint(3, 32000, (1, 96), generator=torch.Generator().manual_seed(0))
    dec = torch.cat([torch.ones(1, 1, dtype=torch.long), enc[:, :15]], dim=1)
    with torch.no_grad():
        expected = reference_logits(state, enc, dec, 6, 3)
        got = model(input_ids=enc, decoder_input_ids=dec).logits
    assert expected.abs().max() > 5
    assert (got - expected).abs().max() <= 1e-4
    ours = model.generate(enc, max_new_tokens=12)
    theirs = reference_greedy(state, enc, 6, 3, bos_id=1, eos_id=32000, max_new_tokens=12)
    assert ours.tolist() == theirs.tolist()


def test_330m_cached_generation_matches_uncached():
    model = build_model("330m", seed=0).eval()
    prompt = torch.randint(3, 32000, (1, 64))
    new = model.generate(prompt, max_new_tokens=8)[0].tolist()
    dec = [model.config.bos_token_id]
    for _ in range(len(new)):
        with torch.no_grad():
            dec.append(int(model(input_ids=prompt, decoder_input_ids=torch.tensor([dec])).logits[0, -1].argmax()))
    assert dec[1:] == new


def test_330m_onnx_export_validates_and_int8_keeps_most_greedy_tokens(tmp_path):
    from slmctl.config.compose import compose
    from slmctl.export.quantize import quantize_int8
    from slmctl.export.stage import _spec, export_graphs
    from slmctl.export.validate import token_agreement, validate
    from slmctl.runtime.onnx import OnnxLM

    model = build_model("330m", seed=0).eval()
    spec = _spec(model, None, compose("export", ["source=330m"]), {})
    spec["variants"]["fp32"] = export_graphs(model, tmp_path)
    fp32 = OnnxLM(tmp_path, spec=spec)
    report = validate(model, fp32, [8, 100, 512], steps=32, batch=2, tolerance=1e-4, seed=0)
    assert report["passed"], report
    spec["variants"]["int8"] = quantize_int8(tmp_path, spec["variants"]["fp32"])
    int8 = OnnxLM(tmp_path, spec=spec, variant="int8")
    prompts = [torch.randint(4, 32000, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    assert token_agreement(fp32, int8, prompts, 16)["token_agreement"] > 0.2  # random weights: near-ties abound
