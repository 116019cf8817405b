"""Batching on ONNX Runtime: the `TorchBatch` interface over an exported encoder-decoder.

The exported decoder graph advances rows that share one cache length (its positions and causal
mask come from the cache's length), so rows at different lengths cannot share a call. Requests
that join together therefore form a cohort: their prompts are encoded in one encoder call and
the cohort decodes in one decoder call per step; a finished row leaves its cohort (its cache
rows dropped), and every step runs one call per cohort. Rows are numbered 0..n-1 across
cohorts, with the engine's convention that the last row takes a leaving row's number.
(The torch runtime shares every step between all active sequences: slmctl.serve.batching.)
"""

from __future__ import annotations

import torch

from slmctl.config import ConfigError


class OnnxBatch:
    def __init__(self, lm, slots: int, capacity: int):
        if lm.is_static:
            raise ConfigError(f"{lm.directory}: slmctl serve runs dynamic-shape exports; this one has fixed shapes "
                              "(export static=...) for NPUs: export again without them")
        if lm.is_vision:
            raise ConfigError(f"{lm.directory} is a vision export: serve the vision model directory (--runtime torch) "
                              "for images; ONNX serving takes text exports")
        self.lm, self.slots, self.capacity = lm, slots, capacity
        self.cohorts: list[dict] = []  # {"session": decoding session, "rows": [row number per session row]}

    @property
    def active(self) -> int:
        return sum(len(c["rows"]) for c in self.cohorts)

    def join(self, prompts: list[list[int]] | None = None, embeds=None) -> list[int]:
        if embeds is not None:
            raise ValueError("an ONNX export takes token ids, not embedded inputs")
        if self.active + len(prompts) > self.slots:
            raise RuntimeError(f"{self.active} + {len(prompts)} sequences > {self.slots} slots")
        width, pad = max(len(p) for p in prompts), self.lm.config.pad_token_id
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
        session = self.lm.start_decoding(ids, mask, self.capacity)
        rows = list(range(self.active, self.active + len(prompts)))
        self.cohorts.append({"session": session, "rows": rows})
        return rows

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per active row -> logits [n, vocab]: one decoder call per cohort."""
        logits = None
        for cohort in self.cohorts:
            index = torch.tensor(cohort["rows"])
            out = cohort["session"].step(tokens.index_select(0, index))
            if logits is None:
                logits = out.new_empty(self.active, out.shape[-1])
            logits[index] = out
        return logits

    def leave(self, row: int) -> int | None:
        last = self.active - 1
        if not 0 <= row <= last:
            raise IndexError(f"row {row} is not active (0..{last})")
        for cohort in self.cohorts:
            if row in cohort["rows"]:
                keep = [i for i, r in enumerate(cohort["rows"]) if r != row]
                if keep:
                    cohort["session"].reorder(torch.tensor(keep))
                cohort["rows"] = [cohort["rows"][i] for i in keep]
        self.cohorts = [c for c in self.cohorts if c["rows"]]
        if row == last:
            return None
        for cohort in self.cohorts:
            cohort["rows"] = [row if r == last else r for r in cohort["rows"]]
        return last
