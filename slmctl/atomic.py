"""Atomic file writes: a temporary file in the same directory, fsync, then rename, so a
killed process never leaves a half-written file that looks whole (and a failed write, such
as a full disk, leaves the previous file untouched)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file to write; on a clean exit it becomes `path`, on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_figure(figure, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as a PNG at `path` atomically, then close it."""
    import matplotlib.pyplot as plt

    with atomic_writer(path) as f:
        figure.savefig(f, format="png", dpi=dpi)
    plt.close(figure)


def set_new_file_mode(path: str | Path) -> None:
    """Give `path` the mode `open()` would have: for files written by code that leaves them 0600
    (mkstemp; safetensors' `save_file`, also under transformers' `save_pretrained`)."""
    os.chmod(path, new_file_mode())


def new_file_mode() -> int:
    """The mode `open()` gives a new file, 0o666 less the umask, for files made by mkstemp
    (always 0600): a teammate on a shared filesystem must be able to read what a run wrote."""
    return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process umask, read from /proc where Linux offers it: setting it to read it back
    would briefly change it for every thread of the process."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
