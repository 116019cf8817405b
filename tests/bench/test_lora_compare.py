"""`make lora-compare` at toy size: the table's numbers are the runs' own."""

import json

from slmctl.bench.lora_compare import main


def test_the_comparison_reports_what_its_runs_measured(tmp_path, capsys):
    world = ["data.n_people=200", "data.train_examples=160", "data.validation_examples=16"]
    report = main(["--workdir", str(tmp_path), "--model", "tiny", "--base-steps", "2", "--steps", "3", "--rank", "2",
                   "--eval-limit", "4", "--data", *world])
    assert json.loads((tmp_path / "lora-compare.json").read_text()) == report
    for name in ("full", "lora"):
        row = report["rows"][name]
        summary = json.loads((tmp_path / "runs" / "pretrain" / row["run"].rsplit("/", 1)[-1] / "status.json").read_text())
        assert row["val_loss"] == round(summary["summary"]["val_loss"], 4) and summary["summary"]["steps"] == 3
    assert report["rows"]["lora"]["trainable_parameters"] < report["rows"]["full"]["trainable_parameters"]
    assert report["val_loss_ratio"] == round(report["rows"]["lora"]["val_loss"] / report["rows"]["full"]["val_loss"], 4)
    assert "| lora | 0.005 |" in capsys.readouterr().out
