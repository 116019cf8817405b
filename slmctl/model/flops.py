"""Analytic cost of generating with a model: FLOPs, weight bytes and KV-cache bytes.

The benchmark compares measured latency and throughput against these counts: prefill
(everything that produces the first token) is compute-bound, so its FLOPs matter; a
batch-1 decode step is memory-bound, so the bytes it must read (every weight it uses once,
plus the cached keys/values it attends over) bound its tokens/s.

Conventions (forward pass only, batch 1):

* A multiply-add counts as 2 FLOPs (one multiply, one add), the usual convention, so a
  Linear layer of `n_in -> n_out` costs `2 * n_in * n_out` FLOPs per token and the
  numbers compare directly with hardware peak FLOP/s figures, which count the same way.
* Counted: the matmuls of every Linear layer (fused QKV, cross-attention q, k/v and out
  projections, both MLP layers), the tied LM head, and attention's two products per query
  head: scores `q . k` and the weighted sum of values, each `2 * head_dim` FLOPs per
  (query, key) pair. With grouped-query attention the key/value heads are shared, but every
  query head still does its own products, so attention costs `4 * n_heads * head_dim` FLOPs
  per (query, key) pair.
* Not counted: norms, softmax, RoPE, the GELU, residual adds and biases (all linear in the
  number of tokens times d_model or d_ff, a small fraction of the matmuls).
* `weight_bytes`: every parameter tensor the pass uses, read once, at `bytes_per_param`
  (biases and norm weights included, since they are read too). The embedding matrix is tied
  to the LM head, which reads all of it, so it is counted once (the embedding rows looked up
  for the input tokens are part of that same matrix).
* `kv_bytes`: keys and values attention reads (`n_kv_heads * head_dim` values each, per
  position and layer), each position once. For a decode step that is the self-attention
  cache (including the new token's own key/value) and, for an encoder-decoder, the
  cross-attention memory of the encoder output. For prefill it is the keys/values produced
  and attended to within the same pass, counted the same way for comparability.

Positions follow the model's own generation (`slmctl.model.encdec` / `deconly` sessions).
An encoder-decoder's decoder starts from BOS, so the step that feeds generated token
`position` attends over `position + 1` decoder positions. A decoder-only model has no extra
start token: its prefill over the prompt yields the first token, and the step that feeds
generated token `position` attends over `input_len + position` positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from slmctl.model.config import ModelConfig


@dataclass(frozen=True)
class Cost:
    flops: int  # floating point operations (a multiply-add is 2)
    weight_bytes: int  # bytes of weights that must be read (each weight read once), at `bytes_per_param`
    kv_bytes: int  # bytes of cached keys/values read (attention over the cache / encoder memory)

    @property
    def bytes(self) -> int:
        """All bytes read: weights plus keys/values."""
        return self.weight_bytes + self.kv_bytes


# ---------------------------------------------------------------------------
# FLOPs of the pieces, per token (or per query/key pair for attention)


def _linear_flops(n_in: int, n_out: int) -> int:
    """One token through a Linear layer: n_in * n_out multiply-adds."""
    return 2 * n_in * n_out


def _attention_flops_per_pair(cfg: ModelConfig) -> int:
    """Scores (q . k) plus the value product, for every query head, per (query, key) pair."""
    return 2 * (2 * cfg.head_dim) * cfg.n_heads


def _self_attention_projection_flops(cfg: ModelConfig) -> int:
    """Fused QKV projection and output projection, per token."""
    return _linear_flops(cfg.d_model, cfg.attn_width + 2 * cfg.kv_width) + _linear_flops(cfg.attn_width, cfg.d_model)


def _cross_attention_q_out_flops(cfg: ModelConfig) -> int:
    """Cross-attention query and output projections, per decoder token."""
    return _linear_flops(cfg.d_model, cfg.attn_width) + _linear_flops(cfg.attn_width, cfg.d_model)


def _cross_attention_kv_flops(cfg: ModelConfig) -> int:
    """Cross-attention key/value projection, per encoder token (once per prompt)."""
    return _linear_flops(cfg.d_model, 2 * cfg.kv_width)


def _mlp_flops(cfg: ModelConfig) -> int:
    return _linear_flops(cfg.d_model, cfg.d_ff) + _linear_flops(cfg.d_ff, cfg.d_model)


def _lm_head_flops(cfg: ModelConfig) -> int:
    """Logits for one position (tied embedding, vocab_size x d_model)."""
    return _linear_flops(cfg.d_model, cfg.vocab_size)


# ---------------------------------------------------------------------------
# Parameter counts of the pieces (exactly the module's parameter tensors)


def _linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out  # weight and bias


def _self_attention_params(cfg: ModelConfig) -> int:
    """`SelfAttention`: qkv and out."""
    return _linear_params(cfg.d_model, cfg.attn_width + 2 * cfg.kv_width) + _linear_params(cfg.attn_width, cfg.d_model)


def _cross_attention_q_out_params(cfg: ModelConfig) -> int:
    """`CrossAttention`: q and out (read at every decode step)."""
    return _linear_params(cfg.d_model, cfg.attn_width) + _linear_params(cfg.attn_width, cfg.d_model)


def _cross_attention_kv_params(cfg: ModelConfig) -> int:
    """`CrossAttention.kv` (only read once per prompt, to build the encoder memory)."""
    return _linear_params(cfg.d_model, 2 * cfg.kv_width)


def _mlp_params(cfg: ModelConfig) -> int:
    return _linear_params(cfg.d_model, cfg.d_ff) + _linear_params(cfg.d_ff, cfg.d_model)


def _self_block_params(cfg: ModelConfig) -> int:
    """`SelfAttentionBlock` (encoder layer, decoder-only layer): attention, MLP, 2 RMSNorms."""
    return _self_attention_params(cfg) + _mlp_params(cfg) + 2 * cfg.d_model


def _decoder_block_step_params(cfg: ModelConfig) -> int:
    """`CrossAttentionBlock` without `cross_attn.kv`: what one decode step reads."""
    return _self_attention_params(cfg) + _cross_attention_q_out_params(cfg) + _mlp_params(cfg) + 3 * cfg.d_model


def _embedding_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.d_model


def _kv_bytes_per_position(cfg: ModelConfig, bytes_per_param: int) -> int:
    """One key and one value vector of all key/value heads, for one layer."""
    return 2 * cfg.kv_width * bytes_per_param


# ---------------------------------------------------------------------------
# Public API


def prefill_cost(cfg: ModelConfig, input_len: int, bytes_per_param: int = 4) -> Cost:
    """Cost of producing the FIRST token from a prompt of `input_len` tokens.

    Encoder-decoder: the encoder over `input_len` tokens (bidirectional: `input_len ** 2`
    query/key pairs per layer), every decoder layer's cross-attention key/value projection of
    the encoder output, one decoder step on BOS (self-attention over 1 position,
    cross-attention over `input_len`), and the LM head for that one position.

    Decoder-only: every layer over `input_len` tokens with causal attention
    (`input_len * (input_len + 1) / 2` pairs per layer) and the LM head for the last position
    only (the only logits needed).

    Every parameter is read once, so `weight_bytes` is the whole model.
    """
    if input_len < 1:
        raise ValueError(f"input_len must be >= 1, got {input_len}")
    S, d = input_len, cfg.d_model
    kv_position = _kv_bytes_per_position(cfg, bytes_per_param)
    if cfg.is_encoder_decoder:
        encoder_layer = S * (_self_attention_projection_flops(cfg) + _mlp_flops(cfg)) + S * S * _attention_flops_per_pair(cfg)
        decoder_layer_step = (
            _self_attention_projection_flops(cfg) + 1 * _attention_flops_per_pair(cfg)
            + _cross_attention_q_out_flops(cfg) + S * _attention_flops_per_pair(cfg)
            + _mlp_flops(cfg)
        )
        flops = (
            cfg.n_encoder_layers * encoder_layer
            + cfg.n_decoder_layers * S * _cross_attention_kv_flops(cfg)
            + cfg.n_decoder_layers * decoder_layer_step
            + _lm_head_flops(cfg)
        )
        params = (
            _embedding_params(cfg)
            + cfg.n_encoder_layers * _self_block_params(cfg) + d  # + encoder final norm
            + cfg.n_decoder_layers * (_decoder_block_step_params(cfg) + _cross_attention_kv_params(cfg)) + d  # + decoder norm
        )
        kv_positions = cfg.n_encoder_layers * S + cfg.n_decoder_layers * (1 + S)  # encoder self, decoder self + cross
    else:
        layer = S * (_self_attention_projection_flops(cfg) + _mlp_flops(cfg)) + S * (S + 1) // 2 * _attention_flops_per_pair(cfg)
        flops = cfg.n_decoder_layers * layer + _lm_head_flops(cfg)
        params = _embedding_params(cfg) + cfg.n_decoder_layers * _self_block_params(cfg) + d  # + final norm
        kv_positions = cfg.n_decoder_layers * S
    return Cost(flops=flops, weight_bytes=params * bytes_per_param, kv_bytes=kv_positions * kv_position)


def decode_cost(cfg: ModelConfig, input_len: int, position: int, bytes_per_param: int = 4) -> Cost:
    """Cost of ONE decode step: feeding generated token number `position` (>= 1) to get the next.

    Encoder-decoder: every decoder layer for one token: self-attention QKV and output
    projections, attention over the `position + 1` cached decoder positions (BOS + generated
    tokens), cross-attention q and output projections (the k/v projections of the encoder
    output were done at prefill), attention over the `input_len` encoder positions, the MLP;
    then the LM head. Reads the decoder weights except `cross_attn.kv`, plus the embedding
    matrix (LM head), the self-attention cache and the cross-attention memory.

    Decoder-only: every layer for one token, attention over the `input_len + position`
    cached positions (prompt + generated tokens, the new one included); the LM head. Reads all
    weights and the cache.
    """
    if input_len < 1:
        raise ValueError(f"input_len must be >= 1, got {input_len}")
    if position < 1:
        raise ValueError(f"position must be >= 1 (position 0 is part of prefill), got {position}")
    S, d = input_len, cfg.d_model
    kv_position = _kv_bytes_per_position(cfg, bytes_per_param)
    if cfg.is_encoder_decoder:
        self_positions = position + 1
        layer = (
            _self_attention_projection_flops(cfg) + self_positions * _attention_flops_per_pair(cfg)
            + _cross_attention_q_out_flops(cfg) + S * _attention_flops_per_pair(cfg)
            + _mlp_flops(cfg)
        )
        params = _embedding_params(cfg) + cfg.n_decoder_layers * _decoder_block_step_params(cfg) + d  # + decoder norm
        kv_positions = cfg.n_decoder_layers * (self_positions + S)
    else:
        cached = S + position
        layer = _self_attention_projection_flops(cfg) + cached * _attention_flops_per_pair(cfg) + _mlp_flops(cfg)
        params = _embedding_params(cfg) + cfg.n_decoder_layers * _self_block_params(cfg) + d  # + final norm
        kv_positions = cfg.n_decoder_layers * cached
    flops = cfg.n_decoder_layers * layer + _lm_head_flops(cfg)
    return Cost(flops=flops, weight_bytes=params * bytes_per_param, kv_bytes=kv_positions * kv_position)


def generation_cost(cfg: ModelConfig, input_len: int, output_len: int, bytes_per_param: int = 4) -> dict:
    """Prefill plus `output_len - 1` decode steps (positions 1 .. output_len - 1).

    Returns {"prefill": Cost, "decode_per_token": Cost or None, "total_flops": int}:
    `decode_per_token` is the mean over the decode steps (None when `output_len == 1`, as
    there is none), rounded to integers; it is exact in practice, the costs being affine in
    the position with even coefficients. `total_flops` is exact: prefill plus every step.
    """
    if output_len < 1:
        raise ValueError(f"output_len must be >= 1, got {output_len}")
    prefill = prefill_cost(cfg, input_len, bytes_per_param)
    steps = [decode_cost(cfg, input_len, position, bytes_per_param) for position in range(1, output_len)]
    decode_flops = sum(step.flops for step in steps)
    mean = None
    if steps:
        n = len(steps)
        mean = Cost(
            flops=round(Fraction(decode_flops, n)),
            weight_bytes=round(Fraction(sum(step.weight_bytes for step in steps), n)),
            kv_bytes=round(Fraction(sum(step.kv_bytes for step in steps), n)),
        )
    return {"prefill": prefill, "decode_per_token": mean, "total_flops": prefill.flops + decode_flops}


def bandwidth_bound_tokens_per_s(cost: Cost, bytes_per_s: float) -> float:
    """Upper bound on steps/s when each step must read `cost`'s weights and keys/values from
    memory at `bytes_per_s` (batch-1 decoding is memory-bound; compute and caches ignored)."""
    return bytes_per_s / (cost.weight_bytes + cost.kv_bytes)


def forward_flops(cfg: ModelConfig, source_len: int, target_len: int = 0) -> int:
    """FLOPs of ONE teacher-forced forward pass over one row (no cache, every position at once),
    as a training step computes it.

    Encoder-decoder, `source_len` = S encoder tokens and `target_len` = T decoder tokens: every
    encoder layer over S tokens (bidirectional: S * S query/key pairs), every decoder layer over
    T tokens (causal self-attention: T * (T + 1) / 2 pairs; cross-attention: T * S pairs and its
    key/value projection of the S encoder states), and the LM head at all T positions.

    Decoder-only, `source_len` = L tokens (`target_len` ignored): every layer over L tokens with
    causal attention (L * (L + 1) / 2 pairs) and the LM head at all L positions.

    Same conventions as the rest of this module (a multiply-add is 2 FLOPs; matmuls and
    attention products only; the causal half of attention only; padding positions count, since
    they are computed).
    """
    if source_len < 1:
        raise ValueError(f"source_len must be >= 1, got {source_len}")
    S, T = source_len, target_len
    if cfg.is_encoder_decoder:
        if T < 1:
            raise ValueError(f"target_len must be >= 1 for an encoder-decoder, got {T}")
        encoder_layer = S * (_self_attention_projection_flops(cfg) + _mlp_flops(cfg)) + S * S * _attention_flops_per_pair(cfg)
        decoder_layer = (
            T * (_self_attention_projection_flops(cfg) + _cross_attention_q_out_flops(cfg) + _mlp_flops(cfg))
            + S * _cross_attention_kv_flops(cfg)
            + (T * (T + 1) // 2 + T * S) * _attention_flops_per_pair(cfg)
        )
        return cfg.n_encoder_layers * encoder_layer + cfg.n_decoder_layers * decoder_layer + T * _lm_head_flops(cfg)
    L = S
    layer = L * (_self_attention_projection_flops(cfg) + _mlp_flops(cfg)) + L * (L + 1) // 2 * _attention_flops_per_pair(cfg)
    return cfg.n_decoder_layers * layer + L * _lm_head_flops(cfg)


def training_step_flops(cfg: ModelConfig, source_len: int, target_len: int = 0, batch: int = 1) -> int:
    """FLOPs of one training step (forward + backward, optimizer excluded) over `batch` rows of
    S encoder + T decoder tokens (decoder-only: `source_len` = L tokens), by the usual
    convention that the backward pass costs twice the forward (a gradient for the inputs and
    one for the weights of every matmul): 3 x `forward_flops`. This is "model FLOPs" as in MFU
    (model FLOPs utilisation, PaLM appendix B): recomputation under activation checkpointing is
    not counted, so checkpointing lowers MFU. The AdamW update (~a dozen FLOPs per parameter,
    once per step) is left out, as it is by that convention."""
    return 3 * batch * forward_flops(cfg, source_len, target_len)
