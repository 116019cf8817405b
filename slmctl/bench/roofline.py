"""Roofline estimates: first-token latency and decode speed from FLOP and byte counts.

A step takes at least max(FLOPs / peak FLOP/s, bytes / bandwidth). Profiles in
`conf/hardware/` give peaks for devices we cannot run (with their public source); the
`this-cpu` profile is measured on the spot, so on the CPU the bench reports measured /
predicted and the cost model is itself checked.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from slmctl.bench.flops import Cost
from slmctl.config import CONF_DIR, ConfigError

HARDWARE_DIR = CONF_DIR / "hardware"


def profiles() -> list[str]:
    return sorted(p.stem for p in Path(HARDWARE_DIR).glob("*.yaml"))


def load_profile(name: str, dtype: str) -> dict:
    """{name, peak_flops (FLOP/s at `dtype`), bandwidth (bytes/s), source}; measured for this-cpu."""
    path = Path(HARDWARE_DIR) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--estimate {name}: unknown hardware profile (choose from: {', '.join(profiles())})")
    profile = OmegaConf.to_container(OmegaConf.load(path))
    if profile.get("measured"):
        from slmctl.bench.bandwidth import measure_read_bandwidth

        return {"name": name, "peak_flops": measure_matmul_flops(dtype), "bandwidth": measure_read_bandwidth(256),
                "source": profile["source"]}
    peaks = profile["peak_tflops"]
    if dtype not in peaks:
        raise ConfigError(f"--estimate {name}: no {dtype} peak in {path.name} (it has: {', '.join(peaks)})")
    return {"name": name, "peak_flops": peaks[dtype] * 1e12, "bandwidth": profile["bandwidth_gb_s"] * 1e9,
            "source": profile["source"]}


def measure_matmul_flops(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a square matmul with torch's current threads."""
    a = torch.randn(size, size, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, dtype=getattr(torch, dtype))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def step_seconds(cost: Cost, profile: dict) -> float:
    return max(cost.flops / profile["peak_flops"], (cost.weight_bytes + cost.kv_bytes) / profile["bandwidth"])


def predict(prefill: Cost, decode: Cost | None, batch: int, profile: dict) -> dict:
    """Predicted first-token ms and decode tokens/s (batch B: B times the FLOPs and caches,
    weights read once)."""
    batched_prefill = Cost(prefill.flops * batch, prefill.weight_bytes, prefill.kv_bytes * batch)
    result = {"predicted_first_token_ms": step_seconds(batched_prefill, profile) * 1e3, "predicted_decode_tok_s": None}
    if decode is not None:
        batched = Cost(decode.flops * batch, decode.weight_bytes, decode.kv_bytes * batch)
        result["predicted_decode_tok_s"] = batch / step_seconds(batched, profile)
    return result
