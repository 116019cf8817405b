"""The error family: every error slmctl raises for a user is a UserError (one line, exit 2) or a
RunFailure (one line, exit 1), so the runner's one `except` covers it."""

import importlib
import inspect
from pathlib import Path

import slmctl
from slmctl.errors import RunFailure, UserError, first_line

# Not errors a user caused: how a stage ended (the runner's own), a stop request (a KeyboardInterrupt), and the
# server's engine telling its HTTP side it is full or stopping (answered 429 / 503, never raised to a user).
OUTSIDE_THE_FAMILY = {"StageEnded", "Stopped", "QueueFull", "Draining"}


def slmctl_exception_classes():
    package = Path(slmctl.__file__).parent
    for file in sorted(package.rglob("*.py")):
        if file.name == "__main__.py":
            continue
        name = ".".join(file.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        loaded = importlib.import_module(name)
        for name, value in vars(loaded).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == loaded.__name__:
                yield name, value


def test_every_slmctl_exception_is_a_user_error_or_a_run_failure():
    found = dict(slmctl_exception_classes())
    assert {"ConfigError", "RunError", "CheckpointError", "DataError", "JudgeError", "ValidationFailed"} <= set(found)
    strays = [name for name, cls in found.items()
              if name not in OUTSIDE_THE_FAMILY and not issubclass(cls, (UserError, RunFailure))]
    assert strays == []


def test_first_line():
    assert first_line(ValueError("\n  bad value  \nsecond line")) == "bad value"
    assert first_line(ValueError()) == "ValueError"
    assert first_line("", "default") == "default"
    assert first_line("") == ""
