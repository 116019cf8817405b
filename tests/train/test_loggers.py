"""Experiment trackers beside metrics.jsonl: TensorBoard, MLflow (file store), W&B (offline) and CSV,
each writing the training loss inside the run directory, with no network."""

import csv

from conftest import TINY_PRETRAIN, cli, newest_run


def test_every_tracker_records_the_training_loss_inside_the_run(tmp_path):
    runs = tmp_path / "runs"
    result = cli("pretrain", *TINY_PRETRAIN, "trainer.log_every_n_steps=1", "logger=[csv,tensorboard,mlflow,wandb]",
                 runs=runs)
    assert result.exit_code == 0, result.output
    loggers = newest_run(runs, "pretrain") / "loggers"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(loggers / "tensorboard" / "main"))
    events.Reload()
    assert len(events.Scalars("train_loss")) == 3

    (history,) = loggers.glob("mlruns/*/*/metrics/train_loss")  # one experiment, one MLflow run
    assert len(history.read_text().splitlines()) == 3

    with open(loggers / "csv" / "main" / "metrics.csv") as f:
        assert sum(1 for row in csv.DictReader(f) if row.get("train_loss")) == 3

    (offline,) = loggers.glob("wandb/wandb/offline-run-*/*.wandb")
    assert offline.stat().st_size > 0


def test_one_tracker_needs_no_brackets_and_an_unknown_one_is_one_line(tmp_path):
    runs = tmp_path / "runs"
    assert cli("pretrain", *TINY_PRETRAIN, "logger=tensorboard", runs=runs).exit_code == 0
    assert list((newest_run(runs, "pretrain") / "loggers" / "tensorboard" / "main").glob("events.out.tfevents.*"))
    bad = cli("pretrain", *TINY_PRETRAIN, "logger=neptune", runs=runs)
    assert bad.exit_code == 2 and "neptune" in bad.stderr and "tensorboard" in bad.stderr
