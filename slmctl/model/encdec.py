"""The paper's encoder-decoder LM ("Return of the Encoder", the 330M "Mu").

    encoder:  embed -> N x [RMSNorm -> bidirectional GQA self-attn (RoPE, centred) -> +,
                            RMSNorm -> tanh-GELU MLP -> +] -> RMSNorm
    decoder:  embed -> M x [RMSNorm -> causal GQA self-attn (RoPE from 0) -> +,
                            RMSNorm -> cross-attn over the encoder output (no RoPE) -> +,
                            RMSNorm -> tanh-GELU MLP -> +] -> RMSNorm -> tied LM head

One embedding matrix serves encoder input, decoder input and the LM head.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slmctl.model.base import IGNORE_INDEX, LanguageModel, LMOutput, has_padding, padding_positions, segment_layout
from slmctl.model.cache import KVCache
from slmctl.model.config import ModelConfig
from slmctl.model.layers import CrossAttentionBlock, RMSNorm, SelfAttentionBlock, additive_mask, init_weights


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(SelfAttentionBlock(cfg) for _ in range(cfg.n_encoder_layers))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionBlock(cfg) for _ in range(cfg.n_decoder_layers))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class EncoderDecoderLM(LanguageModel):
    def __init__(self, config: ModelConfig):
        if not config.is_encoder_decoder:
            raise ValueError(f"EncoderDecoderLM needs arch='encdec', got {config.arch!r}")
        super().__init__(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        init_weights(self)

    # -- encoder -------------------------------------------------------------

    def encode(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
               inputs_embeds: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final (normed) encoder states [B, S, d_model] of token ids, or of `inputs_embeds`
        [B, S, d_model] (token embeddings with image tokens spliced in). With `segment_ids`
        [B, S] (packed rows, see `segment_layout`) every document is encoded as if alone."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        if segment_ids is not None:
            allowed, positions = segment_layout(segment_ids, causal=False, centred=True)
            mask = additive_mask(allowed, self.dtype)
        else:
            if has_padding(attention_mask):
                positions = padding_positions(attention_mask, centred=True)
            else:
                positions = (torch.arange(S, device=x.device) - (S - 1) // 2)[None]
            mask, _ = self.self_attention_mask(attention_mask, S, causal=False)
        rope = self.rope(positions, S, self.dtype)
        for layer in self.encoder.layers:
            x = layer(x, rope, mask, False)
        return self.encoder.norm(x)

    def memory_mask(self, attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None = None,
                    decoder_segment_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Additive cross-attention mask [B, 1, 1, S] hiding encoder padding, or None. Packed
        rows (both segment ids given): [B, 1, T, S], decoder segment k sees encoder segment k only."""
        if decoder_segment_ids is not None:
            return additive_mask(decoder_segment_ids[:, None, :, None] == segment_ids[:, None, None, :], self.dtype)
        if not has_padding(attention_mask):
            return None
        return additive_mask(attention_mask.bool()[:, None, None, :], self.dtype)

    # -- decoder -------------------------------------------------------------

    def decode(self, decoder_input_ids, encoder_out, memory_mask=None, decoder_attention_mask=None,
               memory=None, cache: KVCache | None = None, start: int = 0,
               decoder_segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final (normed) decoder states [B, T, d_model]. With a `cache`, the T new tokens
        sit at positions start..start+T-1 after the cached ones. With `decoder_segment_ids`
        (packed rows, teacher forcing only) every segment is decoded as if alone."""
        B, T = decoder_input_ids.shape
        reach = start + T
        if decoder_segment_ids is not None:
            if cache is not None:
                raise ValueError("decoder_segment_ids are for teacher-forced packed rows, not cached decoding")
            allowed, positions = segment_layout(decoder_segment_ids, causal=True, centred=False)
            mask, is_causal = additive_mask(allowed, self.dtype), False
        else:
            if cache is not None:  # the cache says where each row's new tokens sit and which keys they see
                positions, mask, is_causal, reach = cache.layout(start, T, self.dtype)
            else:
                if has_padding(decoder_attention_mask):
                    positions = padding_positions(decoder_attention_mask, centred=False)
                else:
                    positions = torch.arange(start, start + T, device=decoder_input_ids.device)[None]
                mask, is_causal = self.self_attention_mask(decoder_attention_mask, T, causal=True)
        rope = self.rope(positions, reach, self.dtype)
        if memory is None:
            memory = [layer.cross_attn.memory(encoder_out) for layer in self.decoder.layers]
        x = self.embed(decoder_input_ids)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, rope, mask, is_causal, memory[i], memory_mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.decoder.norm(x)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, inputs_embeds=None, segment_ids=None, decoder_segment_ids=None) -> LMOutput:
        """Teacher-forced logits [B, T, vocab]. Without `decoder_input_ids`, the decoder
        sees BOS + labels[:-1] (labels of -100 become padding).

        Packed rows: `segment_ids` [B, S] and `decoder_segment_ids` [B, T] number the documents
        of each row 1, 2, ... (0 = padding); decoder segment k is the target of encoder segment k.
        Attention never crosses a segment and positions restart in each, so every document
        gets the logits it would get alone."""
        if (segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("packed rows need both segment_ids and decoder_segment_ids")
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels, decoder_segment_ids)
        encoder_out = self.encode(input_ids, attention_mask, inputs_embeds, segment_ids)
        memory_mask = self.memory_mask(attention_mask, segment_ids, decoder_segment_ids)
        hidden = self.decode(decoder_input_ids, encoder_out, memory_mask, decoder_attention_mask,
                             decoder_segment_ids=decoder_segment_ids)
        logits = self.lm_head(hidden)
        loss = self.loss(logits, labels) if labels is not None else None
        return LMOutput(logits=logits, loss=loss, encoder_hidden_states=encoder_out)

    def shift_right(self, labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """BOS + labels[:-1]; with `segment_ids`, every segment starts with its own BOS."""
        start = labels.new_full((labels.shape[0], 1), self.config.bos_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        if segment_ids is not None:
            starts = torch.ones_like(segment_ids, dtype=torch.bool)
            starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            shifted = shifted.masked_fill(starts, self.config.bos_token_id).masked_fill(segment_ids == 0, IGNORE_INDEX)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    # -- generation ----------------------------------------------------------

    def start_decoding(self, input_ids, attention_mask, max_new_tokens, inputs_embeds=None) -> "EncoderDecoderSession":
        return EncoderDecoderSession(self, input_ids, attention_mask, max_new_tokens, inputs_embeds)


class EncoderDecoderSession:
    """Incremental decoding state: the encoder runs once, every decoder layer's
    cross-attention keys/values are computed once, self-attention grows a KV cache."""

    def __init__(self, model: EncoderDecoderLM, input_ids, attention_mask, max_new_tokens: int, inputs_embeds=None):
        cfg = model.config
        self.model = model
        encoder_out = model.encode(input_ids, attention_mask, inputs_embeds)
        self.memory = [layer.cross_attn.memory(encoder_out) for layer in model.decoder.layers]
        self.memory_mask = model.memory_mask(attention_mask)
        self.batch_size = encoder_out.shape[0]
        self.cache = KVCache(cfg.n_decoder_layers, self.batch_size, cfg.n_kv_heads, max_new_tokens + 1,
                             cfg.head_dim, model.dtype, model.device)

    def first_logits(self) -> torch.Tensor:
        """Logits [B, vocab] for the first new token (the decoder reads BOS)."""
        bos = torch.full((self.batch_size,), self.model.config.bos_token_id, dtype=torch.long, device=self.model.device)
        return self.step(bos)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; logits [B, vocab] for the next one."""
        hidden = self.model.decode(tokens[:, None], None, self.memory_mask, memory=self.memory,
                                   cache=self.cache, start=self.cache.length)
        return self.model.lm_head(hidden[:, -1])

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed T tokens per row [B, T] in one decoder pass (the last chosen token, then drafted
        ones; each sees the cache and the new tokens before it); logits [B, T, vocab], position t's
        for the token after tokens[:, t]."""
        hidden = self.model.decode(tokens, None, self.memory_mask, memory=self.memory, cache=self.cache,
                                   start=self.cache.length)
        return self.model.lm_head(hidden)

    @property
    def cached(self) -> int:
        """Positions in the self-attention cache (the same for every row)."""
        return self.cache.length

    def cut(self, length: int) -> None:
        """Keep the first `length` cached positions (drop drafted tokens the model did not keep)."""
        self.cache.cut(length)

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.memory = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.memory]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)
        self.batch_size = index.numel()
