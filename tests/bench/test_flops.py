"""Analytic FLOP / byte counts of slmctl.model.flops, checked by hand and against real modules."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from slmctl.model import build_model
from slmctl.model.config import get_preset
from slmctl.model.flops import Cost, bandwidth_bound_tokens_per_s, decode_cost, generation_cost, prefill_cost

# The tiny presets' numbers, written out so the hand computations below read plainly.
V, D, H, KVH, HD, FF = 512, 64, 4, 2, 16, 256
A, KV = H * HD, KVH * HD  # 64 query width, 32 key/value width


def test_presets_are_what_the_hand_computations_assume():
    for name, layers in (("tiny", (6, 3)), ("deconly-tiny", (0, 10))):
        cfg = get_preset(name)
        assert (cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (V, D, H, KVH, HD, FF)
        assert (cfg.n_encoder_layers, cfg.n_decoder_layers) == layers


# Per-token FLOPs of each piece (2 FLOPs per multiply-add).
QKV = 2 * D * (A + 2 * KV)  # fused q/k/v projection: 64 -> 128
OUT = 2 * A * D  # attention output projection: 64 -> 64
MLP = 2 * D * FF + 2 * FF * D  # 64 -> 256 -> 64
CROSS_Q = 2 * D * A  # cross-attention query: 64 -> 64
CROSS_KV = 2 * D * (2 * KV)  # cross-attention keys+values of one encoder token: 64 -> 64
LM_HEAD = 2 * D * V  # tied head for one position: 64 -> 512
PAIR = H * (2 * HD + 2 * HD)  # one (query, key) pair: score q.k plus value product, per query head


def test_hand_numbers():
    assert (QKV, OUT, MLP, CROSS_Q, CROSS_KV, LM_HEAD, PAIR) == (16384, 8192, 65536, 8192, 8192, 65536, 256)


@pytest.mark.parametrize("S", [1, 32, 512])
def test_tiny_encdec_prefill_flops_by_hand(S):
    encoder = 6 * (S * (QKV + OUT + MLP) + S * S * PAIR)  # bidirectional: S^2 pairs per layer
    cross_memory = 3 * S * CROSS_KV  # every decoder layer projects the encoder output once
    bos_step = 3 * (QKV + OUT + 1 * PAIR + CROSS_Q + OUT + S * PAIR + MLP)  # self over 1, cross over S
    expected = encoder + cross_memory + bos_step + LM_HEAD
    assert prefill_cost(get_preset("tiny"), S).flops == expected


@pytest.mark.parametrize("S,position", [(1, 1), (32, 5), (512, 1), (512, 100)])
def test_tiny_encdec_decode_flops_by_hand(S, position):
    layer = QKV + OUT + (position + 1) * PAIR + CROSS_Q + OUT + S * PAIR + MLP  # no cross k/v projection
    assert decode_cost(get_preset("tiny"), S, position).flops == 3 * layer + LM_HEAD


@pytest.mark.parametrize("S", [1, 32, 512])
def test_deconly_tiny_prefill_flops_by_hand(S):
    causal_pairs = S * (S + 1) // 2
    expected = 10 * (S * (QKV + OUT + MLP) + causal_pairs * PAIR) + LM_HEAD  # LM head on the last position only
    assert prefill_cost(get_preset("deconly-tiny"), S).flops == expected


@pytest.mark.parametrize("S,position", [(1, 1), (32, 5), (512, 100)])
def test_deconly_tiny_decode_flops_by_hand(S, position):
    cached = S + position  # prompt + generated tokens, the new one included
    assert decode_cost(get_preset("deconly-tiny"), S, position).flops == 10 * (QKV + OUT + cached * PAIR + MLP) + LM_HEAD


def test_decode_kv_bytes_by_hand():
    S, position = 40, 7
    per_position = 2 * KV * 4  # a key and a value vector, fp32
    assert decode_cost(get_preset("tiny"), S, position).kv_bytes == 3 * ((position + 1) + S) * per_position
    assert decode_cost(get_preset("deconly-tiny"), S, position).kv_bytes == 10 * (S + position) * per_position
    assert decode_cost(get_preset("tiny"), S, position, bytes_per_param=2).kv_bytes == 3 * ((position + 1) + S) * per_position // 2


@pytest.mark.parametrize("name", ["tiny", "deconly-tiny"])
def test_flops_match_torch_flop_counter_on_real_generation(name):
    """torch's FlopCounterMode (2 FLOPs per multiply-add) on the model's own decoding
    session, with the math SDPA kernel so attention shows up as matmuls: exact agreement,
    except that the math kernel computes the full S x S causal square and masks it."""
    model = build_model(name, seed=0).eval()
    cfg, S = model.config, 24
    ids = torch.randint(3, V, (1, S), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        counter = FlopCounterMode(display=False)
        with counter:
            session = model.start_decoding(ids, None, max_new_tokens=4)
            logits = session.first_logits()
        masked_half = 0 if cfg.is_encoder_decoder else cfg.n_decoder_layers * (S * S - S * (S + 1) // 2) * PAIR
        assert counter.get_total_flops() == prefill_cost(cfg, S).flops + masked_half
        for position in (1, 2, 3):
            counter = FlopCounterMode(display=False)
            with counter:
                logits = session.step(logits.argmax(dim=-1))
            assert counter.get_total_flops() == decode_cost(cfg, S, position).flops
            attended = position + 1 if cfg.is_encoder_decoder else S + position
            assert session.cache.length == attended


def _param_bytes(named_params) -> int:
    return sum(p.numel() * p.element_size() for _, p in named_params)


@pytest.mark.parametrize("dtype,bytes_per_param", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_encdec_weight_bytes_match_real_modules(dtype, bytes_per_param):
    model = build_model("tiny", seed=0).to(dtype)
    cfg = model.config
    names = [name for name, _ in model.decoder.named_parameters()]
    assert sum(".cross_attn.kv." in name for name in names) == 2 * cfg.n_decoder_layers  # weight and bias per layer
    step = [(n, p) for n, p in model.decoder.named_parameters() if ".cross_attn.kv." not in n]  # includes decoder.norm
    expected = _param_bytes(step) + _param_bytes([("embed.weight", model.embed.weight)])
    assert decode_cost(cfg, 32, 3, bytes_per_param).weight_bytes == expected
    assert prefill_cost(cfg, 32, bytes_per_param).weight_bytes == _param_bytes(model.named_parameters())  # everything once


@pytest.mark.parametrize("dtype,bytes_per_param", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_deconly_weight_bytes_match_real_modules(dtype, bytes_per_param):
    model = build_model("deconly-tiny", seed=0).to(dtype)
    cfg = model.config
    expected = (_param_bytes(model.layers.named_parameters()) + _param_bytes(model.norm.named_parameters())
                + _param_bytes([("embed.weight", model.embed.weight)]))
    assert expected == _param_bytes(model.named_parameters())  # nothing else in the model
    assert decode_cost(cfg, 32, 3, bytes_per_param).weight_bytes == expected
    assert prefill_cost(cfg, 32, bytes_per_param).weight_bytes == expected


def test_330m_decode_weight_bytes():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model("330m")
    cfg = model.config
    step_params = sum(p.numel() for n, p in model.decoder.named_parameters() if ".cross_attn.kv." not in n)
    exact = 4 * (step_params + model.embed.weight.numel())
    cost = decode_cost(cfg, 512, 1)
    assert cost.weight_bytes == exact
    # Rough estimate from the weight matrices alone (no biases or norms): within 1%.
    d, a, kv, ff, layers = 1024, 6 * 64, 3 * 64, 4096, 10
    matrices = layers * (d * (a + 2 * kv) + a * d + d * a + a * d + 2 * d * ff) + 32128 * d
    assert abs(cost.weight_bytes - 4 * matrices) / cost.weight_bytes < 0.01
    assert prefill_cost(cfg, 512).weight_bytes == 4 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny", "deconly-tiny", "330m"])
def test_prefill_grows_with_input_len(name):
    cfg = get_preset(name)
    flops = [prefill_cost(cfg, S).flops for S in (16, 32, 64)]
    assert flops[0] < flops[1] < flops[2]
    if not cfg.is_encoder_decoder:  # attention is quadratic: doubling the prompt more than doubles the increase
        assert flops[2] - flops[1] > 2 * (flops[1] - flops[0])


def test_encdec_decode_depends_on_input_len_only_through_attention():
    cfg = get_preset("tiny")
    short, long = decode_cost(cfg, 16, 4), decode_cost(cfg, 64, 4)
    assert short.weight_bytes == long.weight_bytes
    assert long.flops - short.flops == 3 * (64 - 16) * PAIR  # cross-attention over 48 more encoder positions
    assert long.kv_bytes - short.kv_bytes == 3 * (64 - 16) * 2 * KV * 4
    later = decode_cost(cfg, 16, 9)
    assert later.weight_bytes == short.weight_bytes and later.flops - short.flops == 3 * 5 * PAIR


def test_generation_cost_mean_and_total():
    cfg = get_preset("tiny")
    S, n = 32, 6
    result = generation_cost(cfg, S, n)
    steps = [decode_cost(cfg, S, p) for p in range(1, n)]
    assert result["prefill"] == prefill_cost(cfg, S)
    assert result["total_flops"] == result["prefill"].flops + sum(s.flops for s in steps)
    mean = result["decode_per_token"]
    assert mean.flops * len(steps) == sum(s.flops for s in steps)  # exact: costs are affine in the position
    assert mean.kv_bytes * len(steps) == sum(s.kv_bytes for s in steps)
    assert mean.weight_bytes == steps[0].weight_bytes
    single = generation_cost(cfg, S, 1)
    assert single["decode_per_token"] is None and single["total_flops"] == single["prefill"].flops
    with pytest.raises(ValueError):
        generation_cost(cfg, S, 0)
    with pytest.raises(ValueError):
        decode_cost(cfg, S, 0)


def test_bandwidth_bound_tokens_per_s():
    cost = Cost(flops=123, weight_bytes=900_000_000, kv_bytes=100_000_000)  # 1 GB per step
    assert bandwidth_bound_tokens_per_s(cost, 50e9) == pytest.approx(50.0)  # 50 GB/s / 1 GB
    assert bandwidth_bound_tokens_per_s(Cost(0, 3, 1), 10.0) == pytest.approx(2.5)
