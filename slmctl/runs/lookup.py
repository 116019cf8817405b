"""Finding runs and reading them: `latest`, references to runs, listings, status, metrics,
manifests and lineage. Nothing here writes; a run's life (create, write, seal) is slmctl.runs.run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from slmctl.errors import UserError
from slmctl.integrity import file_problem

STATUSES = ("running", "succeeded", "failed", "interrupted")
SEALED_STATUSES = ("succeeded", "failed")
INPUT_KINDS = ("run", "file", "hub", "preset")
LATEST = "latest"
MANIFEST = "MANIFEST.json"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"  # the pid of the process writing the run; two processes never write one run
RANK_LOGS = "ranks"  # ranks/rank-<N>.log: what the other processes of a multi-process run logged
# Files the Run object keeps itself; write_text/json/bytes refuse them.
BOOKKEEPING_FILES = ("config.yaml", "command.txt", "env.json", "status.json", "metrics.jsonl", "log.txt",
                     "inputs.json", MANIFEST)
# Left out of the manifest because they change after it is written (or are it).
NOT_IN_MANIFEST = (MANIFEST, "status.json", "log.txt", "metrics.jsonl", LOCK)
KEY_METRICS = ("val_loss", "loss", "score")
VERSIONED_PACKAGES = ("torch", "lightning", "transformers", "onnx", "onnxruntime")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RunError(UserError):
    """A run directory problem; the message is one line naming the problem and the fix."""



# ---- finding runs ---------------------------------------------------------------------


@dataclass
class RunInfo:
    stage: str
    name: str
    path: Path
    status: str
    started: datetime
    seconds: float | None
    key_metric: tuple[str, Any] | None


def latest_run(runs_dir: str | Path, stage: str) -> Path | None:
    """The newest succeeded run of `stage`: the one `<stage>/latest` points to when that
    link is intact, else the succeeded run that finished last (by status.json)."""
    stage_dir = Path(runs_dir) / stage
    link = stage_dir / LATEST
    if link.is_symlink():
        target = stage_dir / os.readlink(link)
        status = read_status(target)
        if status is not None and status["status"] == "succeeded":
            return target.resolve()
    newest, newest_key = None, None
    for run_dir in run_directories(stage_dir):
        status = read_status(run_dir)
        if status is None or status["status"] != "succeeded":
            continue
        key = (datetime.fromisoformat(status["finished"] or status["started"]), run_dir.name)
        if newest_key is None or key > newest_key:
            newest, newest_key = run_dir, key
    return newest.resolve() if newest is not None else None


def resolve_run(ref: str | Path, runs_dir: str | Path) -> Path:
    """The run directory `ref` names. Accepted forms: a run directory path;
    `<runs_dir>/<stage>/latest` (or any `.../<stage>/latest`); `<stage>/latest`;
    `latest:<stage>`; `<stage>/<time>-<name>` or `<time>-<name>` under runs_dir."""
    runs_dir = Path(runs_dir)
    text = str(ref)
    if text.startswith(f"{LATEST}:"):
        return require_latest(runs_dir / text[len(LATEST) + 1:])
    path = Path(text)
    if path.name == LATEST:
        stage_dir = path.parent
        if (len(path.parts) == 2 and not path.is_absolute()) or not stage_dir.is_dir():
            stage_dir = runs_dir / stage_dir.name  # "<stage>/latest", or a runs/ that lives elsewhere
        return require_latest(stage_dir)
    if path.is_dir():
        if read_status(path) is None:
            raise RunError(f"{path} is not a run directory (no readable status.json); "
                           f"pass runs/<stage>/<time>-<name> or runs/<stage>/latest")
        return path.resolve()
    candidates = [runs_dir / path]
    if len(path.parts) == 1 and runs_dir.is_dir():
        candidates += [stage_dir / path for stage_dir in sorted(runs_dir.iterdir()) if stage_dir.is_dir()]
    found = [candidate for candidate in candidates if read_status(candidate) is not None]
    if len(found) > 1:
        raise RunError(f"run name {text!r} is ambiguous: {', '.join(str(f) for f in found)}; pass <stage>/{text}")
    if found:
        return found[0].resolve()
    raise RunError(f"no run {text!r}: not a run directory and not under {runs_dir}/<stage>/; "
                   f"pass a run directory, <stage>/latest or latest:<stage>")


def require_latest(stage_dir: Path) -> Path:
    stage = stage_dir.name
    if not stage:
        raise RunError("'latest' needs a stage: pass <stage>/latest or latest:<stage>")
    found = latest_run(stage_dir.parent, stage)
    if found is None:
        raise RunError(f"no succeeded {stage} run under {stage_dir.parent}/ (run `slmctl {stage}` first)")
    return found


def verify_artifact(path: Path) -> None:
    """Refuse a model or export directory inside a finished run whose files no longer match
    the run's MANIFEST.json (changed, truncated or replaced after the run finished). Outside a
    run, or in a run without a manifest, there is nothing to check against."""
    path = Path(path).resolve()
    run_dir = owning_run(path)
    if run_dir is None or not (run_dir / MANIFEST).is_file():
        return
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunError(f"{run_dir / MANIFEST} is unreadable ({e}); the run is damaged") from None
    inside = path.relative_to(run_dir.resolve()).as_posix()
    for relative, expected in manifest.items():
        if inside != "." and relative != inside and not relative.startswith(inside + "/"):
            continue
        problem = file_problem(run_dir / relative, expected)
        if problem is not None:
            raise RunError(f"{run_dir / relative}: {problem}, since its run finished (checked against "
                           f"{run_dir / MANIFEST}); restore it or run the stage again")


def model_label(path: Path) -> str:
    """A short name for a model directory in tables: its run's name (plus /control for a distill
    run's control student), else the directory's name."""
    path = Path(path)
    run_dir = owning_run(path)
    if run_dir is None:
        return path.name
    inner = path.relative_to(run_dir).parts[:-1]  # e.g. ("control",) for control/model
    name = run_dir.name.split("-", 2)[-1] if run_dir.name[:8].isdigit() else run_dir.name
    return "/".join([name, *inner])


def list_runs(runs_dir: str | Path, stage: str | None = None) -> list[RunInfo]:
    """Every run (of one stage, or all), newest started first."""
    runs_dir = Path(runs_dir)
    if stage is not None:
        stage_dirs = [runs_dir / stage]
    else:
        stage_dirs = sorted(d for d in runs_dir.iterdir() if d.is_dir()) if runs_dir.is_dir() else []
    infos = []
    for stage_dir in stage_dirs:
        for run_dir in run_directories(stage_dir):
            status = read_status(run_dir)
            if status is None:
                continue
            infos.append(RunInfo(stage=stage_dir.name, name=status.get("name", run_dir.name), path=run_dir,
                                 status=status["status"], started=datetime.fromisoformat(status["started"]),
                                 seconds=status.get("seconds"), key_metric=key_metric(run_dir, status)))
    infos.sort(key=lambda info: (info.started, info.path.name), reverse=True)
    return infos


def run_directories(stage_dir: Path) -> list[Path]:
    """Candidate run directories in a stage directory (not `latest`, not hidden)."""
    if not stage_dir.is_dir():
        return []
    return sorted(d for d in stage_dir.iterdir()
                  if d.is_dir() and not d.is_symlink() and not d.name.startswith(".") and d.name != LATEST)


def key_metric(run_dir: Path, status: dict) -> tuple[str, Any] | None:
    """The summary's first of val_loss/loss/score, else the last logged val_loss."""
    summary = status.get("summary") or {}
    for name in KEY_METRICS:
        if name in summary:
            return name, summary[name]
    try:
        metrics = read_metrics(run_dir / "metrics.jsonl")
    except RunError:
        return None
    val_losses = [record["val_loss"] for record in metrics if "val_loss" in record]
    return ("val_loss", val_losses[-1]) if val_losses else None


# ---- files ----------------------------------------------------------------------------


def read_status(run_dir: str | Path) -> dict | None:
    """status.json as a dict, or None if it is missing, unreadable or not a status."""
    try:
        status = json.loads((Path(run_dir) / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get("status") not in STATUSES or "started" not in status:
        return None
    return status


def owning_run(path: Path) -> Path | None:
    """The run directory `path` is (or lies inside), or None."""
    for candidate in (path, *path.parents):
        if read_status(candidate) is not None:
            return candidate
    return None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as a list of dicts. A process killed mid-append can leave a partial
    last line (no newline after it); that line is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    complete_lines = text.split("\n")[:-1]
    records = []
    for number, line in enumerate(complete_lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise RunError(f"{path}:{number} is not JSON; the metrics file is damaged") from None
    return records




def manifest_files(run_dir: Path) -> list[str]:
    """Run-relative forward-slash paths of every file the manifest covers."""
    files = []
    for directory, subdirectories, filenames in os.walk(run_dir):
        relative_dir = Path(directory).relative_to(run_dir)
        if relative_dir == Path("."):
            subdirectories[:] = [d for d in subdirectories if d not in (CHECKPOINTS, RANK_LOGS)]
        for filename in filenames:
            relative = (relative_dir / filename).as_posix()
            if relative not in NOT_IN_MANIFEST:
                files.append(relative)
    return sorted(files)




def verify_manifest(run_dir: str | Path) -> list[str]:
    """Problems with a run's files against its MANIFEST.json (missing, size or sha256
    mismatch, or added afterwards); an empty list when the run is intact."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{manifest_path} is missing (only succeeded runs have one)"]
    except (OSError, ValueError) as e:
        return [f"{manifest_path} is unreadable: {e}"]
    problems = []
    for relative, expected in manifest.items():
        problem = file_problem(run_dir / relative, expected)
        if problem is not None:
            problems.append(f"{relative}: {problem}")
    for relative in manifest_files(run_dir):
        if relative not in manifest:
            problems.append(f"{relative}: not in the manifest (added after the run finished)")
    return problems


