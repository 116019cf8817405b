"""Prepacked oneDNN weights for PyTorch inference on the CPU: chosen per CPU and dtype, the same logits."""

import pytest
import torch

from conftest import randomize
from slmctl.errors import ConfigError
from slmctl.model import build_model
from slmctl.model.layers import attend
from slmctl.runtime.hardware import cpu_identity
from slmctl.runtime.prepacked import (ONE_ROW_KEPT, PACK_ENV, PackedLinear, choose_packing, has_bf16, pack_linears,
                                      packs_bf16)

AVX512 = ["avx512f", "avx512bw", "avx512vl", "avx512dq"]
ZEN3 = {"cpu": "AMD EPYC 7B13", "cpu_vendor": "AuthenticAMD", "cpu_features": ["avx2", "fma"], "torch_blas": "mkl"}
ZEN4 = {**ZEN3, "cpu": "AMD EPYC 9B14", "cpu_features": ["avx2", "fma", *AVX512, "avx512_vnni", "avx512_bf16"]}
XEON = {"cpu": "Intel(R) Xeon(R) Platinum 8481C", "cpu_vendor": "GenuineIntel",
        "cpu_features": [*AVX512, "amx_tile", "amx_bf16"], "torch_blas": "mkl"}
BF16_PACKS_HERE = packs_bf16(cpu_identity())  # oneDNN refuses to prepack bf16 on AVX2-only CPUs (a Zen 3)


@pytest.mark.parametrize("identity, dtype, environ, pack", [
    (ZEN3, torch.float32, {}, True),  # MKL's fp32 products on AMD read at ~0.6x a prepacked oneDNN weight
    (ZEN4, torch.float32, {}, True),
    (XEON, torch.float32, {}, False),  # MKL at M = 1 is the faster one on Intel
    ({**ZEN4, "torch_blas": "open"}, torch.float32, {}, False),  # a torch on another BLAS
    (XEON, torch.bfloat16, {}, True),  # bf16 reads a prepacked weight twice as fast
    (ZEN4, torch.bfloat16, {}, True),
    (ZEN3, torch.bfloat16, {}, False),  # AVX2 only: oneDNN has no bf16 reorder, torch's own bf16 path stays
    (ZEN4, torch.float32, {PACK_ENV: "off"}, False),
    (XEON, torch.float32, {PACK_ENV: "on"}, True),
])
def test_packing_is_chosen_from_the_cpu_and_dtype_and_overridden_by_the_environment(identity, dtype, environ, pack):
    chosen, why = choose_packing(identity, dtype, environ)
    assert chosen is pack and why


def test_a_bad_packing_setting_is_a_one_line_error():
    with pytest.raises(ConfigError, match="SLMCTL_PACK='yes': choose auto, on or off"):
        choose_packing(XEON, torch.float32, {PACK_ENV: "yes"})
    with pytest.raises(ConfigError, match="SLMCTL_PACK=on: oneDNN prepacks bf16 weights only on CPUs with AVX512BW"):
        choose_packing(ZEN3, torch.bfloat16, {PACK_ENV: "on"})


def test_bf16_is_found_from_the_cpu_features():
    assert has_bf16(ZEN4) and has_bf16(XEON) and not has_bf16(ZEN3)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_a_packed_model_gives_the_plain_models_logits_and_greedy_tokens(dtype, tolerance):
    if dtype == torch.bfloat16 and not BF16_PACKS_HERE:
        pytest.skip("this CPU's oneDNN cannot prepack bf16 weights (AVX2 only)")
    model = randomize(build_model("tiny", seed=0)).to(dtype).eval()  # biases too: the init's zeros would hide a lost one
    ids = torch.randint(5, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # a padded row
    with torch.inference_mode():
        plain_logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :6]).logits.float()
        plain_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    params = model.num_parameters()

    packed = pack_linears(model)
    assert packed == 45 + 1  # the 45 Linears of `tiny` and its tied LM head
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.head_product, PackedLinear)
    assert model.num_parameters() == params  # packed weights still count, the tied head's copy does not
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :6]).logits.float()
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert (logits - plain_logits).abs().max() <= tolerance * plain_logits.abs().max()
    if dtype == torch.float32:
        assert torch.equal(tokens, plain_tokens)
    with pytest.raises(RuntimeError, match="prepacked weights is for inference"):
        model.train()(input_ids=ids, decoder_input_ids=ids[:, :6])


def test_a_small_fp32_weight_takes_one_row_through_torchs_product_and_more_through_onednns():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=generator), torch.randn(96, generator=generator)
    small = PackedLinear(weight, bias).eval()
    one, three = torch.randn(1, 1, 64, generator=generator), torch.randn(1, 3, 64, generator=generator)
    with torch.inference_mode():
        assert torch.equal(small(one), torch.nn.functional.linear(one, weight, bias))  # bit for bit: the same kernel
        onednn = torch.ops.mkldnn._linear_pointwise(three, small.packed, small.bias, "none", [], "")
        assert torch.equal(small(three), onednn)
        torch.testing.assert_close(small(three), torch.nn.functional.linear(three, weight, bias), rtol=1e-4, atol=1e-4)
    assert PackedLinear(torch.randn(ONE_ROW_KEPT // 64 + 1, 64), None).one_row_weight is None  # a large one: packed only
    if BF16_PACKS_HERE:  # bf16 is packed throughout: torch's own bf16 product reorders its weight on every call
        assert PackedLinear(weight.bfloat16(), None).one_row_weight is None


def test_a_bf16_decode_step_attends_in_fp32_and_returns_bf16():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 16, generator=generator).bfloat16()
    k, v = (torch.randn(1, 2, 40, 16, generator=generator).bfloat16() for _ in range(2))
    y = attend(q, k, v, None, False, 0.0)
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, exact.bfloat16())


def test_generate_computes_in_bfloat16_prepacked_where_the_cpu_packs_it_and_an_export_refuses_the_dtype(tiny_model_dir,
                                                                                                      tmp_path):
    from conftest import cli
    from slmctl.runtime.generator import load_generator

    model = load_generator(tiny_model_dir, tmp_path / "runs", runtime="torch", dtype="bfloat16").model
    assert model.dtype == torch.bfloat16
    assert isinstance(model._modules.get("head_product"), PackedLinear) is BF16_PACKS_HERE
    result = cli("generate", tiny_model_dir, "Who is Anna?", "--dtype", "bfloat16", "--max-new-tokens", 6,
                 "--runtime", "torch", runs=tmp_path / "runs")
    assert result.exit_code == 0 and result.stdout.strip() and not result.stderr, result.output
    refused = cli("generate", tiny_model_dir, "Who is Anna?", "--dtype", "bfloat16", "--runtime", "onnx", runs=tmp_path / "runs")
    assert refused.exit_code == 2 and "--dtype bfloat16 is PyTorch's" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    bad = cli("generate", tiny_model_dir, "Who is Anna?", "--dtype", "int3", runs=tmp_path / "runs")
    assert bad.exit_code == 2 and "--dtype must be float32, bfloat16, float16" in bad.output
