"""Batches for pretraining, as a pure function of (seed, batch index).

Training batches come from an endless stream in which batch k is built from examples
k*B .. k*B+B-1 of a seeded per-epoch permutation, each passed through the objective with
its own seeded RNG. The stream starts at the batch the trainer has reached, so a resumed
run sees exactly the batches an uninterrupted run would have seen.

`batch_size` is the global batch: on W processes (DDP/FSDP) rank r takes the r-th of W equal
slices of every batch, so the examples (and the optimizer steps, see module.py) are those of
a one-process run with the same batch_size. Validation batches are dealt out round-robin,
with unscored repeats so every rank runs the same number.
"""

from __future__ import annotations

import random
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

PADDING = "padding"  # marks a validation batch a rank runs only to keep step with the others
Example = object  # a token-id list, or a (source ids, target ids) pair
MakeBatch = Callable[[list[Example], list[random.Random]], dict]


class StepStream(IterableDataset):
    """Endless batches; batch k uses examples at stream positions k*B .. k*B+B-1 (of which
    rank r of W takes the slice k*B + r*B/W .. k*B + (r+1)*B/W - 1)."""

    def __init__(self, examples: list, batch_size: int, seed: int, make_batch: MakeBatch, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.make_batch, self.start_batch = make_batch, start_batch
        self.rank, self.world_size = rank, world_size

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def batch(self, k: int) -> dict:
        n = len(self.examples)
        chosen, rngs, cache = [], [], {}
        share = self.batch_size // self.world_size
        first = k * self.batch_size + self.rank * share
        for position in range(first, first + share):
            epoch = position // n
            if epoch not in cache:
                cache[epoch] = self._permutation(epoch)
            chosen.append(self.examples[cache[epoch][position % n]])
            rngs.append(random.Random(f"{self.seed}:{position}"))
        return self.make_batch(chosen, rngs)

    def __iter__(self):
        k = self.start_batch
        while True:
            yield self.batch(k)
            k += 1


class TrainingDataModule(L.LightningDataModule):
    def __init__(self, train_examples: list, val_examples: list, make_batch: MakeBatch, batch_size: int, seed: int,
                 make_val_batch: MakeBatch | None = None):
        super().__init__()
        self.train_examples, self.val_examples = train_examples, val_examples
        self.make_batch, self.batch_size, self.seed = make_batch, batch_size, seed
        self.make_val_batch = make_val_batch or make_batch

    def train_dataloader(self):
        # Micro-batches already consumed (the trainer's step counts optimizer steps).
        accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
        start = self.trainer.global_step * accumulate if self.trainer else 0
        rank, world_size = self._rank()  # batch_size splits over world_size (train/fit.py checks)
        stream = StepStream(self.train_examples, self.batch_size, self.seed, self.make_batch, start_batch=start,
                            rank=rank, world_size=world_size)
        return DataLoader(stream, batch_size=None, num_workers=0, generator=_own_generator(self.seed))

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def val_dataloader(self):
        batches = []
        for i in range(0, len(self.val_examples), self.batch_size):
            chunk = self.val_examples[i:i + self.batch_size]
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
