"""`make lora-compare` at toy size: the table's numbers are the runs' own."""

import json
import subprocess
import sys
from types import SimpleNamespace

from conftest import cli

from slmctl.bench import lora_compare


def in_this_process(command, **kwargs):
    """`python -m slmctl ARGS` as lora_compare runs it, run by conftest's `cli` in this process: the
    four runs' own work takes seconds, a fresh interpreter's imports ~7 s each. (The fresh processes
    keep each run's peak memory its own; tests/model/test_lora.py measures peaks that way.)"""
    assert command[:3] == [sys.executable, "-m", "slmctl"], command
    result = cli(*command[3:])
    return subprocess.CompletedProcess(command, result.exit_code, result.stdout, result.stderr)


def test_the_comparison_reports_what_its_runs_measured(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lora_compare, "subprocess", SimpleNamespace(run=in_this_process))
    world = ["data.n_people=200", "data.train_examples=160", "data.validation_examples=16"]
    report = lora_compare.main(["--workdir", str(tmp_path), "--model", "tiny", "--base-steps", "2", "--steps", "3",
                                "--rank", "2", "--eval-limit", "4", "--data", *world])
    assert json.loads((tmp_path / "lora-compare.json").read_text()) == report
    for name in ("full", "lora"):
        row = report["rows"][name]
        summary = json.loads((tmp_path / "runs" / "pretrain" / row["run"].rsplit("/", 1)[-1] / "status.json").read_text())
        assert row["val_loss"] == round(summary["summary"]["val_loss"], 4) and summary["summary"]["steps"] == 3
    assert report["rows"]["lora"]["trainable_parameters"] < report["rows"]["full"]["trainable_parameters"]
    assert report["val_loss_ratio"] == round(report["rows"]["lora"]["val_loss"] / report["rows"]["full"]["val_loss"], 4)
    assert "| lora | 0.005 |" in capsys.readouterr().out
