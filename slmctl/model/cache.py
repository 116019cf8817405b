"""Preallocated key/value cache for decoder self-attention.

One tensor per layer stack, allocated for the whole generation up front, so a
decode step writes one position in place instead of concatenating (and copying)
the growing history. A verification pass of drafted tokens (slmctl.model.generation)
writes several positions at once and `cut`s the cache back past the first rejected one.
"""

from __future__ import annotations

import torch

from slmctl.model.layers import additive_mask


class KVCache:
    """Keys/values of every layer: [layers, batch, kv_heads, max_len, head_dim].

    Layers write their new positions at `length` with `update`; the model calls
    `advance` once all layers have seen the step.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layout(self, start: int, T: int, dtype: torch.dtype):
        """(positions [1, T], self-attention mask, is_causal, reach) of T new tokens at `start`: all rows
        share positions (slmctl.serve.batching.SlotCache: rows of different lengths); new token t sees
        every cached key and the new ones up to itself (SDPA's is_causal only aligns a causal mask
        to the top left, right for a pass that starts at 0: later passes get an explicit mask)."""
        device = self.k.device
        positions = torch.arange(start, start + T, device=device)[None]
        if T == 1 or start == 0:
            return positions, None, T > 1, start + T
        allowed = torch.arange(start + T, device=device)[None] <= positions[0, :, None]  # [T, start + T]
        return positions, additive_mask(allowed[None, None], dtype), False, start + T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def cut(self, length: int) -> None:
        """Forget every position from `length` on (drafted tokens past the first rejected one); the
        next pass overwrites them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot cut a cache of {self.length} positions to {length}")
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reordering, or expanding rows into beams)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
