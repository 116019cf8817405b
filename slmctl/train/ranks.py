"""Which process writes the run directory when training runs on several processes.

Only global rank 0 creates and writes the run (config, checkpoints, model, status). The
other ranks open the same run read-only and write only their own log, `ranks/rank-<N>.log`.
They learn the run's path in one of two ways:

- processes Lightning starts itself (`trainer.devices=2` on one machine) inherit
  `SLMCTL_RUN_DIR`, which rank 0 sets before training;
- processes started by torchrun or SLURM (`srun`) all start at once, so the CLI joins the
  process group early and rank 0 broadcasts the path (Lightning then reuses that group).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

RUN_DIR_ENV = "SLMCTL_RUN_DIR"
RANK_LOGS = "ranks"


def spawned_rank() -> int | None:
    """The rank of a process Lightning's launcher started for a run rank 0 already opened, else None."""
    if RUN_DIR_ENV not in os.environ:
        return None
    rank = int(os.environ.get("LOCAL_RANK", 0))
    return rank if rank > 0 else None


def launched_rank() -> tuple[int, int]:
    """(global rank, world size) of a process started by torchrun or SLURM, else (0, 1)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for environment in (TorchElasticEnvironment, SLURMEnvironment):
        if environment.detect():
            found = environment()
            return found.global_rank(), found.world_size()
    return 0, 1


def share_run_dir(path: Path | None, rank: int, world_size: int) -> Path:
    """Rank 0's run directory, on every rank of a torchrun/SLURM launch (a collective call)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if SLURMEnvironment.detect():  # srun sets no MASTER_* variables; Lightning derives them
            environment = SLURMEnvironment()
            os.environ.setdefault("MASTER_ADDR", environment.main_address)
            os.environ.setdefault("MASTER_PORT", str(environment.main_port))
        dist.init_process_group(init_method="env://", rank=rank, world_size=world_size)
    shared = [str(path) if path is not None else None]
    dist.broadcast_object_list(shared, src=0)
    return Path(shared[0])


@contextmanager
def rank0_first(run):
    """Rank 0 runs the block first (e.g. building a file every rank reads) while the other ranks
    of a torchrun/SLURM launch wait; then they run it. Processes Lightning starts itself begin
    only when rank 0 reaches training, so they need no wait."""
    import torch.distributed as dist

    synchronised = dist.is_available() and dist.is_initialized()
    if synchronised and not run.is_writer:
        dist.barrier()
    yield
    if synchronised and run.is_writer:
        dist.barrier()


def follow_rank0(stage: str, cfg):
    """(run, config) for a training process that is not global rank 0, else None: it follows the
    run rank 0 opened and trains with that run's saved config (resuming when rank 0 does)."""
    from slmctl.config.compose import saved_config
    from slmctl.runs.run import Run

    rank = spawned_rank()
    if rank is not None:
        run = Run.follow(os.environ[RUN_DIR_ENV], rank)
    else:
        rank, world_size = launched_rank()
        if rank == 0:
            return None
        run = Run.follow(share_run_dir(None, rank, world_size), rank)
    return run, saved_config(stage, run.config(), resume=cfg.get("resume"))


@contextmanager
def shared_with_other_ranks(run, training: bool):
    """Rank 0 of a (possibly) multi-process training run tells the other ranks where the run is."""
    if not training or not run.is_writer:
        yield
        return
    rank, world_size = launched_rank()
    if world_size > 1:  # torchrun / SLURM: the other ranks are already waiting for the path
        share_run_dir(run.path, rank, world_size)
    os.environ[RUN_DIR_ENV] = str(run.path)  # inherited by the processes Lightning starts
    try:
        yield
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
