"""Stopping a training run on SIGINT (Ctrl-C) or SIGTERM (kill, a scheduler's preemption)
without losing work: the step in flight finishes, a resumable checkpoint is saved, and the
run is marked interrupted. A second Ctrl-C stops at once (the last checkpoint stays).
Outside training, slmctl.interrupts turns SIGTERM into an interrupt."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from slmctl.interrupts import SIGNALS


class GracefulStop(Callback):
    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.requested: str | None = None  # the signal's name, once one arrives
        self.saved: Path | None = None
        self._previous: dict = {}

    def _request(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.requested = signal.Signals(signum).name

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        # a signal the process was started to ignore (a background job's SIGINT, nohup) stays ignored
        self._previous = {sig: signal.getsignal(sig) for sig in SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}
        for sig in self._previous:
            signal.signal(sig, self._request)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.requested is not None
        if trainer.world_size > 1:  # every rank stops at the same step, whichever got the signal
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and self.saved is None:
            self.requested = self.requested or "a signal to another rank"
            self.saved = self.checkpoint_dir / f"step-{trainer.global_step:08d}.ckpt"
            trainer.save_checkpoint(self.saved, weights_only=False)  # the whole training state: resumable
            trainer.should_stop = True

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
