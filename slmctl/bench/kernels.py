"""How fast each route's weight kernels read a weight matrix at decode (one token, M = 1, or a few).

A decode step of an export is a chain of weight products at small M; its speed limit is the
memory bandwidth only if the kernels stream their weights at that bandwidth. This measures
each route's kernel for fp32, int8 and int4 weights with nothing else around it: a chain of
`2 x pairs` products through distinct [K, N] and [N, K] weights (an MLP's shapes; enough of
them that even the int4 weights do not fit in the CPU's caches). Routes:

- `ort`: ONNX Runtime, the weights made by the same tools the export uses (fp32 MatMul; int8:
  `quantize_dynamic` -> DynamicQuantizeMatMul; int4: `MatMulNBitsQuantizer`, block 32,
  accuracy level 4);
- `torch`, `torch-bf16`, `compile`, `compile-mm`, `torchao`: PyTorch's routes
  (`slmctl.bench.weight_routes`: its packed int8 / int4 CPU kernels on fp32 or bf16
  activations, inductor's codegen of x @ dequant(W), torchao's weight-only quantization);
  `torch` fp32 is `F.linear`, the baseline; `onednn` / `onednn-bf16`: fp32 / bf16 weights
  prepacked once for oneDNN (slmctl.runtime.prepacked, what PyTorch inference runs on where it
  is faster; fp32 rows only);
- `numpy`: numpy's own BLAS (OpenBLAS in its wheels; the thread count is OpenBLAS's, all cores
  unless OPENBLAS_NUM_THREADS says otherwise), fp32 only: `w @ x` (a GEMV) at M = 1, `x @ w.T`
  above. The other BLAS a PyTorch process has at hand (docs/speed.md: on AMD it reads where MKL
  does not);
- `openvino`: OpenVINO's CPU plugin (the `openvino` package) on weights stored as NNCF's weight
  compression stores them (`slmctl.bench.openvino_chain`: i8 per channel, i4 in groups of 32,
  symmetric), which it runs as one FullyConnected reading the compressed weight.

It reports microseconds per product and the weight bytes (data + scales / zeros, as each route
stores them) read per second, beside the machine's read bandwidth. A kernel that reads well
below the bandwidth caps the variant's decode whatever the rest of the graph does. A route that
cannot run here (torchao not installed, no C++ compiler for inductor) gets rows with its error.

    python -m slmctl.bench.kernels --shape 1024x4096 --pairs 20 --threads 2 --routes ort,openvino,torch,torch-bf16,compile,torchao --m 1,8
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

DTYPES = ("fp32", "int8", "int4")
ROUTES = ("ort", "numpy", "openvino", "torch", "torch-bf16", "onednn", "onednn-bf16", "compile", "compile-mm", "torchao")
DEFAULT_ROUTES = "ort,openvino,torch,torch-bf16,compile,torchao"


def chain_weights(k: int, n: int, pairs: int, seed: int = 0) -> list[np.ndarray]:
    """The chain's 2 x pairs distinct weights, x @ W layout: [K, N], [N, K], ... (every route gets the same)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((k, n) if i % 2 == 0 else (n, k)) * 0.02).astype(np.float32) for i in range(2 * pairs)]


def _chain_model(k: int, n: int, pairs: int, seed: int = 0):
    """x [M, K] -> (x W_2i [K, N]) W_2i+1 [N, K] ... : 2 x pairs distinct weights."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights, current = [], [], "x"
    for i, w in enumerate(chain_weights(k, n, pairs, seed)):
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], name=f"matmul{i}"))
        current = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["m", k])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def variant_models(k: int, n: int, pairs: int, work: Path) -> dict[str, Path]:
    """fp32, int8 and int4 chains of [k, n] / [n, k] weights, made by the export's tools."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    paths = {name: work / f"{name}_{k}x{n}.onnx" for name in DTYPES}
    onnx.save(_chain_model(k, n, pairs), str(paths["fp32"]))
    quantize_dynamic(str(paths["fp32"]), str(paths["int8"]), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    quantizer = MatMulNBitsQuantizer(_chain_model(k, n, pairs), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(paths["int4"]))
    return paths


def initializer_bytes(path: Path) -> int:
    """Bytes of a chain's weights as the graph stores them (data, scales, zero points)."""
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def median_seconds(call: Callable[[], object], calls: int, warmup: int = 5) -> tuple[float, float]:
    """(median seconds of `calls` calls after `warmup` untimed ones, seconds of the first call:
    for the compile route, the compilation)."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def ort_chain(path: Path, threads: int):
    """An ONNX Runtime session of the chain, full optimisation: x [M, K] -> session.run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def _timers(route: str, dtype: str, k: int, weights: list[np.ndarray], models: dict, threads: int):
    """(run(x numpy [M, K]), weight bytes of the chain) for one route and dtype."""
    if route == "ort":
        return ort_chain(models[dtype], threads), initializer_bytes(models[dtype])
    if route == "numpy":
        return numpy_chain(dtype, weights)
    if route == "openvino":
        from slmctl.bench.openvino_chain import openvino_chain

        return openvino_chain(dtype, weights, threads)
    import torch

    from slmctl.bench.weight_routes import build

    chain, weight_bytes = build(route, dtype, [torch.from_numpy(np.ascontiguousarray(w.T)) for w in weights])

    def run(x):
        with torch.inference_mode():
            return chain(torch.from_numpy(x))

    return run, weight_bytes


def numpy_chain(dtype: str, weights: list[np.ndarray]):
    """(run(x [M, K]), weight bytes): the chain through numpy's BLAS, fp32 weights [K, N] as stored."""
    if dtype != "fp32":
        raise ValueError("numpy's BLAS multiplies fp32 weights only")
    transposed = [np.ascontiguousarray(w.T) for w in weights]  # [out, in], as nn.Linear holds them

    def run(x):
        if x.shape[0] == 1:  # a GEMV, the decode step's product
            v = x[0]
            for w in transposed:
                v = w @ v
            return v[None]
        for w in transposed:
            x = x @ w.T
        return x

    return run, sum(w.nbytes for w in weights)


def probe(shapes: list[tuple[int, int]], routes: list[str], ms: list[int], pairs: int = 20, threads: int = 2,
          calls: int = 30, dtypes: tuple[str, ...] = DTYPES) -> dict:
    """Rows of {shape, route, dtype, m, us_per_product, weight_bytes (per product), weight_gb_s,
    fraction_of_bandwidth, first_call_s}, or {..., error} where a route failed, for every
    shape x route x dtype x M."""
    import torch

    from slmctl.runtime.hardware import cpu_identity, measure_read_bandwidth

    torch.set_num_threads(threads)
    bandwidth = measure_read_bandwidth(256)
    products = 2 * pairs
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for k, n in shapes:
            weights = chain_weights(k, n, pairs)
            models = variant_models(k, n, pairs, Path(work)) if "ort" in routes else {}
            for route in routes:
                for dtype in dtypes:
                    base = {"shape": f"{k}x{n}", "route": route, "dtype": dtype}
                    try:
                        run, weight_bytes = _timers(route, dtype, k, weights, models, threads)
                    except Exception as error:  # a route that cannot run here: say why, go on with the others
                        rows += [{**base, "m": m, "error": _why(error)} for m in ms]
                        continue
                    if hasattr(run, "inference_precision"):  # OpenVINO: bf16 activations where the CPU has bf16
                        base["runtime_precision"] = run.inference_precision
                    rows += [{**base, **row} for row in _measure(run, weight_bytes, k, ms, products, calls)]
    # this shared machine's bandwidth moves between runs: measured before and after the kernels, the higher kept
    bandwidth = max(bandwidth, measure_read_bandwidth(256))
    for row in rows:
        if "weight_gb_s" in row:
            row["fraction_of_bandwidth"] = row["weight_gb_s"] * 1e9 / bandwidth
    # which of PyTorch's kernels ran: ATen's int8 weight kernel (int8mm_kernel.cpp) is vectorised for AVX-512 only
    return {"read_bandwidth_gb_s": bandwidth / 1e9, "threads": threads, "pairs": pairs, **cpu_identity(), "rows": rows}


def _measure(run, weight_bytes: int, k: int, ms: list[int], products: int, calls: int) -> list[dict]:
    """One row per M of a chain's timing, per product; an M whose run fails gets its error."""
    rows = []
    for m in ms:
        x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        try:
            seconds, first = median_seconds(lambda x=x: run(x), calls)
        except Exception as error:
            rows.append({"m": m, "error": _why(error)})
            continue
        seconds /= products
        read = weight_bytes / products
        rows.append({"m": m, "us_per_product": seconds * 1e6, "weight_bytes": read, "weight_gb_s": read / seconds / 1e9,
                     "first_call_s": first})
    return rows


def _why(error: Exception) -> str:
    """One line: the exception's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def print_table(result: dict) -> None:
    print(f"{result['cpu']} ({result['cpu_vendor']} {result['cpu_family_model']}: {' '.join(result['cpu_features'])}), "
          f"read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s, {result['threads']} threads, torch BLAS "
          f"{result['torch_blas']}, CPU capability {result['torch_cpu_capability']}")
    print(f"{'shape':>10} {'route':>10} {'dtype':>5} {'M':>3} {'us/product':>11} {'bytes/weight':>12} {'weight GB/s':>12} "
          f"{'of bandwidth':>13}")
    for r in result["rows"]:
        head = f"{r['shape']:>10} {r['route']:>10} {r['dtype']:>5} {r['m']:>3}"
        if "error" in r:
            print(f"{head} failed: {r['error']}")
            continue
        k, n = (int(v) for v in r["shape"].split("x"))
        print(f"{head} {r['us_per_product']:11.1f} {r['weight_bytes'] / (k * n):12.3f} {r['weight_gb_s']:12.1f} "
              f"{r['fraction_of_bandwidth']:13.2f}{'  (runs in ' + r['runtime_precision'] + ')' if 'runtime_precision' in r else ''}")


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", default=None, help="KxN weight (input x output), repeatable")
    parser.add_argument("--pairs", type=int, default=20, help="[K,N] + [N,K] weight pairs in the chain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--routes", default=DEFAULT_ROUTES, help=f"comma-separated, from: {', '.join(ROUTES)}")
    parser.add_argument("--m", default="1,8", help="comma-separated rows per product (1: one decode token)")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.shape or ["1024x4096"])]
    routes = _csv(args.routes)
    unknown = [r for r in routes if r not in ROUTES]
    if unknown:
        parser.error(f"unknown route(s) {', '.join(unknown)} (choose from: {', '.join(ROUTES)})")
    result = probe(shapes, routes, [int(m) for m in _csv(args.m)], args.pairs, args.threads, args.calls)
    print_table(result)
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
