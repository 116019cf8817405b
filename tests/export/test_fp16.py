"""The fp16 variant: overflow measured before converting, kept-in-fp32 nodes, validation against fp32."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import cli, newest_run

from slmctl.model import build_model
from slmctl.model.store import save_model
from slmctl.runtime.onnx import SPEC_FILE, OnnxLM

FAST = ["validation.prompt_lens=[5]", "validation.steps=4", "fp16.calibration_prompts=4", "fp16.calibration_steps=8"]
# The tiny preset with one encoder and two decoder layers: the overflow check's calibration (ONNX Runtime's
# MinMax calibrator) costs the square of a graph's node count, and every property here shows at this depth.
LAYERS = {"n_encoder_layers": 1, "n_decoder_layers": 2}


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """The shallow tiny model with its initial weights."""
    return save_model(build_model("tiny", seed=0, **LAYERS), tmp_path_factory.mktemp("plain") / "model")


@pytest.fixture(scope="module")
def hot_model(tmp_path_factory):
    """The shallow tiny model with the last decoder MLP's input weights scaled 30000x: its activations,
    the residual stream after it and the final RMSNorm's squares pass fp16's 65504."""
    model = build_model("tiny", seed=0, **LAYERS)
    with torch.no_grad():
        model.decoder.layers[1].mlp.fc1.weight.mul_(3e4)
    return save_model(model, tmp_path_factory.mktemp("hot") / "model")


def test_fp16_variant_is_half_the_size_validated_and_generates_as_fp32(tmp_path, plain_model):
    result = cli("export", "onnx", plain_model, "--dtype", "fp16", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    spec = json.loads((run / "export" / SPEC_FILE).read_text())
    fp16, fp32 = spec["variants"]["fp16"], spec["variants"]["fp32"]
    assert fp16["cache_dtype"] == "float16" and 0.45 < sum(g["bytes"] for g in fp16["graphs"].values()) / sum(
        g["bytes"] for g in fp32["graphs"].values()) < 0.6
    decoder = onnx.load(str(run / "export" / fp16["graphs"]["decoder"]["file"]))
    types = {t.name: t.type.tensor_type.elem_type for t in (*decoder.graph.input, *decoder.graph.output)}
    assert types["past_key_values.0.key"] == types["present.0.key"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT  # what callers read stays fp32
    report = json.loads((run / "fp16.json").read_text())
    assert report["passed"] and report["validation"]["relative_diff"] <= report["validation"]["tolerance"] == 0.01
    assert {r["layer"] for r in report["layers"] if r["graph"] == "decoder"} >= {"decoder.layers.0", "decoder.layers.1"}
    assert all(rows == [] for rows in report["blocked"].values())
    fp32_model, fp16_model = OnnxLM(run / "export"), OnnxLM(run / "export", variant="fp16")
    prompts = torch.randint(4, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(fp32_model.generate(prompts, max_new_tokens=8), fp16_model.generate(prompts, max_new_tokens=8))


def test_overflow_fails_the_export_with_the_layer_under_policy_fail(tmp_path, hot_model):
    result = cli("export", "onnx", hot_model, "--dtype", "fp16", "--fp16-policy", "fail", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "nodes reach 32752 (fp16's max / 2)" in message and "decoder.layers.1" in message and "--fp16-policy keep" in message
    run = newest_run(tmp_path / "runs", "export")
    report = json.loads((run / "fp16.json").read_text())
    assert not report["passed"] and report["policy"] == "fail"
    assert {row["layer"] for row in report["blocked"]["decoder"]} >= {"decoder.layers.1"} and report["blocked"]["encoder"] == []
    worst = max(report["layers"], key=lambda r: r["max_abs"])
    assert worst["graph"] == "decoder" and worst["max_abs"] > 65504
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


def test_keep_policy_keeps_the_overflowing_nodes_in_fp32_where_plain_fp16_breaks(tmp_path, hot_model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    result = cli("export", "onnx", hot_model, "--dtype", "fp16", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    report = json.loads((run / "fp16.json").read_text())
    kept = {row["op"] for row in report["blocked"]["decoder"]}
    assert {"MatMul", "Pow", "ReduceMean"} <= kept and report["validation"]["relative_diff"] < 0.01
    out = run / "export"
    fp32_model, fp16_model = OnnxLM(out), OnnxLM(out, variant="fp16")
    prompts = torch.randint(4, 500, (1, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(fp32_model.generate(prompts, max_new_tokens=6), fp16_model.generate(prompts, max_new_tokens=6))
    # computed in true fp16 (the ONNX reference evaluator; ONNX Runtime's CPU provider runs most fp16
    # nodes in fp32), the same graph converted without the kept nodes overflows, ours does not
    from onnx.reference import ReferenceEvaluator

    from slmctl.export.quantize import record_feeds

    plain = convert_float_to_float16(onnx.load(str(out / "decoder.onnx")), keep_io_types=["logits"])
    feed = record_feeds(fp32_model, [prompts], 2)["decoder"][1]
    expected = fp32_model.sessions["decoder"].run(["logits"], feed)[0]
    feed = {k: v.astype(np.float16) if k.startswith(("past", "cross")) else v for k, v in feed.items()}
    with np.errstate(all="ignore"):
        assert not np.isfinite(ReferenceEvaluator(plain).run(["logits"], feed)[0]).all()
        ours = ReferenceEvaluator(str(out / "fp16" / "decoder.onnx")).run(["logits"], feed)[0]
    assert np.abs(ours - expected).max() < 0.01 * np.abs(expected).max()
