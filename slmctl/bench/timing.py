"""First-token latency and decode throughput of one generation call.

The clock starts when the (already tokenised) prompt goes in; the first token is
timestamped by a streaming callback, so first-token latency is prompt in -> first
token out (encoder + first decoder step for an encoder-decoder, prompt prefill for
a decoder-only model), and decode tokens/s covers only the tokens after it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class GenerationTiming:
    first_token_s: float
    decode_tokens_per_s: float
    total_s: float
    new_tokens: int


def time_generation(run: Callable[[Callable[[], None]], int]) -> GenerationTiming:
    """`run(on_token)` generates, calling `on_token()` once per new token, and returns
    the number of new tokens."""
    stamps: list[float] = []
    start = time.perf_counter()
    new_tokens = run(lambda: stamps.append(time.perf_counter()))
    end = time.perf_counter()
    if not stamps:
        raise RuntimeError("the generation produced no token")
    decode_s = end - stamps[0]
    rate = (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else float("nan")
    return GenerationTiming(stamps[0] - start, rate, end - start, new_tokens)


def summarize(timings: list[GenerationTiming]) -> dict:
    """Median / p90 / stdev of first-token latency and decode rate over repeats."""
    def stats(values: list[float]) -> dict:
        ordered = sorted(values)
        return {
            "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
            "stdev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        }

    return {
        "first_token_s": stats([t.first_token_s for t in timings]),
        "decode_tokens_per_s": stats([t.decode_tokens_per_s for t in timings]),
        "total_s": stats([t.total_s for t in timings]),
        "new_tokens": timings[0].new_tokens,
        "repeats": len(timings),
    }
