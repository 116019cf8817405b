"""Signals as interrupts: SIGTERM (kill, a scheduler's preemption) ends any stage the way
Ctrl-C does, so a run is marked interrupted instead of being left "running".

Kept apart from training (slmctl.train.stopping, which saves a checkpoint first) so that
the stage runner of `generate`, `eval`, `export` or `serve` never imports Lightning."""

from __future__ import annotations

import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A run stopped on request; the message says how far it got and what was saved."""


@contextmanager
def sigterm_as_interrupt():
    """Inside this block SIGTERM raises `Stopped` like Ctrl-C raises KeyboardInterrupt. During
    training `slmctl.train.stopping.GracefulStop` takes over and first saves a checkpoint."""

    def stop(signum, frame):
        raise Stopped("stopped by SIGTERM")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # started to ignore it (nohup-like): it stays ignored
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
