"""A teacher-logit cache: the teacher's top-k log-probabilities for every target token, on disk.

With gold targets the teacher's outputs never change, so running it every epoch is wasted
work. The distill stage runs it once over the data, keeps for each target token the k most
likely ids, their log-probabilities at the distillation temperature and the log of the
remaining (tail) mass, and trains from these rows (see `kd_losses.topk_kd_loss`).

Layout, inside the run:

    teacher_cache/index.json                  k, temperature, dtype, teacher, and per split its shards
    teacher_cache/<split>-00000.safetensors   ids [N, k] int32, logp [N, k], tail [N] float32,
                                              offsets [examples + 1] int64 (rows of each example)

Shards hold consecutive examples; every file is written atomically and `index.json` last,
so a cache is either complete or ignored (and rebuilt).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from slmctl.atomic import atomic_write_bytes, atomic_write_text

INDEX = "index.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ShardWriter:
    """Collects per-example rows and writes a shard whenever `shard_tokens` rows are pending."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int = 1 << 20):
        self.directory, self.split, self.dtype = Path(directory), split, DTYPES[dtype]
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_tokens = 0
        self._next_example = 0
        self._first_example = 0

    def add(self, ids: torch.Tensor, logp: torch.Tensor, tail: torch.Tensor) -> None:
        """The rows [n, k], [n, k], [n] of the next example (examples arrive in order)."""
        self._pending.append((ids.to(torch.int32).cpu(), logp.to(self.dtype).cpu(), tail.float().cpu()))
        self._pending_tokens += ids.shape[0]
        self._next_example += 1
        if self._pending_tokens >= self.shard_tokens:
            self._flush()

    def finish(self) -> dict:
        """Write what is pending; the split's entry for the index."""
        if self._pending:
            self._flush()
        return {"examples": self._next_example, "shards": self.shards}

    def _flush(self) -> None:
        from safetensors.torch import save

        lengths = torch.tensor([0] + [ids.shape[0] for ids, _, _ in self._pending])
        tensors = {"ids": torch.cat([p[0] for p in self._pending]), "logp": torch.cat([p[1] for p in self._pending]),
                   "tail": torch.cat([p[2] for p in self._pending]), "offsets": lengths.cumsum(0)}
        name = f"{self.split}-{len(self.shards):05d}.safetensors"
        atomic_write_bytes(self.directory / name, save(tensors))
        self.shards.append({"file": name, "first_example": self._first_example, "examples": len(self._pending),
                            "tokens": int(lengths.sum())})
        self._first_example = self._next_example
        self._pending, self._pending_tokens = [], 0


def write_index(directory: Path, meta: dict, splits: dict[str, dict]) -> None:
    atomic_write_text(Path(directory) / INDEX, json.dumps({**meta, "splits": splits}, indent=2) + "\n")


@dataclass
class CachedRows:
    ids: torch.Tensor  # [n, k] int64
    logp: torch.Tensor  # [n, k] float32
    tail: torch.Tensor  # [n] float32


class TopKCache:
    """Read access to a finished cache; shards are memory-mapped, rows read per example."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.index = json.loads((self.directory / INDEX).read_text())
        self._files: dict[str, object] = {}
        self._offsets: dict[str, torch.Tensor] = {}
        self._open = safe_open

    @classmethod
    def find(cls, directory: Path, meta: dict) -> "TopKCache | None":
        """The cache in `directory` if it is complete and was made with exactly `meta`."""
        path = Path(directory) / INDEX
        if not path.is_file():
            return None
        try:
            index = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if any(index.get(key) != value for key, value in meta.items()):
            return None
        return cls(directory)

    @property
    def k(self) -> int:
        return int(self.index["k"])

    def examples(self, split: str) -> int:
        return int(self.index["splits"][split]["examples"])

    def rows(self, split: str, example: int) -> CachedRows:
        shards = self.index["splits"][split]["shards"]
        firsts = [s["first_example"] for s in shards]
        shard = shards[bisect.bisect_right(firsts, example) - 1]
        handle = self._handle(shard["file"])
        offsets = self._offsets[shard["file"]]
        local = example - shard["first_example"]
        start, end = int(offsets[local]), int(offsets[local + 1])
        return CachedRows(handle.get_slice("ids")[start:end].long(), handle.get_slice("logp")[start:end].float(),
                          handle.get_slice("tail")[start:end].float())

    def _handle(self, name: str):
        if name not in self._files:
            handle = self._open(str(self.directory / name), framework="pt")
            self._files[name] = handle
            self._offsets[name] = handle.get_tensor("offsets")
        return self._files[name]


def stack_rows(rows: list[CachedRows], length: int) -> dict[str, torch.Tensor]:
    """Right-pad per-example rows into batch tensors [B, length, k] / [B, length] (padding:
    id 0, log-prob 0, tail 0; the kd mask keeps it out of the loss)."""
    k = rows[0].ids.shape[1]
    ids = torch.zeros((len(rows), length, k), dtype=torch.long)
    logp = torch.zeros((len(rows), length, k), dtype=torch.float32)
    tail = torch.zeros((len(rows), length), dtype=torch.float32)
    for i, row in enumerate(rows):
        n = min(length, row.ids.shape[0])
        ids[i, :n], logp[i, :n], tail[i, :n] = row.ids[:n], row.logp[:n], row.tail[:n]
    return {"cache_ids": ids, "cache_logp": logp, "cache_tail": tail}
