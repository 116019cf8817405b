"""The decoder-only baseline of the paper's comparison, built from the same blocks:

    embed -> N x [RMSNorm -> causal GQA self-attn (RoPE from 0) -> +,
                  RMSNorm -> tanh-GELU MLP -> +] -> RMSNorm -> tied LM head

Same width, heads, MLP and vocabulary as the encoder-decoder preset it matches;
the layer count is chosen so the parameter counts agree (`matched_decoder_only`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slmctl.model.base import IGNORE_INDEX, LanguageModel, LMOutput, has_padding, padding_positions, segment_layout
from slmctl.model.cache import KVCache
from slmctl.model.config import ModelConfig
from slmctl.model.layers import RMSNorm, SelfAttentionBlock, additive_mask, init_weights


class DecoderOnlyLM(LanguageModel):
    def __init__(self, config: ModelConfig):
        if config.arch != "deconly":
            raise ValueError(f"DecoderOnlyLM needs arch='deconly', got {config.arch!r}")
        super().__init__(config)
        self.layers = nn.ModuleList(SelfAttentionBlock(config) for _ in range(config.n_decoder_layers))
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        init_weights(self)

    def hidden_states(self, input_ids, attention_mask=None, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final (normed) states [B, T, d_model]; padding may sit on either side."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            if has_padding(attention_mask):
                positions = padding_positions(attention_mask, centred=False)
            else:
                positions = torch.arange(start, start + T, device=input_ids.device)[None]
        rope = self.rope(positions, start + T, self.dtype)
        if mask is not None or start > 0:  # explicit mask, or new tokens after a filled cache
            is_causal = False
        else:
            mask, is_causal = self.self_attention_mask(attention_mask, T, causal=True)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, is_causal, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def forward(self, input_ids, attention_mask=None, labels=None, segment_ids=None) -> LMOutput:
        """Logits [B, T, vocab]; `labels` are aligned with `input_ids` and shifted inside
        (position t predicts labels[t + 1]), -100 ignored.

        Packed rows: `segment_ids` [B, T] number the documents of each row 1, 2, ... (0 =
        padding); attention never crosses a segment, positions restart in each, and no
        segment's first token is predicted from the one before it."""
        if segment_ids is None:
            hidden = self.hidden_states(input_ids, attention_mask)
        else:
            allowed, positions = segment_layout(segment_ids, causal=True, centred=False)
            hidden = self.hidden_states(input_ids, positions=positions, mask=additive_mask(allowed, self.dtype))
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            if segment_ids is not None:  # the last token of a document does not predict the next one
                targets = targets.masked_fill(segment_ids[:, 1:] != segment_ids[:, :-1], IGNORE_INDEX)
            loss = self.loss(logits[:, :-1], targets)
        return LMOutput(logits=logits, loss=loss)

    def start_decoding(self, input_ids, attention_mask, max_new_tokens) -> "DecoderOnlySession":
        return DecoderOnlySession(self, input_ids, attention_mask, max_new_tokens)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding to the left, so every prompt ends at the last column and
    new tokens can be appended in one column for the whole batch."""
    order = torch.argsort(attention_mask.long(), dim=1, stable=True)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


class DecoderOnlySession:
    """Prompt prefill into a KV cache, then one token per step."""

    def __init__(self, model: DecoderOnlyLM, input_ids, attention_mask, max_new_tokens: int):
        cfg = model.config
        self.model = model
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = left_align(input_ids, attention_mask.long())
        total = T + max_new_tokens
        self.cache = KVCache(cfg.n_decoder_layers, B, cfg.n_kv_heads, total, cfg.head_dim, model.dtype, model.device)
        self.padded = has_padding(attention_mask)
        keys = torch.cat([attention_mask.bool(), attention_mask.new_ones(B, max_new_tokens).bool()], dim=1)
        self.key_mask = additive_mask(keys[:, None, None, :], model.dtype) if self.padded else None
        self.next_position = attention_mask.sum(dim=1, keepdim=True)  # [B, 1]
        self._prompt = (input_ids, attention_mask)

    def first_logits(self) -> torch.Tensor:
        input_ids, attention_mask = self._prompt
        hidden = self.model.hidden_states(input_ids, attention_mask, cache=self.cache)
        return self.model.lm_head(hidden[:, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        end = self.cache.length + 1
        mask = self.key_mask[..., :end] if self.padded else None
        hidden = self.model.hidden_states(tokens[:, None], cache=self.cache, positions=self.next_position, mask=mask)
        self.next_position = self.next_position + 1
        return self.model.lm_head(hidden[:, -1])

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.next_position = self.next_position.index_select(0, index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
