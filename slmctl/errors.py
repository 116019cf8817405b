"""The two kinds of error a user sees, and how one is shown.

`UserError`: bad input the user can fix (a bad override, a missing file, a model that does
not verify, an unreachable judge). The stage runner prints its message as one line and exits
with status 2; no traceback unless --verbose. Every such error class derives from it; the two
that many layers raise live here (`ConfigError`: a bad value; `CheckpointError`: a model or
checkpoint that does not load).

`RunFailure`: the input was fine but the run could not end well (validation of an export
failed, a checkpoint could not be saved, the loss diverged). One line, exit status 1, and
the run is marked failed.

Anything else is a bug or an environment problem: recorded in the run, then raised.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: one line naming the problem and the fix, exit status 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A bad composition or value; the message is one line naming the problem and the fix."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or model directory that cannot be loaded; the message is one line naming the problem."""


class RunFailure(Exception):
    """A run that could not finish well (a measured failure or a fault): one line, exit status 1."""

    exit_code = 1


class TrainingDiverged(RunFailure, RuntimeError):
    """The training loss stopped being finite: the run fails (exit 1) at that step; the
    checkpoints written before it are kept (the runner names the last one)."""


def first_line(error: BaseException | str, default: str | None = None) -> str:
    """The first non-blank line of an error's message (or of a text); `default`, else the
    exception's type name, when there is none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return lines[0]
    if default is not None:
        return default
    return type(error).__name__ if isinstance(error, BaseException) else ""
