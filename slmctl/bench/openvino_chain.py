"""OpenVINO's route to a weight-only int8 / int4 product on the CPU, for the weight-kernel probe.

OpenVINO (the `openvino` package, not ONNX Runtime's OpenVINO provider) takes a weight stored
compressed as the pattern NNCF's weight compression writes: an i8 / i4 constant, Convert to
f32, Multiply by its scales (per output channel for int8, per group of 32 inputs for int4,
symmetric like the export's int4), then MatMul. The CPU plugin fuses the pattern into one
FullyConnected that reads the compressed weight (its runtime model says so: layer type
FullyConnected, precision i8 / i4), with activations quantized on the fly in groups of 32
(`DYNAMIC_QUANTIZATION_GROUP_SIZE`) where the CPU has int8 dot products.
"""

from __future__ import annotations

import numpy as np

GROUP = 32  # int4 inputs per scale, as the export's MatMulNBits block


def _i4_constant(q: np.ndarray):
    """An OpenVINO i4 constant of the int8 values `q` (-8..7): two per byte, the first in the low nibble."""
    import openvino as ov
    import openvino.opset13 as ops

    nibbles = (q.reshape(-1).astype(np.int16) & 15).astype(np.uint8)
    tensor = ov.Tensor(ov.Type.i4, list(q.shape))
    tensor.data.reshape(-1)[:] = (nibbles[0::2] | (nibbles[1::2] << 4)).view(tensor.data.dtype)
    return ops.constant(tensor)


def compress(w: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, scale fp32) of an [out, in] weight: int8 per output channel (q [out, in], scale [out, 1]),
    int4 per group of 32 inputs, symmetric (q in -8..7 [out, in / 32, 32], scale [out, in / 32, 1])."""
    if dtype == "int8":
        scale = (np.abs(w).max(axis=1, keepdims=True) / 127).astype(np.float32)
        return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale
    grouped = w.reshape(w.shape[0], -1, GROUP)
    scale = (np.abs(grouped).max(axis=-1, keepdims=True) / 7).astype(np.float32)
    return np.clip(np.round(grouped / scale), -8, 7).astype(np.int8), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The fp32 [out, in] weight that `compress`'s parts stand for."""
    return (q.astype(np.float32) * scale).reshape(q.shape[0], -1)


def _weight(w: np.ndarray, dtype: str):
    """(the [out, in] weight node of `dtype` for x @ w, w in x @ W layout [in, out]; its bytes: data + scales)."""
    import openvino as ov
    import openvino.opset13 as ops

    w = np.ascontiguousarray(w.T)  # [out, in]
    if dtype == "fp32":
        return ops.constant(w), w.nbytes
    q, scale = compress(w, dtype)
    data = ops.constant(q) if dtype == "int8" else _i4_constant(q)
    node = ops.multiply(ops.convert(data, ov.Type.f32), ops.constant(scale))
    if dtype == "int4":
        node = ops.reshape(node, ops.constant(np.array(w.shape, np.int64)), False)
    return node, (q.nbytes if dtype == "int8" else q.size // 2) + scale.nbytes


def openvino_chain(dtype: str, weights: list[np.ndarray], threads: int):
    """(run(x [M, K] fp32) -> y, weight bytes) for the chain x @ W_0 @ W_1 ... compiled for OpenVINO's
    CPU plugin with `threads` inference threads, weights stored as `dtype` ("fp32", "int8", "int4")."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([-1, weights[0].shape[0]], ov.Type.f32, name="x")
    current, total = x, 0
    for w in weights:
        node, nbytes = _weight(w, dtype)
        current, total = ops.matmul(current, node, False, True), total + nbytes
    settings = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if dtype == "fp32":  # on CPUs with bf16 (AMX, AVX512_BF16) the plugin would otherwise run, and read, fp32 weights as bf16
        settings["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = ov.Core().compile_model(ov.Model([current], [x]), "CPU", settings)
    request = compiled.create_infer_request()

    def run(x_value: np.ndarray) -> np.ndarray:
        return request.infer([x_value])[0]

    run.inference_precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # activations: f32 or bf16
    run.layer_precisions = sorted({(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                                   for op in compiled.get_runtime_model().get_ops()
                                   if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"})
    return run, total
