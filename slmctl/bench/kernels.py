"""How fast ONNX Runtime's own weight kernels read a weight matrix at decode (one token, M = 1).

A decode step of an export is a chain of weight products at M = 1; its speed limit is the
memory bandwidth only if the kernels stream their weights at that bandwidth. This measures
each variant's kernel in a graph of nothing else: a chain of `2 x pairs` products through
distinct [K, N] and [N, K] weights (an MLP's shapes; enough of them that even the int4 weights
do not fit in the CPU's caches), made by the same tools the export uses (fp32 MatMul; int8:
`quantize_dynamic` -> DynamicQuantizeMatMul; int4: `MatMulNBitsQuantizer`, block 32, accuracy
level 4). It reports microseconds per product and the weight bytes read per second, beside the
machine's read bandwidth. A kernel that reads well below the bandwidth caps the variant's
decode whatever the rest of the graph does.

    python -m slmctl.bench.kernels --shape 1024x4096 --pairs 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 1.0, "int4": 0.5 + 4 / 32}  # int4: 4 bits + an fp32 scale per 32


def _chain_model(k: int, n: int, pairs: int, seed: int = 0):
    """x [1, K] -> (x W_2i [K, N]) W_2i+1 [N, K] ... : 2 x pairs distinct weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, current = [], [], "x"
    for i in range(2 * pairs):
        shape = (k, n) if i % 2 == 0 else (n, k)
        weights.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], name=f"matmul{i}"))
        current = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, k])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def variant_models(k: int, n: int, pairs: int, work: Path) -> dict[str, Path]:
    """fp32, int8 and int4 chains of [k, n] / [n, k] weights, made by the export's tools."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    paths = {name: work / f"{name}_{k}x{n}.onnx" for name in ("fp32", "int8", "int4")}
    onnx.save(_chain_model(k, n, pairs), str(paths["fp32"]))
    quantize_dynamic(str(paths["fp32"]), str(paths["int8"]), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    quantizer = MatMulNBitsQuantizer(_chain_model(k, n, pairs), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(paths["int4"]))
    return paths


def time_call(path: Path, k: int, threads: int, calls: int) -> float:
    """Median seconds of one M = 1 pass through the chain (after warm-up), full optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> dict:
    import torch

    from slmctl.runtime.hardware import measure_read_bandwidth

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", default=None, help="KxN weight (input x output), repeatable")
    parser.add_argument("--pairs", type=int, default=20, help="[K,N] + [N,K] weight pairs in the chain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.shape or ["1024x4096"])]
    torch.set_num_threads(args.threads)
    bandwidth = measure_read_bandwidth(256)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for k, n in shapes:
            for name, path in variant_models(k, n, args.pairs, Path(work)).items():
                seconds = time_call(path, k, args.threads, args.calls) / (2 * args.pairs)  # per product
                read = k * n * BYTES_PER_WEIGHT[name]
                rows.append({"shape": f"{k}x{n}", "variant": name, "us_per_product": seconds * 1e6,
                             "weight_gb_s": read / seconds / 1e9, "fraction_of_bandwidth": read / seconds / bandwidth})
    result = {"read_bandwidth_gb_s": bandwidth / 1e9, "threads": args.threads, "rows": rows}
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {args.threads} threads")
    print(f"{'shape':>10} {'variant':>7} {'us/product':>11} {'weight GB/s':>12} {'of bandwidth':>13}")
    for r in rows:
        print(f"{r['shape']:>10} {r['variant']:>7} {r['us_per_product']:11.1f} {r['weight_gb_s']:12.1f} "
              f"{r['fraction_of_bandwidth']:13.2f}")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
