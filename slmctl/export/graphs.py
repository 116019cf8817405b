"""The exported graphs: the model's forward passes written with plain tensor ops.

The training and generation code picks fast paths with Python branches (padding or not,
SDPA's grouped-query flag, RoPE tables cached per length) that a tracer would freeze into
one case. These modules compute the same function over the same weights with shape-driven
tensor ops only, so one traced graph serves every prompt length and cache length, with no
`If` nodes:

    VisionGraph         image crops -> projected image-token maps (tower, compression, projector)
    EncoderGraph        input_ids, attention_mask (+ image_features) -> encoder states, cross K/V per layer
    DecoderGraph        one or more decoder tokens + self-attention cache + cross K/V -> every new
                        token's logits (drafts are checked in one pass), the grown cache (empty cache
                        on the first step)
    InPlaceDecoderGraph the same function over preallocated cache buffers that ONNX Runtime's
                        GroupQueryAttention writes in place (one node per layer's self-attention)
    StaticDecoderGraph  one token + a fixed-size cache + its position -> last logits, this step's K/V
    DecoderOnlyGraph    the baseline: tokens + total attention mask + cache -> last logits, grown cache

Grouped-query attention is computed by folding each key/value head's query group into the
query length ([B, kv_heads, group * T, head_dim]), so no K/V head is ever repeated.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from slmctl.model.base import padding_positions
from slmctl.model.config import ModelConfig
from slmctl.model.layers import additive_mask, apply_rope


def rope(positions: torch.Tensor, seq_len: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [B or 1, 1, T, head_dim] for integer `positions` [B or 1, T], as
    `RotaryEmbedding` computes them (dynamic NTK base past max_seq_len when rope_factor > 1)."""
    d = cfg.head_dim
    exponent = torch.arange(0, d, 2, dtype=torch.float32) / d
    if cfg.rope_factor > 1.0:
        length = seq_len.to(torch.float32)
        scaled = cfg.rope_theta * (cfg.rope_factor * length / cfg.max_seq_len - (cfg.rope_factor - 1)) ** (d / (d - 2))
        base = torch.where(length > cfg.max_seq_len, scaled, torch.full_like(length, cfg.rope_theta))
        inv_freq = 1.0 / base ** exponent
    else:
        inv_freq = 1.0 / cfg.rope_theta ** exponent
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for q [B, H, T, d] over k, v [B, KV, S, d]; query head
    j reads key/value head j // (H / KV), as SDPA's enable_gqa does."""
    B, H, T, d = q.shape
    n_kv = k.shape[1]
    grouped = q.reshape(B, n_kv, (H // n_kv) * T, d)
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    probs = torch.softmax(scores.reshape(B, H, T, -1) + bias, dim=-1)
    return torch.matmul(probs.reshape(B, n_kv, (H // n_kv) * T, -1), v).reshape(B, H, T, d)


def linear(module: nn.Linear, x: torch.Tensor, gemm: bool = True) -> torch.Tensor:
    """A Linear over [B, T, D]: with `gemm`, one 2-D Gemm, so ONNX Runtime adds the bias inside the
    GEMM instead of in a separate pass over the output (prompts: many rows); without, a 3-D MatMul
    and an Add, which need no reshapes (decode steps: the bias pass is one row, a reshape back to
    [B, T, N] is ~6 nodes of shape arithmetic that no folding removes)."""
    if not gemm:
        return torch.nn.functional.linear(x, module.weight, module.bias)
    out = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), module.weight, module.bias)
    return out.reshape(*x.shape[:-1], module.out_features)


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm written as x / sqrt(mean(x^2) + eps) * weight: the pattern ONNX Runtime fuses
    into one SimplifiedLayerNormalization kernel."""
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm.eps) * norm.weight


def mlp(module, x: torch.Tensor, gemm: bool = True) -> torch.Tensor:
    """fc2(gelu_tanh(fc1(x))); at opset 20 the tanh GELU is one Gelu node."""
    return linear(module.fc2, torch.nn.functional.gelu(linear(module.fc1, x, gemm), approximate="tanh"), gemm)


def self_attention(attn, x: torch.Tensor, cos_sin, bias: torch.Tensor, past_k=None, past_v=None, static_slot=None,
                   gemm: bool = True):
    """(output, keys, values) of a `SelfAttention` module. With a past cache the new keys are
    appended (dynamic) or written where `static_slot` [1, 1, C, 1] is true (static; then the
    returned keys/values are only the new ones)."""
    B, T, _ = x.shape
    qk, v = linear(attn.qkv, x, gemm).split((attn.split[0] + attn.split[1], attn.split[2]), dim=-1)
    qk = apply_rope(qk.reshape(B, T, attn.n_heads + attn.n_kv_heads, attn.head_dim).transpose(1, 2), cos_sin)
    q, k = qk.split((attn.n_heads, attn.n_kv_heads), dim=1)
    v = v.reshape(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    if static_slot is not None:
        y = attend(q, torch.where(static_slot, k, past_k), torch.where(static_slot, v, past_v), bias)
    else:
        if past_k is not None:
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        y = attend(q, k, v, bias)
    return linear(attn.out, y.transpose(1, 2).reshape(B, T, -1), gemm), k, v


class GroupQueryAttention(torch.autograd.Function):
    """ONNX Runtime's com.microsoft GroupQueryAttention over a preallocated cache: q [B, T, H*d], k, v
    [B, T, KV*d] (rotated already), past key/value [B, KV, C, d], seqlens_k [B] int32 (row b's last new
    token sits at position seqlens_k[b]; its T new tokens at seqlens_k[b] - T + 1 ..), total int32 (the
    longest row's length) -> attention [B, T, H*d], present key/value [B, KV, C, d]: past with the new
    keys/values written at their positions. When past and present are bound to one buffer ONNX Runtime
    writes only the new positions (no copy of the cache a step). The forward is the reference the
    exported node is checked against; tracing emits the node."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, heads: int, kv_heads: int):
        B, T, _ = q.shape
        C, d = past_k.shape[2:]
        slots = seqlens_k.long().unsqueeze(1) + 1 - T + torch.arange(T)  # [B, T]
        index = slots[:, None, :, None].expand(B, kv_heads, T, d)
        present_k = past_k.scatter(2, index, k.reshape(B, T, kv_heads, d).transpose(1, 2))
        present_v = past_v.scatter(2, index, v.reshape(B, T, kv_heads, d).transpose(1, 2))
        visible = torch.arange(C)[None, None, :] <= slots[:, :, None]  # [B, T, C]: causal, and nothing past a row's end
        y = attend(q.reshape(B, T, heads, d).transpose(1, 2), present_k, present_v, additive_mask(visible[:, None], q.dtype))
        return y.transpose(1, 2).reshape(B, T, heads * d), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, heads: int, kv_heads: int):
        y, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total,
                                       num_heads_i=heads, kv_num_heads_i=kv_heads, outputs=3)
        y.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return y, present_k, present_v


def in_place_self_attention(attn, x: torch.Tensor, cos_sin, past_k, past_v, seqlens_k, total):
    """(output, present keys, present values) of a `SelfAttention` module through GroupQueryAttention:
    RoPE applied in the [B, T, heads, d] layout the node takes (no transposes around it)."""
    B, T, _ = x.shape
    H, KV, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qk, v = linear(attn.qkv, x, gemm=False).split((attn.split[0] + attn.split[1], attn.split[2]), dim=-1)
    cos, sin = cos_sin
    qk = apply_rope(qk.reshape(B, T, H + KV, d), (cos.transpose(1, 2), sin.transpose(1, 2)))
    q, k = qk.split((H, KV), dim=2)
    y, k, v = GroupQueryAttention.apply(q.reshape(B, T, H * d), k.reshape(B, T, KV * d), v, past_k, past_v,
                                        seqlens_k, total, H, KV)
    return linear(attn.out, y, gemm=False), k, v


def cross_attention(cross, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                    gemm: bool = True) -> torch.Tensor:
    B, T, _ = x.shape
    q = linear(cross.q, x, gemm).reshape(B, T, cross.n_heads, cross.head_dim).transpose(1, 2)
    return linear(cross.out, attend(q, k, v, bias).transpose(1, 2).reshape(B, T, -1), gemm)


def cross_memory(cross, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention keys and values [B, KV, S, d] of one decoder layer."""
    B, S, _ = hidden.shape
    kv = linear(cross.kv, hidden).reshape(B, S, 2, cross.n_kv_heads, cross.head_dim)
    return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


def key_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Attention mask [B, S] (1 = real token) -> additive bias [B, 1, 1, S]."""
    return additive_mask(mask.bool()[:, None, None, :], dtype)


def causal_bias(start: torch.Tensor, T: int, keys: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, T, keys]: query t (at position start + t) sees keys 0 .. start + t."""
    query = torch.arange(T).unsqueeze(1) + start
    return additive_mask((torch.arange(keys).unsqueeze(0) <= query)[None, None], dtype)


class VisionGraph(nn.Module):
    """pixel_values [N, 3, S, S] (crops in [0, 1]: each image's global view, then its tiles) ->
    image_tokens [N, g', g', d_model]. Assembling an image's tiles and the token cap are cheap
    index and pooling steps the caller does (slmctl.model.vlm.arrange_images)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vlm.crop_tokens(pixel_values)


class EncoderGraph(nn.Module):
    """input_ids, attention_mask [B, S] -> encoder_hidden_states [B, S, D], then cross-attention
    keys and values [B, KV, S, d] of every decoder layer (computed once per prompt).

    With `image_token_id`, a third input image_features [M, D] holds the image tokens of the
    whole batch in order; input_ids carries one image_token_id per image token (each <image>
    placeholder expanded to its image's token count), and those positions read the features."""

    def __init__(self, model, image_token_id: int | None = None):
        super().__init__()
        self.model, self.image_token_id = model, image_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor | None = None):
        model = self.model
        positions = padding_positions(attention_mask, centred=True)
        cos_sin = rope(positions, torch.tensor(input_ids.shape[1]), model.config)
        bias = key_bias(attention_mask, model.dtype)
        x = model.embed(input_ids)
        if image_features is not None:
            is_image = input_ids == self.image_token_id
            order = (torch.cumsum(is_image.reshape(-1).long(), dim=0) - 1).clamp(min=0)
            spliced = image_features.index_select(0, order).reshape(x.shape)
            x = torch.where(is_image.unsqueeze(-1), spliced, x)
        for layer in model.encoder.layers:
            x = x + self_attention(layer.attn, rms_norm(layer.attn_norm, x), cos_sin, bias)[0]
            x = x + mlp(layer.mlp, rms_norm(layer.mlp_norm, x))
        hidden = rms_norm(model.encoder.norm, x)
        memory = []
        for layer in model.decoder.layers:
            memory.extend(cross_memory(layer.cross_attn, hidden))
        return (hidden, *memory)


def _decoder_layers(model, x, cos_sin, self_bias, cross_bias, past, cross, static_slot=None, every_position=False,
                    in_place=None):
    """(logits of the last new token [B, vocab], or of every one [B, T, vocab], the new cache).
    Decode steps feed a few tokens: 3-D linears (no reshapes around them). `in_place` = (seqlens_k,
    total): self-attention through GroupQueryAttention over cache buffers (`self_bias` unused)."""
    present = []
    for i, layer in enumerate(model.decoder.layers):
        h = rms_norm(layer.self_attn_norm, x)
        if in_place is not None:
            y, k, v = in_place_self_attention(layer.self_attn, h, cos_sin, past[2 * i], past[2 * i + 1], *in_place)
        else:
            y, k, v = self_attention(layer.self_attn, h, cos_sin, self_bias, past[2 * i], past[2 * i + 1], static_slot,
                                     gemm=False)
        x = x + y
        x = x + cross_attention(layer.cross_attn, rms_norm(layer.cross_attn_norm, x), cross[2 * i], cross[2 * i + 1],
                                cross_bias, gemm=False)
        x = x + mlp(layer.mlp, rms_norm(layer.mlp_norm, x), gemm=False)
        present.extend((k, v))
    return model.lm_head(rms_norm(model.decoder.norm, x if every_position else x[:, -1])), present


class DecoderGraph(nn.Module):
    """input_ids [B, T], positions [B] (how many of row b's cached tokens are real: its new tokens sit
    at positions[b] .. positions[b] + T - 1 and see only past keys 0 .. positions[b] - 1, so rows of
    different lengths can share one call: slmctl serve's continuous batching), encoder_attention_mask
    [B, S], then per layer past key, past value [B, KV, P, d] (P = 0 on the first step), then per
    layer cross key, cross value -> logits [B, T, vocab] of every new token (token t's predict the
    token after it: a pass over the last chosen token and drafted ones checks the drafts), then per
    layer present key, value [B, KV, P + T, d] (the new tokens' keys/values at the end). With every
    positions[b] = P this is plain cached decoding."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, encoder_attention_mask: torch.Tensor,
                *cache: torch.Tensor):
        model = self.model
        n = 2 * model.config.n_decoder_layers
        past, cross = cache[:n], cache[n:]
        T, P = input_ids.shape[1], past[0].shape[2]
        new = torch.arange(T)
        cos_sin = rope(positions.unsqueeze(1) + new.unsqueeze(0), torch.tensor(P) + T, model.config)
        seen = (torch.arange(P).unsqueeze(0) < positions.unsqueeze(1)).unsqueeze(1).expand(-1, T, -1)  # [B, T, P]
        causal = (new.unsqueeze(0) <= new.unsqueeze(1)).unsqueeze(0).expand(seen.shape[0], -1, -1)  # [B, T, T]
        self_bias = additive_mask(torch.cat((seen, causal), dim=2).unsqueeze(1), model.dtype)
        logits, present = _decoder_layers(model, model.embed(input_ids), cos_sin, self_bias,
                                          key_bias(encoder_attention_mask, model.dtype), past, cross, every_position=True)
        return (logits, *present)


class InPlaceDecoderGraph(DecoderGraph):
    """`DecoderGraph`'s function over cache buffers of a fixed capacity C (export contract 3, ONNX Runtime
    only): input_ids [B, T], positions [B] (row b's cached tokens; its new ones go at positions[b] ..),
    encoder_attention_mask [B, S], per layer past key, value [B, KV, C, d], per layer cross key, value
    -> logits [B, T, vocab], per layer present key, value [B, KV, C, d]: the buffers with the new tokens'
    keys/values written at their positions. Bind each present to its past's buffer and ONNX Runtime
    writes only those positions; positions past a row's end are never read, so dropping drafts is
    lowering `positions`. ONNX Runtime takes T > 1 new tokens over a cache only at batch 1."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, encoder_attention_mask: torch.Tensor,
                *cache: torch.Tensor):
        model = self.model
        n = 2 * model.config.n_decoder_layers
        past, cross = cache[:n], cache[n:]
        T = input_ids.shape[1]
        total = positions.max() + T
        cos_sin = rope(positions.unsqueeze(1) + torch.arange(T).unsqueeze(0), total, model.config)
        in_place = ((positions + T - 1).to(torch.int32), total.to(torch.int32))
        logits, present = _decoder_layers(model, model.embed(input_ids), cos_sin, None,
                                          key_bias(encoder_attention_mask, model.dtype), past, cross, every_position=True,
                                          in_place=in_place)
        return (logits, *present)


class StaticDecoderGraph(nn.Module):
    """Fixed shapes for NPU runtimes: input_ids [B, 1], position [1] (tokens already cached),
    encoder_attention_mask [B, S], per layer past key/value [B, KV, C, d] (a preallocated cache of
    capacity C), per layer cross key/value -> logits [B, vocab], per layer this step's key/value
    [B, KV, 1, d], which the caller writes into its cache at `position`."""

    def __init__(self, model, capacity: int):
        super().__init__()
        self.model, self.capacity = model, capacity

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, encoder_attention_mask: torch.Tensor,
                *cache: torch.Tensor):
        model = self.model
        n = 2 * model.config.n_decoder_layers
        past, cross = cache[:n], cache[n:]
        slots = torch.arange(self.capacity)
        cos_sin = rope(position.unsqueeze(0), position + 1, model.config)
        self_bias = additive_mask((slots <= position)[None, None, None, :], model.dtype)
        static_slot = (slots == position)[None, None, :, None]
        logits, present = _decoder_layers(model, model.embed(input_ids), cos_sin, self_bias,
                                          key_bias(encoder_attention_mask, model.dtype), past, cross, static_slot)
        return (logits, *present)


class DecoderOnlyGraph(nn.Module):
    """The decoder-only baseline, prompt and steps alike: input_ids [B, T], attention_mask
    [B, P + T] (prompts left-padded: 0 = padding), per layer past key/value [B, KV, P, d] ->
    logits [B, vocab] of the last token, per layer present key/value [B, KV, P + T, d]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        model = self.model
        T, start = input_ids.shape[1], torch.tensor(past[0].shape[2])
        positions = padding_positions(attention_mask, centred=False)[:, -T:]
        cos_sin = rope(positions, start + T, model.config)
        bias = causal_bias(start, T, attention_mask.shape[1], model.dtype) + key_bias(attention_mask, model.dtype)
        bias = bias.clamp(min=torch.finfo(model.dtype).min)
        x = model.embed(input_ids)
        present = []
        for i, layer in enumerate(model.layers):
            y, k, v = self_attention(layer.attn, rms_norm(layer.attn_norm, x), cos_sin, bias, past[2 * i], past[2 * i + 1])
            x = x + y
            x = x + mlp(layer.mlp, rms_norm(layer.mlp_norm, x))
            present.extend((k, v))
        return (model.lm_head(rms_norm(model.norm, x[:, -1])), *present)
