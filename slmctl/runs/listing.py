"""Runs as a person reads them: the table of `slmctl runs` and the page of `slmctl runs show`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rich.table import Table

from slmctl.runs.lookup import MANIFEST, RunInfo, read_status


def runs_table(found: list[RunInfo], runs_dir: Path) -> Table:
    """One row a run: stage, directory, status, age and its key metric."""
    table = Table(title=f"runs under {runs_dir}")
    for column in ("stage", "run", "status", "age", "key metric"):
        table.add_column(column)
    now = datetime.now(timezone.utc)
    for info in found:
        has_metric = info.key_metric and isinstance(info.key_metric[1], (int, float))
        metric = f"{info.key_metric[0]}={info.key_metric[1]:.4g}" if has_metric else ""
        table.add_row(info.stage, info.path.name, info.status, age(now - info.started) if info.started else "", metric)
    return table


def describe_run(path: Path) -> list[str]:
    """A run's status, summary, inputs (lineage) and artifacts, as lines (Rich markup)."""
    status = read_status(path) or {}
    lines = [f"[bold]{path}[/bold]  stage={status.get('stage', path.parent.name)}  status={status.get('status')}"]
    if status.get("error"):
        lines.append(f"error: {status['error']}")
    lines += [f"  {key}: {value}" for key, value in (status.get("summary") or {}).items()]
    try:
        inputs = json.loads((path / "inputs.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        inputs = []
    lines.append("inputs:" if inputs else "inputs: none")
    for item in inputs:
        role = f"{item['role']} " if item.get("role") else ""
        lines.append(f"  {role}{item.get('kind')}: {item.get('ref')} -> {item.get('path')}")
    manifest = path / MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text())
        lines.append(f"artifacts: {len(files)} files, {sum(v['size'] for v in files.values()) / 1e6:.1f} MB")
    return lines


def age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
