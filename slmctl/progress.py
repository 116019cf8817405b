"""Progress files: a stage's finished results, appended to a jsonl in its run as they are computed.

A long eval or bench that is stopped (Ctrl-C, SIGTERM, kill -9) loses at most the batch or
configuration it was working on: `slmctl <stage> resume=RUN` reads the progress file back
and computes only what is not in it. Appends are plain `open(..., "a")` writes (the run's
other files are written atomically); a process killed mid-write leaves a partial last line,
which `read_progress` ignores and cuts off so the next append starts on a line of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from slmctl.runs.lookup import read_metrics
from slmctl.runs.run import plain

PROGRESS_DIR = "progress"  # inside the run directory


def read_progress(path: Path) -> list[dict]:
    """The complete records of a progress file (none when there is no file yet), with any
    partial last line removed from the file."""
    records = read_metrics(path)  # same format as metrics.jsonl: a partial last line is skipped
    if path.is_file():
        data = path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            os.truncate(path, complete)
    return records


def append_progress(path: Path, records: list[dict]) -> None:
    """Append `records`, one JSON line each, in one write, flushed: a kill loses at most these."""
    if not records:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(record, ensure_ascii=False, default=plain) + "\n" for record in records))
        f.flush()
