"""Quantized variants of an exported model, made by ONNX Runtime's quantization tools.

- int8: dynamic quantization of the weight MatMul/Gemm nodes (int8 weights, activations
  quantized per call). `MatMulConstBOnly` keeps every activation-by-activation MatMul in fp32:
  the attention scores q k^T (and their 1/sqrt(d) scale, in self- and cross-attention) and
  probs x V stay exact.
- int4: weight-only, block-wise: every weight MatMul becomes ONNX Runtime's `MatMulNBits` (4-bit
  weights in blocks of `block_size` along the input dimension, one scale (and, asymmetric, one
  zero point) per block; activations stay fp32, or int8 inside the kernel with accuracy_level=4).
- qdq: static QuantizeLinear/DequantizeLinear pairs around weights and activations, with
  activation ranges calibrated by running the fp32 graphs on calibration prompts (the format
  QNN's HTP backend compiles; use activation_type=uint16 weight_type=uint8 for it).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from slmctl.atomic import set_new_file_mode

QUANT_TYPES = {"int8": "QInt8", "uint8": "QUInt8", "int16": "QInt16", "uint16": "QUInt16"}


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return getattr(QuantType, QUANT_TYPES[name])


@contextlib.contextmanager
def _quiet_root_logger():
    """ORT's quantizer advises pre-processing on the root logger at WARNING for every graph."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _targets(directory: Path, source: dict, prefix: str) -> dict[str, tuple[Path, Path, dict]]:
    out = {}
    for role, graph in source["graphs"].items():
        target = dict(graph, file=f"{prefix}{Path(graph['file']).name}")
        (directory / target["file"]).parent.mkdir(parents=True, exist_ok=True)
        out[role] = (directory / graph["file"], directory / target["file"], target)
    return out


def _finish(source: dict, graphs: dict, method: dict, check: bool = True) -> dict:
    """The quantized variant's description (slmctl_onnx.json), after checking each graph
    (`check=False`: graphs with ONNX Runtime's contrib ops in the default domain, which only ONNX
    Runtime itself can check, by loading them)."""
    import onnx

    for _, path, target in graphs.values():
        if check:
            onnx.checker.check_model(str(path))
        data = path.parent / f"{path.name}.data"
        target["external_data"] = data.name if data.exists() else None
        if data.exists():
            set_new_file_mode(data)  # ONNX Runtime's tools write it 0600
        target["bytes"] = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return {"graphs": {role: target for role, (_, _, target) in graphs.items()}, "cache_names": source["cache_names"],
            "static": source["static"], "quantization": method}


def quantize_int8(directory: Path, source: dict, per_channel: bool = True, reduce_range: bool = True,
                  prefix: str = "int8/") -> dict:
    """Dynamic int8 copies of the variant `source` (a slmctl_onnx.json variant) under `prefix`.
    `reduce_range`: 7-bit weights, which the u8 x s8 kernels of CPUs without VNNI cannot overflow."""
    from onnxruntime.quantization import quantize_dynamic

    graphs = _targets(directory, source, prefix)
    for src, dst, graph in graphs.values():
        with _quiet_root_logger():
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel,
                             reduce_range=reduce_range,
                             weight_type=_quant_type("int8"), use_external_data_format=bool(graph.get("external_data")),
                             extra_options={"MatMulConstBOnly": True})
    return _finish(source, graphs, {"method": "dynamic", "weights": "int8", "per_channel": per_channel,
                                    "reduce_range": reduce_range})


def gemm_as_matmul(model):
    """Rewrite every Gemm with a constant weight (torch's Linear on 2-D input: Y = A B^T + C) as
    MatMul(A, B^T) + Add(C), in place, so weight-only quantizers that take MatMul (MatMulNBits)
    reach every projection. Returns the number of nodes rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    rewritten, nodes = 0, []
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attributes.get("alpha", 1.0) == 1.0 and attributes.get("beta", 1.0) == 1.0 and not attributes.get("transA", 0)
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in weights or not plain:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        if attributes.get("transB", 0):
            weight = weight.T.copy()
        name = f"{node.input[1]}_as_matmul"
        graph.initializer.append(numpy_helper.from_array(weight, name))
        product = f"{node.output[0]}_matmul" if len(node.input) > 2 and node.input[2] else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_matmul"))
        if product != node.output[0]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return rewritten


def quantize_int4(directory: Path, source: dict, block_size: int = 32, symmetric: bool = True,
                  accuracy_level: int | None = None, embeddings: bool = True, prefix: str = "int4/") -> dict:
    """Block-wise 4-bit weight-only copies of `source` (ONNX Runtime's MatMulNBits quantizer), every
    weight Gemm first rewritten as MatMul + Add; with `embeddings`, the embedding tables too
    (Gather -> GatherBlockQuantized, blocks along the model dimension)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graphs = _targets(directory, source, prefix)
    for src, dst, graph in graphs.values():
        model = onnx.load(str(src))
        gemm_as_matmul(model)
        with _quiet_root_logger():
            ops = {"op_types_to_quantize": ("MatMul", "Gather"), "quant_axes": (("MatMul", 0), ("Gather", 1))} if embeddings else {}
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                             accuracy_level=accuracy_level, **ops)
            quantizer.process()
            quantizer.model.save_model_to_file(str(dst), use_external_data_format=bool(graph.get("external_data")))
    method = {"method": "weight-only-blockwise", "weights": "int4", "block_size": block_size, "symmetric": symmetric,
              "accuracy_level": accuracy_level, "embeddings": embeddings}
    return _finish(source, graphs, method)


class _Feeds:
    """A CalibrationDataReader over recorded input dicts."""

    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):  # some ORT versions call it
        pass


def record_feeds(onnx_model, prompts: list, steps: int) -> dict[str, list[dict]]:
    """The numpy inputs every graph of `onnx_model` (fp32) receives while greedily generating
    `steps` tokens for each prompt [1, L]: the calibration data of a static quantization."""
    recorded: dict[str, list[dict]] = {role: [] for role in onnx_model.sessions}
    onnx_model.recorder = recorded
    try:
        for ids in prompts:
            onnx_model.generate(ids, max_new_tokens=steps)
    finally:
        onnx_model.recorder = None
    return recorded


def quantize_qdq(directory: Path, source: dict, feeds: dict[str, list[dict]], activation_type: str = "uint8",
                 weight_type: str = "int8", per_channel: bool = True, prefix: str = "qdq/") -> dict:
    """Static QDQ copies of `source`, activation ranges calibrated (min/max) on `feeds`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    graphs = _targets(directory, source, prefix)
    for role, (src, dst, graph) in graphs.items():
        with _quiet_root_logger():
            quantize_static(str(src), str(dst), _Feeds(feeds[role]), quant_format=QuantFormat.QDQ,
                            activation_type=_quant_type(activation_type), weight_type=_quant_type(weight_type),
                            per_channel=per_channel, calibrate_method=CalibrationMethod.MinMax,
                            use_external_data_format=bool(graph.get("external_data")),
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    method = {"method": "static-qdq", "activations": activation_type, "weights": weight_type, "per_channel": per_channel,
              "calibration_runs": {role: len(f) for role, f in feeds.items()}}
    return _finish(source, graphs, method)
