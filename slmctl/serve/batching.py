"""Continuous batching for an encoder-decoder on PyTorch: sequences join and leave between steps.

Every active sequence owns a row ("slot") of two preallocated buffers, so one decoder call
advances all of them at once although their prompts and answers have different lengths:

    SlotCache     decoder self-attention K/V [layers, slots, kv_heads, capacity, head_dim],
                  with each row's own length (its RoPE position and which keys it may see)
    memory        every decoder layer's cross-attention K/V of each row's encoded prompt,
                  computed once when the sequence joins [slots, kv_heads, source, head_dim],
                  with a mask hiding the padding of shorter prompts

Active sequences are always rows 0..n-1 (a finished row is replaced by the last one), so a
step reads plain slices of the buffers, not gathered copies.

    batch = TorchBatch(model, slots=16, capacity=257)
    rows = batch.join([ids_a, ids_b])              # encode both prompts together
    logits = batch.step(torch.tensor([bos, bos]))  # [2, vocab]: one token for every active row
    batch.leave(rows[0])                           # row numbers of the others may change: see `moved`
"""

from __future__ import annotations

import torch

from slmctl.model.layers import additive_mask


def swap_remove(row: int, active: int, move) -> int | None:
    """Free `row` of the active rows 0..active-1, keeping them contiguous: the last row moves into it
    (`move(last, row)` copies its state). Returns the row that moved (now `row`), or None."""
    last = active - 1
    if not 0 <= row <= last:
        raise IndexError(f"row {row} is not active (0..{last})")
    if row == last:
        return None
    move(last, row)
    return last


class SlotCache:
    """Self-attention keys/values of up to `slots` sequences, each at its own length. Implements
    the cache interface of `EncoderDecoderLM.decode` (`layout`, `update`, `advance`)."""

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layers, slots, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = 0  # rows 0..active-1 take part in the next step
        self._reach = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def layout(self, start: int, T: int, dtype: torch.dtype):
        """(positions [n, T], additive self-attention mask [n, 1, T, reach], is_causal, reach) for T new
        tokens per active row (one a step; more in a pass checking drafts): each row's tokens sit at
        its own length on and see its own keys and its new tokens up to themselves."""
        lengths = self.lengths[:self.active]
        self._reach = int(lengths.max()) + T
        if self._reach > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self._reach} positions > capacity {self.capacity}")
        positions = lengths[:, None] + torch.arange(T, device=lengths.device)  # [n, T]
        allowed = torch.arange(self._reach, device=lengths.device)[None, None] <= positions[:, :, None]  # [n, T, reach]
        return positions, additive_mask(allowed[:, None], dtype), False, self._reach

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, T = self.active, k.shape[2]
        rows = torch.arange(n, device=k.device)[:, None]
        at = self.lengths[:n, None] + torch.arange(T, device=k.device)  # [n, T]: each row's new positions
        self.k[layer, rows, :, at] = k.transpose(1, 2)
        self.v[layer, rows, :, at] = v.transpose(1, 2)
        return self.k[layer, :n, :, :self._reach], self.v[layer, :n, :, :self._reach]

    def advance(self, steps: int) -> None:
        self.lengths[:self.active] += steps

    def cut(self, lengths: torch.Tensor) -> None:
        """Each active row keeps its first `lengths[row]` positions (drafts it did not keep are dropped)."""
        n = self.active
        if lengths.shape != (n,) or bool((lengths > self.lengths[:n]).any()) or bool((lengths < 0).any()):
            raise ValueError(f"cannot cut rows of lengths {self.lengths[:n].tolist()} to {lengths.tolist()}")
        self.lengths[:n] = lengths.to(self.lengths.device)

    def move(self, source: int, target: int) -> None:
        """Row `source`'s sequence now lives in row `target` (whose sequence has left)."""
        length = int(self.lengths[source])
        self.k[:, target, :, :length] = self.k[:, source, :, :length]
        self.v[:, target, :, :length] = self.v[:, source, :, :length]
        self.lengths[target] = length


class TorchBatch:
    """The active sequences of a served `EncoderDecoderLM` (or vision model's text model)."""

    def __init__(self, model, slots: int, capacity: int):
        cfg = model.config
        self.model, self.slots = model, slots
        self.cache = SlotCache(cfg.n_decoder_layers, slots, cfg.n_kv_heads, capacity, cfg.head_dim,
                               model.dtype, model.device)
        self.memory: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, [slots, kv_heads, source, head_dim]
        self.source_allowed = torch.zeros(slots, 0, dtype=torch.bool, device=model.device)
        self.source_lengths = torch.zeros(slots, dtype=torch.long, device=model.device)

    @property
    def active(self) -> int:
        return self.cache.active

    @torch.inference_mode()
    def join(self, prompts: list[list[int]] | None = None, embeds: list[torch.Tensor] | None = None,
             image_features=None) -> list[int]:
        """Encode new prompts together (token ids, or embedded inputs [S_i, d_model] of a vision
        model) and give each a row; returns their rows. Their first step feeds BOS."""
        if image_features is not None:
            raise ValueError("a torch vision model takes embedded inputs (embeds), not image features")
        count = len(prompts if prompts is not None else embeds)
        if self.active + count > self.slots:
            raise RuntimeError(f"{self.active} + {count} sequences > {self.slots} slots")
        lengths = [len(p) for p in prompts] if prompts is not None else [e.shape[0] for e in embeds]
        width, device = max(lengths), self.model.device
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)
        if prompts is not None:
            pad = self.model.config.pad_token_id
            ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], device=device)
            encoded = self.model.encode(ids, mask)
        else:
            inputs = embeds[0].new_zeros(count, width, embeds[0].shape[-1])
            for i, e in enumerate(embeds):
                inputs[i, :e.shape[0]] = e
            encoded = self.model.encode(None, mask, inputs)
        self._fit_source(width)
        rows = list(range(self.active, self.active + count))
        for layer, (k, v) in zip(self.model.decoder.layers, self.memory):
            new_k, new_v = layer.cross_attn.memory(encoded)
            k[rows, :, :width], v[rows, :, :width] = new_k, new_v
        self.source_allowed[rows] = False
        self.source_allowed[rows, :width] = mask.bool()
        self.source_lengths[rows] = torch.tensor(lengths, device=device)
        self.cache.lengths[rows] = 0
        self.cache.active += count
        return rows

    def _fit_source(self, width: int) -> None:
        """Grow the memory buffers to hold prompts of `width` tokens (padding the older rows)."""
        have = self.source_allowed.shape[1]
        if width <= have and self.memory:
            return
        cfg, size = self.model.config, max(width, have)
        grown = []
        for i in range(cfg.n_decoder_layers):
            k = torch.zeros(self.slots, cfg.n_kv_heads, size, cfg.head_dim, dtype=self.model.dtype, device=self.model.device)
            v = torch.zeros_like(k)
            if self.memory:
                k[:, :, :have], v[:, :, :have] = self.memory[i]
            grown.append((k, v))
        allowed = torch.zeros(self.slots, size, dtype=torch.bool, device=self.model.device)
        allowed[:, :have] = self.source_allowed
        self.memory, self.source_allowed = grown, allowed

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to every active row (BOS for rows that just joined); logits [n, vocab]."""
        n = self.active
        if tokens.shape != (n,):
            raise ValueError(f"step takes one token per active row ({n}), got shape {tuple(tokens.shape)}")
        return self.verify(tokens[:, None])[:, -1]

    @torch.inference_mode()
    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed T tokens to every active row [n, T] in one decoder call (the last chosen token, then
        drafted ones); logits [n, T, vocab]. Every row's length grows by T: `cut` drops what it did not keep."""
        n = self.active
        if tokens.dim() != 2 or tokens.shape[0] != n:
            raise ValueError(f"verify takes [{n}, T] tokens, got shape {tuple(tokens.shape)}")
        reach = int(self.source_lengths[:n].max())
        memory = [(k[:n, :, :reach], v[:n, :, :reach]) for k, v in self.memory]
        memory_mask = additive_mask(self.source_allowed[:n, None, None, :reach], self.model.dtype)
        hidden = self.model.decode(tokens.to(self.model.device), None, memory_mask, memory=memory, cache=self.cache)
        return self.model.lm_head(hidden)

    @property
    def lengths(self) -> torch.Tensor:
        """Positions cached per slot (rows 0..active-1 are the active ones)."""
        return self.cache.lengths

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def cut(self, lengths: torch.Tensor) -> None:
        self.cache.cut(lengths)

    def reset(self) -> None:
        """Free every row (after a failed call, whose half-done writes no row may build on)."""
        self.cache.active = 0
        self.cache.lengths.zero_()

    @torch.inference_mode()
    def leave(self, row: int) -> int | None:
        """Free `row`; the last active row moves into it. Returns the row that moved (now `row`), or None."""
        moved = swap_remove(row, self.active, self._move)
        self.cache.active -= 1
        return moved

    def _move(self, source: int, target: int) -> None:
        self.cache.move(source, target)
        for k, v in self.memory:
            k[target], v[target] = k[source], v[source]
        self.source_allowed[target] = self.source_allowed[source]
        self.source_lengths[target] = self.source_lengths[source]
