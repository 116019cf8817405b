"""The child process of `slmctl bench isolate=true`: measures one model and prints one JSON
line per configuration ([key, record]) on stdout as each is measured; progress goes to stderr.

    python -m slmctl.bench.isolated < job.json     (started by slmctl.bench.stage, not by hand)
"""

from __future__ import annotations

import json
import sys

import torch
from omegaconf import OmegaConf
from rich.console import Console

from slmctl.bench.stage import measure_model


def main() -> None:
    job = json.loads(sys.stdin.read())
    cfg = OmegaConf.create(job["cfg"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    records_out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not break the lines the parent parses
    for key, record in measure_model(cfg, job["ref"], job["runs_dir"], job["environment"], job["profile"], job["skip"],
                                     Console(stderr=True)):
        print(json.dumps([list(key), record]), file=records_out, flush=True)


if __name__ == "__main__":
    main()
