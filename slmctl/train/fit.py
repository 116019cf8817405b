"""One Lightning fit as every training stage runs it: checkpoints that survive kills and full
disks, a graceful stop on SIGINT/SIGTERM, resume from the newest intact checkpoint, slmctl's
own trainer options (train/trainer_options.py) and throughput measured at every step
(train/throughput.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint

from slmctl.errors import ConfigError
from slmctl.interrupts import Stopped
from slmctl.train.checkpoints import VerifiedCheckpointIO, last_good_checkpoint
from slmctl.train.precision import resolve_precision
from slmctl.train.stopping import GracefulStop
from slmctl.train.throughput import Throughput
from slmctl.train.trainer_options import apply_trainer_options, split_trainer_args


def fit(module: L.LightningModule, datamodule: L.LightningDataModule, run, trainer_args: dict, checkpoint_dir: Path,
        logger, checkpoint_every: int, resume: bool, callbacks: list | None = None) -> L.Trainer:
    """Train `module`, checkpointing every `checkpoint_every` steps and at the end into
    `checkpoint_dir`. With `resume`, continue from the newest intact checkpoint there (one at
    the final step only restores the weights). Raises `Stopped` (a KeyboardInterrupt) when a
    signal or Ctrl-C stopped training, after saving where it got to."""
    checkpoint_dir = Path(checkpoint_dir)
    trainer_args, options = split_trainer_args(trainer_args)
    trainer_args = resolve_precision(trainer_args, module.model, run.log)
    apply_trainer_options(module.model, options, run.log)
    throughput = Throughput(run, trainer_args.get("precision", "32-true"))
    periodic = throughput.exclude_from_wait(ModelCheckpoint(
        dirpath=checkpoint_dir, filename="step-{step:08d}", auto_insert_metric_name=False,
        every_n_train_steps=checkpoint_every, save_top_k=-1, save_last=False))
    stop = GracefulStop(checkpoint_dir)
    progress = progress_bar() if trainer_args.get("enable_progress_bar", True) else []
    try:
        trainer = L.Trainer(logger=logger, callbacks=[periodic, stop, *progress, throughput, *(callbacks or [])],
                            plugins=[VerifiedCheckpointIO()], default_root_dir=str(run.path),
                            **{**trainer_args, "use_distributed_sampler": False})  # the data module shards itself
    except (ValueError, TypeError, MisconfigurationException) as e:  # e.g. trainer=fsdp without a GPU
        message = " ".join(str(e).split())
        raise ConfigError(f"the trainer settings do not work here: {message}") from None
    if datamodule.batch_size % trainer.world_size:
        raise ConfigError(f"batch_size={datamodule.batch_size} is the global batch and does not split over "
                          f"{trainer.world_size} processes; use a multiple of {trainer.world_size}")
    resume_from = last_good_checkpoint(checkpoint_dir, run.log) if resume else None
    if resume_from:  # the step is in the name Lightning's ModelCheckpoint and GracefulStop give it
        step = int(resume_from.stem.split("-")[1])
        remaining = max(0, int(trainer.max_steps) - step) if trainer.max_steps and trainer.max_steps > 0 else None
        run.log(f"resumed from step {step} (checkpoint {resume_from.relative_to(run.path)})"
                + (f"; {remaining} steps to go" if remaining is not None else ""))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
    if stop.saved is not None:
        raise Stopped(f"stopped by {stop.requested} after step {trainer.global_step}; "
                      f"checkpoint saved: {stop.saved.relative_to(run.path)}")
    if trainer.interrupted:  # Lightning stopped on a KeyboardInterrupt it caught itself
        raise KeyboardInterrupt
    if trainer.global_step % checkpoint_every:  # a resume after training finished reloads this, not an older one
        trainer.save_checkpoint(checkpoint_dir / f"step-{trainer.global_step:08d}.ckpt", weights_only=False)
    return trainer


def quiet_lightning() -> None:
    """Keep Lightning's console to what a user acts on (no accelerator banners, tips or
    deprecation notes from its internals); our progress bar and summary say the rest."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # resuming
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")  # module.py sums over ranks itself


def progress_bar() -> list:
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        """Training runs by steps on an endless stream: say "train", not "Epoch 0/-2", and drop v_num."""

        def _get_train_description(self, current_epoch: int) -> str:
            return "train"

        def get_metrics(self, trainer, pl_module):
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            return metrics

    return [StepProgressBar(leave=True)]
