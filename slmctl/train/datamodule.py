"""Batches for training, as a pure function of (seed, batch index).

Training batches come from an endless stream in which batch k is built from the rows at
positions k*B .. k*B+B-1 of a seeded per-epoch order (slmctl.data.streaming.PositionOrder),
each passed through the objective with its own seeded RNG. The stream starts at the batch the
trainer has reached, so a resumed run sees exactly the batches an uninterrupted run would have
seen; the position is also saved in every checkpoint (`state_dict`) and checked on resume.

Rows are anything with len() and [] : an in-memory list, or lazily read windows, documents or
pairs of a prepared token store (read from disk as needed).

`batch_size` is the global batch: on W processes (DDP/FSDP) rank r takes the r-th of W equal
slices of every batch, so the examples (and the optimizer steps, see module.py) are those of
a one-process run with the same batch_size. With `num_workers` loader processes, worker w builds
the batches k = start + w, start + w + num_workers, ... and the DataLoader hands them out in
order. Validation batches are dealt out round-robin, with unscored repeats so every rank runs
the same number.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from slmctl.data.streaming import PositionOrder
from slmctl.errors import ConfigError

PADDING = "padding"  # marks a validation batch a rank runs only to keep step with the others
Example = object  # a token-id list, a (source ids, target ids) pair, or a window's document pieces
MakeBatch = Callable[[list[Example], list[random.Random]], dict]


class StepStream(IterableDataset):
    """Endless batches; batch k uses rows at stream positions k*B .. k*B+B-1 (of which rank r of
    W takes the slice k*B + r*B/W .. k*B + (r+1)*B/W - 1)."""

    def __init__(self, rows: Sequence, batch_size: int, seed: int, make_batch: MakeBatch, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.make_batch, self.start_batch = make_batch, start_batch
        self.rank, self.world_size = rank, world_size
        self.order = PositionOrder(len(rows), seed)

    def positions(self, k: int) -> range:
        share = self.batch_size // self.world_size
        first = k * self.batch_size + self.rank * share
        return range(first, first + share)

    def batch(self, k: int) -> dict:
        positions = self.positions(k)
        chosen = [self.rows[self.order.row(position)] for position in positions]
        rngs = [random.Random(f"{self.seed}:{position}") for position in positions]
        return self.make_batch(chosen, rngs)

    def __iter__(self):
        worker = get_worker_info()
        k, step = self.start_batch, 1
        if worker is not None:  # worker w of N builds every N-th batch; the DataLoader interleaves them in order
            k, step = self.start_batch + worker.id, worker.num_workers
        while True:
            yield self.batch(k)
            k += step


class TrainingDataModule(L.LightningDataModule):
    def __init__(self, train_rows: Sequence, val_rows: Sequence, make_batch: MakeBatch, batch_size: int, seed: int,
                 make_val_batch: MakeBatch | None = None, num_workers: int = 0, describe: str = "examples"):
        super().__init__()
        self.train_rows, self.val_rows = train_rows, val_rows
        self.make_batch, self.batch_size, self.seed = make_batch, batch_size, seed
        self.make_val_batch = make_val_batch or make_batch
        self.num_workers, self.describe = num_workers, describe
        self._restored_batch: int | None = None

    def consumed_batches(self) -> int:
        """Micro-batches the trainer has taken so far (its step counts optimizer steps)."""
        accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
        return self.trainer.global_step * accumulate if self.trainer else 0

    def fingerprint(self) -> dict:
        """What a saved position is only valid for."""
        return {"rows": len(self.train_rows), "batch_size": self.batch_size, "seed": self.seed, "rows_are": self.describe}

    def state_dict(self) -> dict:
        return {"next_batch": self.consumed_batches(), **self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        saved = {key: state.get(key) for key in self.fingerprint()}
        if saved != self.fingerprint():
            raise ConfigError(f"the checkpoint's data position is for other data ({saved}, now {self.fingerprint()}); "
                              f"resume with the data the run started with")
        self._restored_batch = int(state["next_batch"])

    def train_dataloader(self):
        start = self.consumed_batches()
        if self._restored_batch is not None and self._restored_batch != start:
            raise ConfigError(f"the checkpoint's data position (batch {self._restored_batch}) does not match its "
                              f"step (batch {start}); the checkpoint is inconsistent")
        rank, world_size = self._rank()  # batch_size splits over world_size (train/fit.py checks)
        stream = StepStream(self.train_rows, self.batch_size, self.seed, self.make_batch, start_batch=start,
                            rank=rank, world_size=world_size)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=_own_generator(self.seed),
                          persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
                          multiprocessing_context="fork" if self.num_workers else None)

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def val_dataloader(self):
        batches = []
        for i in range(0, len(self.val_rows), self.batch_size):
            chunk = [self.val_rows[j] for j in range(i, min(i + self.batch_size, len(self.val_rows)))]
            rngs = [random.Random(f"validation:{self.seed}:{i + j}") for j in range(len(chunk))]
            batches.append(self.make_val_batch(chunk, rngs))
        rank, world_size = self._rank()
        mine = batches[rank::world_size]
        # Every rank runs as many validation batches (FSDP and a sharded teacher gather weights in
        # each forward, so all ranks must run the same number); the extra ones are not scored.
        mine += [{**batches[0], PADDING: True}] * (-(-len(batches) // world_size) - len(mine))
        return DataLoader(mine, batch_size=None, num_workers=0, generator=_own_generator(self.seed))


def _own_generator(seed: int) -> torch.Generator:
    """Every DataLoader iterator draws a base seed; from its own generator it does not advance
    the global RNG, so dropout sees the same random numbers whether or not a run was resumed."""
    return torch.Generator().manual_seed(seed)
