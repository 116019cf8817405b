"""Roofline estimates: first-token latency and decode speed from FLOP and byte counts.

A step takes at least max(FLOPs / peak FLOP/s, bytes / bandwidth), with the peaks of a hardware
profile (slmctl.runtime.hardware: measured for this CPU, published for the rest), so on the CPU
the bench reports measured / predicted and the cost model is itself checked.
"""

from __future__ import annotations

from slmctl.model.flops import Cost


def step_seconds(cost: Cost, profile: dict) -> float:
    return max(cost.flops / profile["peak_flops"], (cost.weight_bytes + cost.kv_bytes) / profile["bandwidth"])


def pass_cost_floor(decode: Cost, tokens: int, batch: int, profile: dict) -> float:
    """The least a decoder pass over `tokens` tokens per row can cost in 1-token steps: the weights are
    read once either way and only the FLOPs grow, so a pass costs more than a step only where its FLOPs
    at the peak take longer than the weights' read (docs/speed.md: a K = 8 pass against this floor)."""
    step = step_seconds(Cost(decode.flops * batch, decode.weight_bytes, decode.kv_bytes * batch), profile)
    return step_seconds(Cost(decode.flops * batch * tokens, decode.weight_bytes, decode.kv_bytes * batch), profile) / step


def predict(prefill: Cost, decode: Cost | None, batch: int, profile: dict) -> dict:
    """Predicted first-token ms and decode tokens/s (batch B: B times the FLOPs and caches,
    weights read once)."""
    batched_prefill = Cost(prefill.flops * batch, prefill.weight_bytes, prefill.kv_bytes * batch)
    result = {"predicted_first_token_ms": step_seconds(batched_prefill, profile) * 1e3, "predicted_decode_tok_s": None}
    if decode is not None:
        batched = Cost(decode.flops * batch, decode.weight_bytes, decode.kv_bytes * batch)
        result["predicted_decode_tok_s"] = batch / step_seconds(batched, profile)
    return result
