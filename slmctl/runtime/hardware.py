"""What this machine can do, measured rather than assumed: peak matmul FLOP/s (torch's and ONNX
Runtime's GEMM, which differ by 2x on AMD CPUs, where torch's MKL leaves AVX-512 unused), memory
read bandwidth, peak memory; and the `conf/hardware/` profiles that give the peaks of devices we
cannot run (with their public source). The `this-cpu` profile is measured on the spot.

Training (MFU), `slmctl bench` (roofline predictions, fraction of the bandwidth bound) and the
kernel probes read these.
"""

from __future__ import annotations

import platform
import re
import resource
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from slmctl.config.registry import CONF_DIR
from slmctl.errors import ConfigError

HARDWARE_DIR = CONF_DIR / "hardware"
# The CPU flags that pick kernels (oneDNN, MKL, ONNX Runtime's MLAS, ATen's packed int8/int4 paths), as /proc/cpuinfo names them.
KERNEL_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx_vnni", "avx512_bf16",
                   "avx512_fp16", "avx_ne_convert", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve", "i8mm", "bf16")


def profiles() -> list[str]:
    return sorted(p.stem for p in Path(HARDWARE_DIR).glob("*.yaml"))


def load_profile(name: str, dtype: str) -> dict:
    """{name, peak_flops (FLOP/s at `dtype`), bandwidth (bytes/s), source}; measured for this-cpu."""
    path = Path(HARDWARE_DIR) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--estimate {name}: unknown hardware profile (choose from: {', '.join(profiles())})")
    profile = OmegaConf.to_container(OmegaConf.load(path))
    if profile.get("measured"):
        from slmctl.runtime.hardware import measure_read_bandwidth

        peaks = {"torch": measure_matmul_flops(dtype)}
        if dtype == "float32":  # the faster of the two runtimes' GEMMs is the machine's roof
            peaks["onnxruntime"] = measure_onnxruntime_matmul_flops()
        best = max(peaks, key=peaks.get)
        return {"name": name, "peak_flops": peaks[best], "bandwidth": measure_read_bandwidth(256),
                "source": f"{profile['source']}; {dtype} matmul peak of {best} ("
                          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()) + ")",
                "matmul_peaks": peaks}
    peaks = profile["peak_tflops"]
    if dtype not in peaks:
        raise ConfigError(f"--estimate {name}: no {dtype} peak in {path.name} (it has: {', '.join(peaks)})")
    return {"name": name, "peak_flops": peaks[dtype] * 1e12, "bandwidth": profile["bandwidth_gb_s"] * 1e9,
            "source": profile["source"]}


def measure_matmul_flops(dtype: str = "float32", size: int = 1024, repeats: int = 5, budget_s: float = 1.0) -> float:
    """Best-of-`repeats` FLOP/s of a square matmul with torch's current threads, stopping once
    `budget_s` is spent: on a CPU without kernels for `dtype` (bf16 on AVX2: 3.5 s a product on an
    AMD EPYC 7xx3) one product already says what the peak is, and twenty would stall the run that
    asked. Its inputs come from a generator of its own: measured inside a training run, it must not
    move the global RNG (dropout after a resume would differ from the uninterrupted run's)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, dtype=getattr(torch, dtype), generator=generator)
    b = torch.randn(size, size, dtype=getattr(torch, dtype), generator=generator)
    start = time.perf_counter()
    a @ b  # warm-up, timed: when it alone exceeds the budget it is the measurement
    best = spent = time.perf_counter() - start
    if spent < budget_s:
        best = float("inf")
    for _ in range(repeats):
        if spent >= budget_s:
            break
        start = time.perf_counter()
        a @ b
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size**3 / best


def measure_onnxruntime_matmul_flops(size: int = 1024, repeats: int = 20, threads: int | None = None) -> float:
    """Best-of-`repeats` FLOP/s of ONNX Runtime's fp32 MatMul ([size, size] by a constant
    [size, size] weight, prepacked as a model's weights are), with `threads` intra-op threads
    (None: torch's current count). On CPUs where torch's BLAS leaves performance behind (MKL on
    AMD), this is the machine's real fp32 roof for an export."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
                              [numpy_helper.from_array(weight, "w")])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # any ONNX Runtime >= 1.14
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)}
    session.run(None, feed)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def measure_read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` bytes/s of reading an fp32 buffer far larger than the caches, by the faster
    of two kernels: torch's sum (torch's current threads, the ones the model gets) and a matrix-vector
    product through numpy's BLAS (its own threads, up to every core). A bound must be one that no
    kernel beats: on a 2-core AMD EPYC (Zen 3) torch's sum read 23-25 GB/s while ONNX Runtime's fp32
    MatMul streamed a weight at 28.8 and numpy's GEMV at 28-40 (2026-12-07); more threads than the
    model has can only raise the bound, never flatter a fraction of it."""
    import numpy as np

    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    matrix = buffer.numpy().reshape(-1, 1024)
    vector = np.ones(1024, dtype=np.float32)
    reads = (buffer.sum, lambda: matrix @ vector)
    for read in reads:
        read()  # fault the pages in, load the BLAS, before timing
    best = float("inf")
    for _ in range(repeats):
        for read in reads:
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def gpu_profile(device_name: str) -> str | None:
    """The conf/hardware profile whose name appears in a CUDA device's name ("NVIDIA H100 80GB
    HBM3" -> h100), or None when none does."""
    name = device_name.lower().replace(" ", "").replace("-", "")
    gpus = [p for p in profiles() if p != "this-cpu" and not p.endswith("-npu")]
    found = [p for p in gpus if p.replace("-", "") in name]
    return max(found, key=len) if found else None


def device_peak_flops(device: str, dtype: str = "float32") -> tuple[float | None, str]:
    """(peak FLOP/s at `dtype`, where it comes from) for MFU. CPU (and MPS, measured on the CPU):
    `measure_matmul_flops` now, with torch's current threads (the ones training uses). CUDA:
    the conf/hardware profile of the GPU (fp32 counts as tf32 when torch lets matmuls use it);
    (None, why) when no profile matches."""
    if device != "cuda":
        # best of 20 (~0.2 s): a moment when no other process shares the cores
        return measure_matmul_flops(dtype, repeats=20), f"measured: {dtype} 1024x1024 matmul, {torch.get_num_threads()} threads"
    gpu = torch.cuda.get_device_name()
    name = gpu_profile(gpu)
    if name is None:
        return None, f"no conf/hardware profile matches {gpu!r}"
    if dtype == "float32" and torch.get_float32_matmul_precision() != "highest":
        dtype = "tf32"
    peaks = OmegaConf.to_container(OmegaConf.load(Path(HARDWARE_DIR) / f"{name}.yaml"))["peak_tflops"]
    if dtype not in peaks:
        return None, f"conf/hardware/{name}.yaml has no {dtype} peak"
    return peaks[dtype] * 1e12, f"conf/hardware/{name}.yaml: {dtype}"


def reset_peak_memory(device: str) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's high-water mark
    of resident memory (writing 5 to /proc/self/clear_refs), so each model gets its own peak."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's since it started


def peak_memory_mb(device: str) -> float:
    """Peak allocated memory on CUDA; otherwise the peak resident set size since the last reset."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in open("/proc/self/status", encoding="utf-8"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def cpu_identity() -> dict:
    """Which CPU timed a record: name, vendor, the kernel-picking features it has, torch's BLAS and CPU capability.
    Speeds from different CPUs (an AMD EPYC's MKL fp32 GEMV against an Intel Xeon's) are not comparable."""
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "vendor_id", "cpu family", "model", "flags", "Features") and key not in info:
                info[key] = value.strip()
            if key == "" and info:  # the first processor's block is enough
                break
    except OSError:
        pass
    flags = set((info.get("flags") or info.get("Features") or "").split())
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_vendor": info.get("vendor_id", ""),
            "cpu_family_model": f"{info['cpu family']}/{info['model']}" if "cpu family" in info and "model" in info else "",
            "cpu_features": [f for f in KERNEL_FEATURES if f in flags],
            "torch_blas": blas.group(1) if blas else "unknown",
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}

