"""Signals as interrupts: SIGTERM (kill, a scheduler's preemption) ends any stage the way
Ctrl-C does, so a run is marked interrupted instead of being left "running".

Kept apart from training (slmctl.train.stopping, which saves a checkpoint first) so that
the stage runner of `generate`, `eval`, `export` or `serve` never imports Lightning."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
RETRY_S = 0.2  # a SIGTERM not yet handled is raised again this often


class Stopped(KeyboardInterrupt):
    """A run stopped on request; the message says how far it got and what was saved."""


@contextmanager
def sigterm_as_interrupt():
    """Inside this block SIGTERM raises `Stopped` like Ctrl-C raises KeyboardInterrupt. During
    training `slmctl.train.stopping.GracefulStop` takes over and first saves a checkpoint.

    A signal handler's exception is lost when the signal lands while Python runs a weakref callback
    or a `__del__` (the interpreter prints "Exception ignored" and carries on: the stage would then
    finish as if never stopped). So the first SIGTERM also starts a timer that raises `Stopped` again
    every RETRY_S seconds until the runner calls `settle()` on its way out, except while an interrupt
    is on its way up (a `finally`, an `__exit__` or an `except` running for it: cutting those short
    leaves libraries half cleaned up; seen once as a crash, exit -11, of an export stopped mid-trace),
    and while a module is being imported (`importing`): the stop then comes at the first retry after it."""

    def stop(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, RETRY_S, RETRY_S)
        if not importing(frame):
            raise Stopped("stopped by SIGTERM")

    def again(signum, frame):
        if not isinstance(sys.exc_info()[1], KeyboardInterrupt) and not importing(frame):  # lost, not being handled
            raise Stopped("stopped by SIGTERM")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # started to ignore it (nohup-like): it stays ignored
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, stop)
        previous_alarm = signal.signal(signal.SIGALRM, again)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        settle()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGALRM, previous_alarm)


def importing(frame) -> bool:
    """Whether `frame` runs inside an import. An exception raised there unwinds through the import's C
    code, and an extension built with nanobind (onnx's) aborts the process on it: an export stopped while
    importing onnx died with exit -6 instead of 130, its run left "running"."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def settle() -> None:
    """The stop was seen (the runner is recording it): no more repeats."""
    signal.setitimer(signal.ITIMER_REAL, 0)
