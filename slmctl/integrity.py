"""Files that prove they are whole: sha256 of a file, a file against its recorded digest, and a
directory sealed with `checksums.json` (sha256 and size of every other file).

The bottom layer: run manifests (slmctl.runs), model directories (slmctl.model) and the
tokenizer files beside them (slmctl.data) check their files with these. A sealed directory
copied out of its run can still be checked on its own: loading refuses a changed file unless
SLMCTL_SKIP_CHECKSUMS=1.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from slmctl.atomic import atomic_write_text
from slmctl.errors import CheckpointError, first_line

CHECKSUMS_FILE = "checksums.json"  # written last: {relative path: {"sha256", "size"}} of every other file
SKIP_CHECKSUMS = "SLMCTL_SKIP_CHECKSUMS"  # =1: load a directory whose files were changed on purpose


def file_problem(path: Path, expected: dict) -> str | None:
    """How `path` differs from its manifest entry {"sha256", "size"}, or None when it matches."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != expected["size"]:
        return f"size {path.stat().st_size}, manifest says {expected['size']}"
    if sha256_file(path) != expected["sha256"]:
        return "sha256 differs from the manifest (modified)"
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def seal(directory: str | Path) -> None:
    """Write checksums.json for every other file in the (model) directory, so that a copy of the
    directory made outside its run can still be checked. Call it after the last file is written."""
    from slmctl.integrity import sha256_file

    directory = Path(directory)
    checksums = {relative: {"sha256": sha256_file(directory / relative), "size": (directory / relative).stat().st_size}
                 for relative in sealed_files(directory)}
    atomic_write_text(directory / CHECKSUMS_FILE, json.dumps(checksums, indent=2) + "\n")


def sealed_files(directory: Path) -> list[str]:
    """Forward-slash paths, relative to `directory`, of every file checksums.json covers: all but
    itself and hidden files (a temporary left by a killed writer)."""
    files = []
    for folder, subfolders, names in os.walk(directory):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            relative = (Path(folder) / name).relative_to(directory).as_posix()
            if relative != CHECKSUMS_FILE and not name.startswith("."):
                files.append(relative)
    return sorted(files)


def verify_checksums(directory: str | Path, skip_weights: bool = False) -> None:
    """Refuse a model directory whose files differ from its checksums.json (a flipped byte, a
    truncated copy, a replaced tokenizer). Directories without one (saved by older versions,
    Hugging Face ones) are not checked, nor any with SLMCTL_SKIP_CHECKSUMS=1. `skip_weights`
    leaves the *.safetensors files to `load_model` (readers of the tokenizer need not hash them)."""
    directory = Path(directory)
    checksums_path = directory / CHECKSUMS_FILE
    if not checksums_path.is_file() or os.environ.get(SKIP_CHECKSUMS, "") not in ("", "0"):
        return
    fix = f"restore the directory from its run, or set {SKIP_CHECKSUMS}=1 to load it as it is"
    try:
        checksums = json.loads(checksums_path.read_text(encoding="utf-8"))
        entries = [(str(relative), {"sha256": str(entry["sha256"]), "size": int(entry["size"])})
                   for relative, entry in checksums.items()]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{checksums_path} is unreadable ({first_line(e)}); {fix}") from None
    from slmctl.integrity import file_problem

    for relative, expected in entries:
        path = directory / relative
        if skip_weights and relative.endswith(".safetensors"):
            continue
        if not path.resolve().is_relative_to(directory.resolve()):
            raise CheckpointError(f"{checksums_path} names {relative!r}, which is outside the model directory; {fix}")
        problem = file_problem(path, expected)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}, since the model was saved (checked against {checksums_path}); {fix}")
