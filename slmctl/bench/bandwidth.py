"""The machine's measured memory read bandwidth: the ceiling for batch-1 decoding,
which must read every decoder weight once per token."""

from __future__ import annotations

import time

import torch


def measure_read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` bytes/s of summing an fp32 buffer far larger than the caches,
    with torch's current thread count (the same threads the model gets)."""
    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    buffer.sum()  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best
