"""What both architectures share: the output type, the tied LM head, the loss,
position/mask helpers and the `generate` entry point."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmctl.model.config import ModelConfig
from slmctl.model.layers import RotaryEmbedding, additive_mask

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None


def padding_positions(attention_mask: torch.Tensor, centred: bool) -> torch.Tensor:
    """Per-row positions that ignore padding on either side: the first real token is 0
    (or, centred, the middle real token is 0: position - (L - 1) // 2)."""
    mask = attention_mask.long()
    positions = mask.cumsum(dim=1) - 1
    if centred:
        positions = positions - (mask.sum(dim=1, keepdim=True) - 1) // 2
    return positions.masked_fill(mask == 0, 0)


def segment_layout(segment_ids: torch.Tensor, causal: bool, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed row's attention and positions from its segment ids [B, T] (0 = padding, 1, 2, ...
    = the documents packed into the row) -> ("may attend" [B, 1, T, T] bool, positions [B, T]).

    A token may attend only to tokens of its own segment (causal: at or before it). Positions
    restart in every segment exactly as `padding_positions` numbers one unpacked row of that
    segment's length (from 0, or centred: position - (L - 1) // 2); padding is position 0.
    Padding tokens attend to padding, so no row of the mask is empty. (With rope_factor > 1,
    the NTK base follows the row's width, as it follows a padded batch's width.)"""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T query, T key]
    T = segment_ids.shape[1]
    same_so_far = same & torch.ones(T, T, dtype=torch.bool, device=same.device).tril()
    positions = same_so_far.sum(dim=-1) - 1
    if centred:
        positions = positions - (same.sum(dim=-1) - 1) // 2
    positions = positions.masked_fill(segment_ids == 0, 0)
    return (same_so_far if causal else same)[:, None], positions


def has_padding(attention_mask: torch.Tensor | None) -> bool:
    return attention_mask is not None and not bool(attention_mask.all())


class LanguageModel(nn.Module):
    """Base class of `EncoderDecoderLM` and `DecoderOnlyLM`."""

    config: ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_factor, config.max_seq_len)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head is the input embedding (tied, no bias); for inference on the CPU maybe a
        prepacked copy of it (slmctl.runtime.prepacked)."""
        packed = self._modules.get("head_product")
        return packed(hidden) if packed is not None else F.linear(hidden, self.embed.weight)

    def num_parameters(self) -> int:
        """Trainable weights, counting those an inference model holds prepacked (slmctl.runtime.prepacked)."""
        packed = sum(getattr(m, "replaces_parameters", 0) for m in self.modules())
        return sum(p.numel() for p in self.parameters()) + packed

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def self_attention_mask(self, attention_mask: torch.Tensor | None, T: int, causal: bool):
        """(additive mask or None, is_causal) for self-attention over T positions."""
        if not has_padding(attention_mask):
            return None, causal
        allowed = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T] keys
        if causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=allowed.device).tril()
        return additive_mask(allowed, self.dtype), False

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy; label -100 is ignored."""
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    def start_decoding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int):
        raise NotImplementedError

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """New token ids [B, T_new] (see `slmctl.model.generation.generate`).

        Decoding runs under `torch.inference_mode` (measured ~4% faster per 330m decode step than
        `no_grad`); the result is cloned out of it, so callers can use it in autograd (on-policy KD)."""
        from slmctl.model.generation import generate

        with torch.inference_mode():
            new_tokens = generate(self, input_ids, attention_mask=attention_mask, **kwargs)
        return new_tokens.clone()
