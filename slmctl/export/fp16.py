"""The fp16 variant (`--dtype fp16`), for GPU and NPU providers, with the overflow checked first.

fp16 holds magnitudes up to 65504; a transformer's residual stream, an RMSNorm's squared
activations or a scaled-up weight can pass that, and the result is inf/NaN on the device and
nothing on the CPU that exported it. So before converting:

1. the fp32 graphs run the calibration prompts (greedy generation, every graph's inputs
   recorded) through ONNX Runtime's MinMax calibrator, which reports every float tensor's
   range; a node's magnitude is the largest of its inputs (activations and weights) and
   outputs, masking values (torch.finfo.min) aside;
2. each node is attributed to the layer whose weights it last followed in graph order
   (`decoder.layers.3`, ...), and the report gives the largest magnitude per layer;
3. nodes that read or write magnitudes at or above fp16's maximum / `margin` (2x by default)
   are kept in fp32
   (`policy=keep`: ONNX Runtime's float16 converter puts casts around them) or the export
   fails with the report (`policy=fail`, exit 1).

The converted graphs keep fp32 logits and encoder states at their boundary; caches are
fp16. The variant is validated against the fp32 graphs on the same prompts: the largest
logit difference relative to the largest fp32 logit must stay within `tolerance`.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np

from slmctl.errors import RunFailure

FP16_MAX = 65504.0
# graph boundary tensors kept fp32: what callers read (logits, encoder states) or feed (image features)
KEEP_FP32 = ("logits", "encoder_hidden_states", "image_features", "pixel_values")
MASK_FILL = -1e30  # at or below: a masking value, not an activation
CONSTANTS = ("Constant", "ConstantOfShape")  # their values are clamped to fp16's range by the converter
LAYER = re.compile(r"^(?:model\.)?((?:[a-z_]+\.)*?layers\.\d+)\.")


class Fp16Overflow(RunFailure):
    """Activations or weights too close to fp16's maximum with policy=fail: exit 1."""


def tensor_ranges(path: Path, feeds: list[dict], external_data: bool) -> dict[str, float]:
    """{tensor name: largest |value|} over `feeds`, from ONNX Runtime's MinMax calibrator."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from slmctl.export.quantize import _Feeds, _quiet_root_logger

    with tempfile.TemporaryDirectory() as work, _quiet_root_logger():
        calibrator = create_calibrator(str(path), [], augmented_model_path=str(Path(work) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external_data)
        calibrator.collect_data(_Feeds(feeds))
        ranges = calibrator.compute_data()
    return {name: _magnitude(float(np.min(r.range_value[0])), float(np.max(r.range_value[1])))
            for name, r in ranges.data.items()}


def _magnitude(low: float, high: float) -> float:
    """The largest |value|, ignoring attention masks' finite -inf (torch.finfo.min and the like):
    in fp16 it becomes -inf or -65504, which softmax reads as the zero weight it means."""
    return max((abs(v) for v in (low, high) if v > MASK_FILL), default=0.0)


def layer_of(name: str, default: str) -> str:
    """`model.decoder.layers.3.mlp.fc1.weight` -> `decoder.layers.3`; other weights -> their module."""
    match = LAYER.match(name)
    if match:
        return match.group(1)
    if name.startswith(("onnx::", "/")):
        return default
    module = name.removeprefix("model.").rsplit(".", 1)[0]
    return module or default


def node_magnitudes(model, ranges: dict[str, float]) -> list[dict]:
    """Per node in graph order: {node, op, layer, max_abs} over what it reads (activations and
    weights) and writes: a node fed an out-of-range tensor computes garbage in fp16 even when its
    own result is small (an RMSNorm's x * rsqrt(mean(x^2)))."""
    from onnx import numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    weight_max: dict[str, float] = {}
    layer, rows = "embeddings", []
    for node in model.graph.node:
        named = [i for i in node.input if i in weights and not i.startswith(("onnx::", "/"))]
        if named:
            layer = layer_of(named[0], layer)
        largest = max((ranges.get(t, 0.0) for t in (*node.input, *node.output)), default=0.0)  # read or written
        for name in node.input:
            if name in weights and weights[name].data_type == 1:  # float weights
                if name not in weight_max:
                    weight_max[name] = float(np.abs(numpy_helper.to_array(weights[name])).max(initial=0.0))
                largest = max(largest, weight_max[name])
        rows.append({"node": node.name, "op": node.op_type, "layer": layer, "max_abs": largest})
    return rows


def overflow_report(magnitudes: dict[str, list[dict]], margin: float) -> dict:
    """{threshold, layers: [{graph, layer, max_abs, node, op}], blocked: {graph: [{node, op, layer, max_abs}]}}"""
    threshold = FP16_MAX / margin
    layers, blocked = [], {}
    for role, rows in magnitudes.items():
        worst: dict[str, dict] = {}
        for row in rows:
            if row["op"] in CONSTANTS:
                continue
            if row["layer"] not in worst or row["max_abs"] > worst[row["layer"]]["max_abs"]:
                worst[row["layer"]] = row
        layers += [{"graph": role, "layer": layer, "max_abs": row["max_abs"], "node": row["node"], "op": row["op"]}
                   for layer, row in worst.items()]
        blocked[role] = [row for row in rows if row["max_abs"] >= threshold and row["op"] not in CONSTANTS]
    return {"fp16_max": FP16_MAX, "margin": margin, "threshold": threshold, "layers": layers, "blocked": blocked}


def convert(directory: Path, source: dict, blocked: dict[str, list[dict]], prefix: str = "fp16/") -> dict:
    """fp16 copies of the variant `source`, the `blocked` nodes kept in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    from slmctl.export.quantize import _finish, _targets

    graphs = _targets(directory, source, prefix)
    for role, (src, dst, graph) in graphs.items():
        kept = {r["node"] for r in blocked[role]}
        model = _typed_outside(src, kept)
        boundary = [t.name for t in (*model.graph.input, *model.graph.output) if t.name in KEEP_FP32]
        converted = convert_float_to_float16(model, keep_io_types=boundary, node_block_list=sorted(kept), disable_shape_infer=True)
        OnnxModel(converted).topological_sort()  # the converter appends the casts around kept nodes at the end
        onnx.save(converted, str(dst), save_as_external_data=bool(graph.get("external_data")),
                  location=f"{dst.name}.data" if graph.get("external_data") else None)
        fp16_io = {t.name for t in (*converted.graph.input, *converted.graph.output) if t.type.tensor_type.elem_type == 10}
        for entry in (*graph["inputs"], *graph["outputs"]):
            if entry["name"] in fp16_io:
                entry["dtype"] = "float16"
    variant = _finish(source, graphs, {"method": "fp16", "kept_fp32": {role: len(rows) for role, rows in blocked.items()}})
    variant["cache_dtype"] = "float16"
    return variant


def _typed_outside(path: Path, kept: set[str]):
    """The graph with inferred types for every tensor except those running between two kept
    nodes. ONNX Runtime's converter makes every typed tensor fp16 and wraps each kept node in
    casts on its own, so a tensor passed from one kept node to the next would still be rounded
    to fp16 (and overflow); untyped, it stays fp32 inside the kept region."""
    import onnx

    with tempfile.TemporaryDirectory() as work:  # by path: graphs over 2 GB carry external data
        inferred = Path(work) / "inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
        onnx.load_external_data_for_model(model, str(path.parent))
    graph = model.graph
    producer = {output: node.name for node in graph.node for output in node.output}
    readers: dict[str, set] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name)
    outputs = {o.name for o in graph.output}
    inside = {t for t, node in producer.items() if node in kept and t not in outputs and readers.get(t) and readers[t] <= kept}
    typed = [info for info in graph.value_info if info.name not in inside]
    del graph.value_info[:]
    graph.value_info.extend(typed)
    return model


def export_fp16(cfg, run, out: Path, model, source: Path | None, fp32_model, fp32: dict) -> tuple[dict | None, dict]:
    """(the fp16 variant or None when policy=fail tripped, the report for fp16.json)."""
    from slmctl.export.quality import _prompts
    from slmctl.export.quantize import record_feeds
    from slmctl.export.validate import compare_decoding, token_agreement
    import onnx

    from slmctl.runtime.onnx import OnnxLM

    settings = cfg.fp16
    prompts = _prompts(cfg, model, source)[0][: settings.calibration_prompts]
    feeds = record_feeds(fp32_model, prompts, settings.calibration_steps)
    magnitudes = {}
    for role, graph in fp32["graphs"].items():
        path = out / graph["file"]
        ranges = tensor_ranges(path, feeds[role], bool(graph.get("external_data")))
        magnitudes[role] = node_magnitudes(onnx.load(str(path)), ranges)
    report = overflow_report(magnitudes, settings.margin) | {"policy": settings.policy, "calibration_prompts": len(prompts),
                                                             "calibration_steps": settings.calibration_steps}
    blocked = sum(len(rows) for rows in report["blocked"].values())
    worst = max(report["layers"], key=lambda r: r["max_abs"])
    run.log(f"fp16: largest magnitude {worst['max_abs']:.4g} ({worst['graph']} {worst['layer']}, {worst['op']} {worst['node']}); "
            f"{blocked} nodes at or above {report['threshold']:.0f} (fp16 max / {settings.margin:g})")
    if blocked and settings.policy == "fail":
        return None, report | {"passed": False}
    variant = convert(out, fp32, report["blocked"])
    spec = dict(fp32_model.spec, variants={"fp32": fp32, "fp16": variant})
    fp16_model = OnnxLM(out, threads=cfg.threads, variant="fp16", spec=spec)
    worst_diff = largest = 0.0
    for ids in prompts:
        result = compare_decoding(fp32_model, fp16_model, ids, None, settings.calibration_steps)
        worst_diff = max(worst_diff, result["max_abs_logit_diff"])
        largest = max(largest, result["max_abs_logit"])
    agreement = token_agreement(fp32_model, fp16_model, prompts, settings.calibration_steps)
    relative = worst_diff / max(largest, 1e-12)
    validation = {"max_abs_logit_diff": worst_diff, "max_abs_logit": largest, "relative_diff": relative,
                  "tolerance": settings.tolerance, "passed": relative <= settings.tolerance, **agreement}
    run.log(f"fp16 vs fp32: max |logit diff| {worst_diff:.3g} = {relative:.2e} of the largest logit (tolerance "
            f"{settings.tolerance:g}), token agreement {agreement['token_agreement']:.3f}")
    return variant, report | {"passed": validation["passed"], "validation": validation}

