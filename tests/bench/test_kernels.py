"""The weight-kernel probe (each route's products at small M: ONNX Runtime's kernels, made by the
export's own tools, and PyTorch's) and the op profile of an export's prefill and decode step."""

import json
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from slmctl.bench import kernels, weight_routes
from slmctl.runtime.hardware import cpu_identity
from slmctl.runtime.prepacked import packs_bf16

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def test_the_probe_times_fp32_int8_and_int4_chains_of_the_exports_kernels(tmp_path):
    paths = kernels.variant_models(64, 128, 2, tmp_path)
    ops = {name: [n.op_type for n in onnx.load(str(path)).graph.node] for name, path in paths.items()}
    assert ops["fp32"] == ["MatMul"] * 4 and ops["int4"] == ["MatMulNBits"] * 4
    assert ops["int8"].count("MatMulInteger") == 4  # fused into DynamicQuantizeMatMul when the session loads
    result = kernels.main(["--shape", "64x128", "--pairs", "2", "--calls", "3", "--routes", "ort", "--m", "1,3",
                           "--output", str(tmp_path / "k.json")])
    assert [(r["dtype"], r["m"]) for r in result["rows"]] == [(d, m) for d in ("fp32", "int8", "int4") for m in (1, 3)]
    assert all(r["us_per_product"] > 0 and r["weight_gb_s"] > 0 for r in result["rows"])
    per_weight = {r["dtype"]: r["weight_bytes"] / (64 * 128) for r in result["rows"]}
    assert per_weight["fp32"] == 4 and 1 <= per_weight["int8"] < 1.1 and per_weight["int4"] == 0.5 + 4 / 32
    assert (tmp_path / "k.json").is_file()


# the compiled routes are `slow`: a worker's first torch.compile costs 25-30 s of inductor start-up on 2 cores
COMPILED = [pytest.param(route, dtype, marks=pytest.mark.slow) for route, dtype in
            [("compile", "fp32"), ("compile", "int8"), ("compile", "int4"), ("compile-mm", "int8"), ("compile-mm", "int4")]]


@pytest.mark.parametrize("route, dtype", [("torch", "fp32"), ("torch", "int8"), ("torch", "int4"), ("torch-bf16", "int8"),
                                          ("torch-bf16", "int4"), ("onednn", "fp32"), ("onednn-bf16", "fp32"), *COMPILED,
                                          ("torchao", "int8"), ("torchao", "int4")])
def test_each_torch_route_computes_x_times_w_within_the_quantization_error(route, dtype):
    """The probe must time a kernel that computes the product, not a wrong one: each route's
    chain over one weight against x @ W (loosely: the quantization error) and, for the routes
    quantized here, against x @ dequant(quant(W)) (tightly: the kernel's own error)."""
    if route == "torchao" and not HAS_TORCHAO:
        pytest.skip("torchao is not installed")
    if route == "onednn-bf16" and not packs_bf16(cpu_identity()):
        pytest.skip("this CPU's oneDNN cannot prepack bf16 weights (AVX2 only)")
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.02  # [out, in]: int4 packing needs out % 16 == 0 and in % 32 == 0
    chain, weight_bytes = weight_routes.build(route, dtype, [w])
    loose = {"fp32": 1e-5, "int8": 0.02, "int4": 0.15}[dtype]  # int4: ~0.08 expected for Gaussian weights in groups of 32
    bf16 = route in ("torch-bf16", "onednn-bf16")  # bf16 activations and scales: ~0.4% more error
    loose += 0.01 if bf16 else 0
    quantized = {"fp32": (w,), "int8": weight_routes.quantize_int8(w), "int4": weight_routes.quantize_int4(w)}[dtype]
    for m in (1, 8):
        x = torch.randn(m, 128)
        with torch.inference_mode():
            y = chain(x)
        exact = x @ w.T
        assert y.shape == (m, 96)
        assert (y - exact).norm() / exact.norm() < loose, (route, dtype, m)
        if route != "torchao":  # torchao quantizes with its own rounding
            reference = x @ weight_routes.dequantize(dtype, quantized).T
            if bf16:
                assert y.dtype == torch.float32 and (y - reference).norm() / reference.norm() < 0.01
            else:
                torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-5)
    per_weight = weight_bytes / w.numel()
    scale_bytes = 2 if bf16 else 4
    fp32_bytes = 2 if route == "onednn-bf16" else 4  # oneDNN's bf16 route holds the weights in bf16
    assert per_weight == {"fp32": fp32_bytes, "int8": 1 + scale_bytes / 128, "int4": 0.5 + 2 * scale_bytes / 32}[dtype]


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_the_openvino_route_runs_the_compressed_weights_in_one_fused_product(dtype):
    """OpenVINO must fuse the compressed weight into FullyConnected (else the probe times a
    decompression plus an fp32 product) and compute x @ dequant(W) with it."""
    from slmctl.bench.openvino_chain import compress, dequantize, openvino_chain

    weights = kernels.chain_weights(128, 96, 1)  # x @ W layout: [128, 96], [96, 128]
    run, weight_bytes = openvino_chain(dtype, weights, threads=1)
    assert run.layer_precisions == [("FullyConnected", {"fp32": "f32", "int8": "i8", "int4": "i4"}[dtype])]
    x = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    reference, exact = x, x
    for w in weights:
        reference = reference @ (w if dtype == "fp32" else dequantize(*compress(np.ascontiguousarray(w.T), dtype)).T)
        exact = exact @ w
    y = run(x)
    if run.inference_precision == "bf16":  # a CPU with bf16 (AMX, AVX512_BF16): the plugin's activations are bf16
        assert dtype != "fp32" and np.linalg.norm(y - reference) / np.linalg.norm(reference) < 1e-2
    else:
        np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < {"fp32": 1e-5, "int8": 0.02, "int4": 0.2}[dtype]
    per_weight = weight_bytes / sum(w.size for w in weights)
    assert per_weight == {"fp32": 4, "int8": 1 + 4 / 128 / 2 + 4 / 96 / 2, "int4": 0.5 + 4 / 32}[dtype]


def test_the_numpy_route_multiplies_by_each_weight_in_turn_as_a_gemv_and_a_gemm():
    weights = kernels.chain_weights(16, 32, pairs=2)
    run, weight_bytes = kernels._timers("numpy", "fp32", 16, weights, {}, 1)
    for m in (1, 3):  # M = 1 goes through the GEMV
        x = np.random.default_rng(m).standard_normal((m, 16)).astype(np.float32)
        reference = x
        for w in weights:
            reference = reference @ w
        np.testing.assert_allclose(run(x), reference, rtol=1e-4, atol=1e-5)
    assert weight_bytes == 4 * 16 * 32 * 4
    with pytest.raises(ValueError, match="fp32 weights only"):
        kernels._timers("numpy", "int8", 16, weights, {}, 1)


def test_the_probe_returns_a_row_for_every_route_dtype_and_m_asked(monkeypatch):
    monkeypatch.setattr("slmctl.runtime.hardware.measure_read_bandwidth", lambda megabytes: 20e9)
    inputs = {}  # (route, dtype) -> the input shapes its chain ran on
    timers = kernels._timers

    def recording(route, dtype, *args):
        run, weight_bytes = timers(route, dtype, *args)
        return (lambda x: inputs.setdefault((route, dtype), set()).add(x.shape) or run(x)), weight_bytes

    monkeypatch.setattr(kernels, "_timers", recording)
    result = kernels.probe([(64, 128)], ["ort", "torch", "torchao", "nosuch"], [1, 2], pairs=1, threads=1, calls=2)
    seen = [(r["route"], r["dtype"], r["m"]) for r in result["rows"]]
    assert seen == [(route, d, m) for route in ("ort", "torch", "torchao", "nosuch") for d in ("fp32", "int8", "int4") for m in (1, 2)]
    for r in result["rows"]:
        if r["route"] == "nosuch" or (r["route"] == "torchao" and not HAS_TORCHAO):
            assert "error" in r and "us_per_product" not in r
        else:
            assert "error" not in r and r["us_per_product"] > 0
            assert r["fraction_of_bandwidth"] == pytest.approx(r["weight_gb_s"] * 1e9 / 20e9)
    assert inputs[("ort", "int8")] == inputs[("torch", "int4")] == {(1, 64), (2, 64)}  # each M timed at its own M
    torch_int4 = next(r for r in result["rows"] if r["route"] == "torch" and r["dtype"] == "int4")
    assert torch_int4["weight_bytes"] == 64 * 128 * (0.5 + 8 / 32)  # 4 bits + fp32 scale and zero per 32


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from conftest import cli, newest_run

    runs = tmp_path_factory.mktemp("op_profile") / "runs"
    assert cli("export", "onnx", "tiny", "validation.prompt_lens=[5]", "validation.steps=4", runs=runs).exit_code == 0
    return str(newest_run(runs, "export")), str(runs)


def test_the_op_profile_sums_the_encoders_kernel_time_by_op_type(tiny_export):
    from slmctl.bench import op_profile

    export, runs = tiny_export
    result = op_profile.profile(export, prompt_len=16, threads=1, runs=2, runs_dir=runs)
    assert result["role"] == "encoder" and result["variant"] == "fp32"
    assert result["ops"]["Gemm"] > 0 and abs(sum(result["ops"].values()) - result["total_ms"]) < 1e-6
    assert not list(Path.cwd().glob("slmctl_op_profile*"))  # the trace is removed once read


def test_the_op_profile_times_one_decode_step_over_a_cache(tiny_export):
    import onnxruntime as ort

    from slmctl.bench import op_profile

    export, runs = tiny_export
    result = op_profile.profile(export, prompt_len=16, threads=1, runs=2, runs_dir=runs, graph="decoder", cache_len=24)
    assert result["role"] == "decoder" and result["cache_len"] == 24
    assert set(result["counts"]) == set(result["ops"]) and all(c > 0 for c in result["counts"].values())
    assert abs(sum(result["ops"].values()) - result["total_ms"]) < 1e-6 and result["run_ms"] > 0
    assert result["counts"]["MatMul"] > 0  # the tiny decoder's weight products (3-D MatMuls: no reshapes around them)
    again = op_profile.profile(export, prompt_len=16, threads=1, runs=3, runs_dir=runs, graph="decoder", cache_len=24)
    assert again["counts"] == result["counts"]  # nodes per run, however many runs
    # the step it profiles: one new token after 24 cached ones, cross-attention over the 16-token prompt
    session = ort.InferenceSession(str(Path(export) / "export" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    feed = op_profile._feed(session, 512, "decoder", 16, 24, np.random.default_rng(0))
    assert feed["input_ids"].shape == (1, 1) and feed["positions"].tolist() == [24]
    assert feed["past_key_values.0.key"].shape[2] == 24 and feed["cross.0.key"].shape[2] == 16
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    assert outputs["present.0.key"].shape[2] == 25
    # --tokens 5: a pass checking 4 drafts, every new token's logits
    feed = op_profile._feed(session, 512, "decoder", 16, 24, np.random.default_rng(0), tokens=5)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    assert feed["input_ids"].shape == (1, 5) and outputs["logits"].shape[:2] == (1, 5)
    assert outputs["present.0.key"].shape[2] == 29


def test_the_op_profile_runs_an_in_place_decoder_as_slmctl_does(tmp_path):
    """cache=in_place: the step writes the new key into the buffer it was fed (present bound to past),
    one GroupQueryAttention node per layer, over a buffer one position longer than the cache."""
    from conftest import cli, newest_run

    from slmctl.bench import op_profile

    runs = tmp_path / "runs"
    assert cli("export", "onnx", "tiny", "cache=in_place", "validation.prompt_lens=[5]", "validation.steps=4",
               runs=runs).exit_code == 0
    export = newest_run(runs, "export")
    result = op_profile.profile(str(export), prompt_len=16, threads=1, runs=2, runs_dir=str(runs), graph="decoder",
                                cache_len=24)
    import onnxruntime as ort

    spec = json.loads((export / "export" / "slmctl_onnx.json").read_text())
    assert result["counts"]["GroupQueryAttention"] == spec["model"]["n_decoder_layers"]

    session = ort.InferenceSession(str(export / "export" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    feed = op_profile._feed(session, 512, "decoder", 16, 24, np.random.default_rng(0))
    assert feed["past_key_values.0.key"].shape[2] == 25
    names = spec["variants"]["fp32"]["cache_names"]
    before = feed["past_key_values.0.key"][0, :, 24].copy()
    op_profile._runner(session, feed, True, names)()
    assert not np.array_equal(feed["past_key_values.0.key"][0, :, 24], before)  # written where it was fed
