"""Training checkpoints that survive kills and full disks.

A checkpoint is written to a temporary file, fsynced and renamed into place, and only then
recorded (sha256 and size) in its directory's MANIFEST.json. Resuming takes the newest
checkpoint whose bytes match its record, so a process killed at any moment leaves either
the new checkpoint, complete and recorded, or the one before it; a save that fails (a full
disk) removes its temporary file and leaves every earlier checkpoint as it was.
"""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from slmctl.atomic import atomic_write_text, atomic_writer
from slmctl.errors import CheckpointError, RunFailure, first_line
from slmctl.integrity import sha256_file

MANIFEST = "MANIFEST.json"
PATTERN = "step-*.ckpt"


class CheckpointSaveFailed(RunFailure, RuntimeError):
    """Saving a checkpoint failed (e.g. no space left); the run fails, earlier checkpoints stay intact."""


def read_records(directory: Path) -> dict[str, dict]:
    try:
        return json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # unreadable: every checkpoint counts as unrecorded, none is trusted


def _write_records(directory: Path, records: dict[str, dict]) -> None:
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(records, indent=2, sort_keys=True) + "\n")


def problem_with(path: Path) -> str | None:
    """Why `path` cannot be trusted as a checkpoint (None when it matches its record)."""
    path = Path(path)
    record = read_records(path.parent).get(path.name)
    if not path.is_file():
        return f"{path} does not exist"
    if record is None:
        return f"{path} is not recorded in {path.parent / MANIFEST} (the process stopped while saving it)"
    size = path.stat().st_size
    if size != record["size"]:
        return f"{path} is {size} bytes, {record['size']} were saved (truncated or replaced)"
    if sha256_file(path) != record["sha256"]:
        return f"{path} does not match the sha256 recorded when it was saved (corrupt)"
    return None


def checkpoints_in(directory: Path) -> list[Path]:
    """Checkpoint files in `directory`, oldest step first."""
    return sorted(Path(directory).glob(PATTERN))


def last_good_checkpoint(directory: Path, log: Callable[[str], None] = lambda message: None) -> Path | None:
    """The newest checkpoint that matches its record; newer ones that do not are logged and skipped."""
    for path in reversed(checkpoints_in(directory)):
        problem = problem_with(path)
        if problem is None:
            return path
        log(f"skipping checkpoint: {problem}")
    return None


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic saves, sha256 records and verified, pickle-free loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        try:
            with atomic_writer(path) as f:
                torch.save(checkpoint, f)
            records = read_records(path.parent)
            records[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
            _write_records(path.parent, records)
        except OSError as e:
            kept = last_good_checkpoint(path.parent)
            reason = "no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            raise CheckpointSaveFailed(
                f"could not save checkpoint {path.name}: {reason}; "
                + (f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint exists")) from e

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        problem = problem_with(Path(path))
        if problem is not None:
            raise CheckpointError(problem)
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path} holds objects other than tensors and plain values; refusing to unpickle it "
                                  f"({first_line(e)})") from None

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        path.unlink(missing_ok=True)
        records = read_records(path.parent)
        if records.pop(path.name, None) is not None:
            _write_records(path.parent, records)
