"""A run directory's life: create (never reusing a directory), write artifacts atomically,
log, record lineage, then seal it (succeeded: MANIFEST.json and `latest`), fail it, or mark it
interrupted so that it can be reopened and resumed. Finding and reading runs: slmctl.runs.lookup.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from slmctl import __version__
from slmctl.atomic import atomic_write_bytes, atomic_write_text
from slmctl.errors import first_line
from slmctl.files import MODEL_DIR
from slmctl.integrity import sha256_file
from slmctl.runs.lookup import (BOOKKEEPING_FILES, CHECKPOINTS, INPUT_KINDS, LATEST, LOCK, MANIFEST, RANK_LOGS, SAFE_NAME, SEALED_STATUSES,
                                RunError, manifest_files, owning_run, read_metrics, read_status)

VERSIONED_PACKAGES = ("torch", "lightning", "transformers", "onnx", "onnxruntime")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


class Run:
    """One run directory. Make one with `Run.create`, or reopen one with `Run.open`.

    In a multi-process (DDP/FSDP) run only global rank 0 writes; the other ranks hold a
    `Run.follow` view whose writes are skipped and whose log goes to ranks/rank-<N>.log."""

    rank = 0

    def __init__(self, path: Path, stage: str, name: str, started: datetime, status: str):
        self.path = path
        self.stage = stage
        self.name = name
        self.started = started
        self._status = status  # what this object last wrote to (or read from) status.json

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run (global rank 0)."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self._status!r})"

    @property
    def runs_dir(self) -> Path:
        """The directory of all runs this one sits in (<runs_dir>/<stage>/<run>): where the
        other runs a stage names are looked up."""
        return self.path.parent.parent

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    # ---- making and opening -------------------------------------------------------

    @classmethod
    def create(cls, runs_dir: str | Path, stage: str, name: str, config: dict | DictConfig, argv: list[str],
               device: str = "cpu") -> Run:
        """A new run directory, marked running. Never reuses a directory: a second run
        started in the same second gets a `-2` (then `-3`, ...) suffix."""
        check_name(stage, "stage")
        check_name(name, "run name")
        config_yaml = config_to_yaml(config)  # before the directory exists: a bad config leaves nothing behind
        stage_dir = Path(runs_dir).resolve() / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        started = utc_now()
        path = claim_directory(stage_dir, f"{started:%Y%m%d-%H%M%S}-{name}")
        run = cls(path, stage, name, started, "running")
        run._lock()
        atomic_write_text(path / "config.yaml", config_yaml)
        atomic_write_text(path / "command.txt", shlex.join(str(arg) for arg in argv) + "\n")
        atomic_write_text(path / "env.json", to_json(environment(device)))
        atomic_write_text(path / "inputs.json", to_json([]))
        run._write_status("running")
        return run

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Reopen an existing run directory (to read it, or to resume an interrupted run)."""
        path = Path(path)
        status = read_status(path)
        if status is None or not (path / "config.yaml").is_file():
            raise RunError(f"{path} is not a run directory (no readable status.json and config.yaml); "
                           f"pass a directory like runs/<stage>/<time>-<name>")
        path = path.resolve()
        return cls(path, status.get("stage", path.parent.name), status.get("name", path.name),
                   datetime.fromisoformat(status["started"]), status["status"])

    @classmethod
    def follow(cls, path: str | Path, rank: int) -> Run:
        """Rank `rank`'s read-only view of the run rank 0 writes."""
        run = cls.open(path)
        run.rank = rank
        return run

    def resume(self) -> None:
        """Mark an interrupted (or killed, still "running") run as running again; refused while
        another live process holds the run's lock."""
        if not self.is_writer:
            return
        self._check_writable()
        self._lock()
        self._write_status("running")
        self._append_log("resumed")

    # ---- reading ------------------------------------------------------------------

    def status(self) -> dict:
        status = read_status(self.path)
        if status is None:
            raise RunError(f"{self.path / 'status.json'} is missing or unreadable; the run directory is damaged")
        return status

    def config(self) -> dict:
        return OmegaConf.to_container(OmegaConf.load(self.path / "config.yaml"), resolve=True)

    def metrics(self) -> list[dict]:
        return read_metrics(self.path / "metrics.jsonl")

    def inputs(self) -> list[dict]:
        path = self.path / "inputs.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []

    # ---- writing ------------------------------------------------------------------

    def write_text(self, rel: str | Path, text: str) -> Path:
        path = self._artifact_path(rel)
        if self.is_writer:
            atomic_write_text(path, text)
        return path

    def write_json(self, rel: str | Path, obj: Any) -> Path:
        return self.write_text(rel, to_json(obj))

    def write_bytes(self, rel: str | Path, data: bytes) -> Path:
        path = self._artifact_path(rel)
        if self.is_writer:
            atomic_write_bytes(path, data)
        return path

    def log(self, message: str) -> None:
        """Append "<iso time> message" to log.txt."""
        self._check_writable()
        self._append_log(message)

    def log_metrics(self, metrics: dict) -> None:
        """Append one JSON line to metrics.jsonl ("time" is added if absent)."""
        self._check_writable()
        if not self.is_writer:
            return
        record = dict(metrics)
        record.setdefault("time", iso(utc_now()))
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=plain) + "\n")
            f.flush()

    def add_input(self, kind: str, ref: str, path: str | Path | None, stage: str | None = None,
                  role: str | None = None) -> None:
        """Record something this run consumed (lineage). Adding the same input twice
        (e.g. on resume) records it once. Run and file paths are stored resolved (a hub
        input's path is kept as given: it may be a hub id). For a run input (or a path
        inside one, like its model/) the stage defaults to that run's stage. `role` says what the
        input was for when a stage takes several models (e.g. "teacher", "student")."""
        self._check_writable()
        if not self.is_writer:
            return
        if kind not in INPUT_KINDS:
            raise RunError(f"input kind {kind!r} is not one of {', '.join(INPUT_KINDS)}")
        if path is not None:
            path = str(path) if kind == "hub" else str(Path(path).resolve())
        if kind == "run" and stage is None and path is not None:
            run_dir = owning_run(Path(path))
            stage = read_status(run_dir).get("stage", run_dir.parent.name) if run_dir else None
        entry = {"kind": kind, "ref": str(ref), "path": path, "stage": stage} | ({"role": role} if role else {})
        inputs = self.inputs()
        if entry not in inputs:
            inputs.append(entry)
            atomic_write_text(self.path / "inputs.json", to_json(inputs))

    # ---- ending -------------------------------------------------------------------

    def succeed(self, summary: dict | None = None) -> None:
        """Write MANIFEST.json, mark the run succeeded, and point <stage>/latest at it."""
        self._check_writable()
        if not self.is_writer:
            return self._append_log("finished")
        atomic_write_text(self.path / MANIFEST, to_json(build_manifest(self.path)))
        self._write_status("succeeded", summary=summary or {})
        self._unlock()
        try:
            point_latest(self.path)
        except OSError as e:  # "latest" is a convenience: resolution scans status.json files without it
            self._append_log(f"could not point {self.path.parent / LATEST} at this run: {e}")

    def fail(self, error: str) -> None:
        """Mark the run failed with the first line of `error` (all of it goes to log.txt).
        Never touches "latest"."""
        self._check_writable()
        if not self.is_writer:
            return self._append_log(f"failed: {error}")
        self._append_log(f"failed: {error}")
        self._write_status("failed", error=first_line(error, default="failed"))
        self._unlock()

    def interrupt(self, error: str = "interrupted") -> None:
        """Mark the run interrupted; it stays writable so it can be resumed."""
        self._check_writable()
        if not self.is_writer:
            return self._append_log(error)
        self._append_log(error)
        self._write_status("interrupted", error=first_line(error, default="interrupted"))
        self._unlock()

    # ---- internals ----------------------------------------------------------------

    def _lock(self) -> None:
        """Take the run's lock file (O_EXCL create, our pid inside). A lock held by this process is
        ours already; one whose process is gone (killed) is stale and taken over."""
        lock = self.path / LOCK
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _lock_owner(lock)
                if owner == os.getpid():
                    return
                if owner is not None and _alive(owner):
                    raise RunError(f"{self.path} is in use by process {owner} (another slmctl is writing it); "
                                   f"wait for it to finish or stop it") from None
                self._append_log(f"taking over the lock of process {owner}, which is gone")
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return
        raise RunError(f"{self.path}: could not take the run's lock file {lock}")

    def _unlock(self) -> None:
        lock = self.path / LOCK
        if _lock_owner(lock) == os.getpid():
            lock.unlink(missing_ok=True)

    def _check_writable(self) -> None:
        if self._status in SEALED_STATUSES:
            raise RunError(f"run {self.path} has {self._status} and is sealed; "
                           f"start a new run instead of writing to it")

    def _artifact_path(self, rel: str | Path) -> Path:
        self._check_writable()
        root = self.path.resolve()
        target = (root / rel).resolve()
        if target == root or not target.is_relative_to(root):
            raise RunError(f"refusing to write {rel}: it is outside run {self.path}; pass a path relative to the run")
        relative = target.relative_to(root).as_posix()
        if relative in BOOKKEEPING_FILES:
            raise RunError(f"refusing to write {relative}: the run keeps it itself "
                           f"(use run.log, run.log_metrics, run.add_input or run.succeed)")
        return target

    def _append_log(self, message: str) -> None:
        log = self.path / "log.txt"
        if not self.is_writer:
            log = self.path / RANK_LOGS / f"rank-{self.rank}.log"
            log.parent.mkdir(exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{iso(utc_now())} {message}\n")
            f.flush()

    def _write_status(self, status: str, error: str | None = None, summary: dict | None = None) -> None:
        finished = None if status == "running" else utc_now()
        record = {
            "status": status,
            "error": error,
            "started": iso(self.started),
            "finished": iso(finished) if finished else None,
            "seconds": round((finished - self.started).total_seconds(), 3) if finished else None,
            "summary": summary or {},
            "stage": self.stage,
            "name": self.name,
        }
        atomic_write_text(self.path / "status.json", to_json(record))
        self._status = status




def point_latest(run_dir: Path) -> None:
    """Atomically make `<stage>/latest` a symlink to `run_dir` (by its name)."""
    link = run_dir.parent / LATEST
    temporary = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    temporary.unlink(missing_ok=True)
    try:
        os.symlink(run_dir.name, temporary)
        os.replace(temporary, link)
    finally:
        if temporary.is_symlink():
            temporary.unlink()


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def claim_directory(stage_dir: Path, base_name: str) -> Path:
    """Create and return stage_dir/base_name, or base_name-2, -3, ... if taken.
    mkdir is atomic, so two processes never claim the same directory."""
    path, attempt = stage_dir / base_name, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            attempt += 1
            path = stage_dir / f"{base_name}-{attempt}"




def build_manifest(run_dir: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "size"}} for every file in the run except MANIFEST.json,
    status.json, log.txt, metrics.jsonl, checkpoints/ and ranks/, which change after it is written."""
    return {relative: {"sha256": sha256_file(run_dir / relative), "size": (run_dir / relative).stat().st_size}
            for relative in manifest_files(run_dir)}




# ---- small helpers --------------------------------------------------------------------


def check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise RunError(f"{what} {name!r} is not a valid directory name; use letters, digits, '.', '_' and '-'")


def plain(value: Any) -> Any:
    """What json cannot write itself: tensors and numpy values, paths, datetimes, dataclasses."""
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=plain) + "\n"


def config_to_yaml(config: dict | DictConfig) -> str:
    """The fully resolved config as YAML (interpolations resolved, paths as strings)."""
    if not isinstance(config, (dict, DictConfig)):
        raise RunError(f"a run's config must be a dict or DictConfig, not {type(config).__name__}")
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except OmegaConfBaseException as e:
        raise RunError(f"the config cannot be resolved: {first_line(e)}") from None
    resolved = json.loads(json.dumps(resolved, default=plain))  # Path etc. -> plain YAML types
    return OmegaConf.to_yaml(OmegaConf.create(resolved))


def environment(device: str) -> dict:
    """Versions, git commit, machine and device, for env.json."""
    versions = {"python": platform.python_version(), "slmctl": __version__}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass  # not installed
    return {
        "versions": versions,
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": _torch_threads(),
        "device": str(device),
    }


def git_commit() -> str | None:
    """HEAD of the git repository holding the current directory, or None."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _torch_threads() -> int | None:
    import torch  # only when a run is created: listing runs stays fast

    return torch.get_num_threads()
