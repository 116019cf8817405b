"""Continuous batching on ONNX Runtime: the `TorchBatch` interface over an exported encoder-decoder.

The exported decoder takes each row's position (`positions` [B]: how many of its cached tokens
are real), so rows of different lengths share one call, as on PyTorch (slmctl.serve.batching):
every sequence owns a row of preallocated numpy buffers, its self-attention keys/values
[slots, kv_heads, capacity, head_dim] per layer and its prompt's cross-attention keys/values,
computed once when it joins by the exported encoder. A step passes the active rows' caches cut
to the longest one; the graph returns them with the new token's keys/values appended, which are
written at each row's own length. An export whose decoder writes its cache in place (contract 3)
reads and writes the same buffers directly: nothing is cut or copied back. Active sequences are rows
0..n-1; a leaving row is refilled by the last one.
"""

from __future__ import annotations

import numpy as np
import torch

from slmctl.errors import ConfigError
from slmctl.runtime.onnx import InPlaceCache
from slmctl.serve.batching import swap_remove


class OnnxBatch:
    def __init__(self, lm, slots: int, capacity: int):
        if lm.is_static:
            raise ConfigError(f"{lm.directory}: slmctl serve runs dynamic-shape exports; this one has fixed shapes "
                              "(export static=...) for NPUs: export again without them")
        if "positions" not in lm.input_names("decoder"):
            raise ConfigError(f"{lm.directory}: this export's decoder predates per-row positions, which serving "
                              "needs; export the model again (slmctl export onnx MODEL)")
        cfg = lm.config
        self.lm, self.slots, self.names = lm, slots, lm.graphs["cache_names"]
        self.dtype = np.dtype(lm.graphs.get("cache_dtype", "float32"))
        shape = (slots, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.in_place = InPlaceCache(lm, slots, capacity) if lm.in_place else None
        # key, value of each layer
        self.cache = self.in_place.buffers if self.in_place else [np.zeros(shape, dtype=self.dtype) for _ in self.names["past"]]
        self.lengths = np.zeros(slots, dtype=np.int64)
        self.cross: list[np.ndarray] = []  # per layer key, value [slots, kv_heads, source, head_dim]
        self.source_mask = np.zeros((slots, 0), dtype=np.int64)
        self.source_lengths = np.zeros(slots, dtype=np.int64)
        self.active = 0

    def join(self, prompts: list[list[int]] | None = None, embeds=None, image_features: list | None = None) -> list[int]:
        """Encode the new prompts together (one encoder call) and give each a row. A vision export's
        prompts carry one image-token id per image token, `image_features[i]` [M_i, d_model] (or None)
        their values (`OnnxLM.prepare_images`)."""
        if embeds is not None:
            raise ValueError("an ONNX export takes token ids, not embedded inputs")
        count = len(prompts)
        if self.active + count > self.slots:
            raise RuntimeError(f"{self.active} + {count} sequences > {self.slots} slots")
        width, pad = max(len(p) for p in prompts), self.lm.config.pad_token_id
        ids = np.array([p + [pad] * (width - len(p)) for p in prompts], dtype=np.int64)
        mask = np.array([[1] * len(p) + [0] * (width - len(p)) for p in prompts], dtype=np.int64)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.lm.is_vision:  # the image tokens of the batch, in order (never empty: the graph gathers a row)
            given = [f for f in image_features or [] if f is not None]
            inputs["image_features"] = (np.concatenate(given) if given else np.zeros((1, self.lm.config.d_model))).astype(np.float32)
        cross = [v.numpy() for v in self.lm.run("encoder", inputs)[1:]]
        self._fit_source(width, cross)
        rows = slice(self.active, self.active + count)
        for buffer, new in zip(self.cross, cross):
            buffer[rows, :, :width] = new
        self.source_mask[rows] = 0
        self.source_mask[rows, :width] = mask
        self.source_lengths[rows] = [len(p) for p in prompts]
        self.lengths[rows] = 0
        self.active += count
        return list(range(rows.start, rows.stop))

    def _fit_source(self, width: int, like: list[np.ndarray]) -> None:
        have = self.source_mask.shape[1]
        if width <= have and self.cross:
            return
        size = max(width, have)
        grown = []
        for i, new in enumerate(like):
            buffer = np.zeros((self.slots, new.shape[1], size, new.shape[3]), dtype=new.dtype)
            if self.cross:
                buffer[:, :, :have] = self.cross[i]
            grown.append(buffer)
        mask = np.zeros((self.slots, size), dtype=np.int64)
        mask[:, :have] = self.source_mask
        self.cross, self.source_mask = grown, mask

    @property
    def capacity(self) -> int:
        return self.cache[0].shape[2]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per active row -> logits [n, vocab], in one decoder call."""
        return self.verify(tokens.reshape(-1, 1))[:, -1]

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """T tokens per active row [n, T] (the last chosen token, then drafted ones) -> logits [n, T, vocab]
        in one decoder call (an export of contract 2 for T > 1); every row's length grows by T."""
        n, T = self.active, tokens.shape[1]
        reach, source = int(self.lengths[:n].max()), int(self.source_lengths[:n].max())
        if reach + T > self.capacity:
            raise RuntimeError(f"KV cache overflow: {reach + T} positions > capacity {self.capacity}")
        ids, positions, mask = tokens.cpu().numpy().astype(np.int64), self.lengths[:n].copy(), self.source_mask[:n, :source]
        cross = [c[:n, :, :source] for c in self.cross]
        if self.in_place is not None:
            logits = self.in_place.decode(ids, positions, mask, cross)
            self.lengths[:n] += T
            return logits
        inputs = {"input_ids": ids, "positions": positions, "encoder_attention_mask": mask}
        inputs.update((name, cache[:n, :, :reach]) for name, cache in zip(self.names["past"], self.cache))
        inputs.update(zip(self.names["cross"], cross))
        outputs = self.lm.run("decoder", inputs)
        rows = np.arange(n)
        for cache, present in zip(self.cache, outputs[1:]):
            new = present.numpy()[:, :, reach:reach + T]  # the new tokens' keys/values, written at each row's length on
            for t in range(T):
                cache[rows, :, self.lengths[:n] + t] = new[:, :, t]
        self.lengths[:n] += T
        logits = torch.from_numpy(outputs[0].numpy())
        if logits.dim() == 2:  # contract 1: the last token's only
            if T > 1:
                raise ValueError(f"{self.lm.directory}: this export's decoder returns only the last token's logits")
            logits = logits[:, None]
        return logits

    def cut(self, lengths: torch.Tensor) -> None:
        """Each active row keeps its first `lengths[row]` positions (drafts it did not keep are dropped)."""
        n, keep = self.active, np.asarray(lengths, dtype=np.int64)
        if keep.shape != (n,) or (keep > self.lengths[:n]).any() or (keep < 0).any():
            raise ValueError(f"cannot cut rows of lengths {self.lengths[:n].tolist()} to {keep.tolist()}")
        self.lengths[:n] = keep

    def reset(self) -> None:
        """Free every row (after a failed call, whose half-done writes no row may build on)."""
        self.active = 0
        self.lengths[:] = 0

    def leave(self, row: int) -> int | None:
        """Free `row`; the last active row moves into it. Returns the row that moved (now `row`), or None."""
        moved = swap_remove(row, self.active, self._move)
        self.active -= 1
        return moved

    def _move(self, source: int, target: int) -> None:
        length = int(self.lengths[source])
        for cache in self.cache:
            cache[target, :, :length] = cache[source, :, :length]
        for cross in self.cross:
            cross[target] = cross[source]
        self.source_mask[target], self.source_lengths[target] = self.source_mask[source], self.source_lengths[source]
        self.lengths[target] = length
