"""Faults during training: signals, kills at any moment, corrupt checkpoints, full disks.
Each test states a guarantee listed in docs/failure-modes.md."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import LEARNING_DATA, CountSteps, Crash, cli, resumed_from, stage_runs, train_run, wait_for_steps
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from safetensors.torch import load_file

from slmctl.config.compose import compose
from slmctl.errors import CheckpointError
from slmctl.runs.run import Run
from slmctl.train import pretrain
from slmctl.train.checkpoints import MANIFEST, VerifiedCheckpointIO, last_good_checkpoint, problem_with
from slmctl.interrupts import Stopped

# dropout on: a resumed run ends with the uninterrupted run's weights only if its random state was restored too
WITH_DROPOUT = ["model=tiny", "model.dropout=0.1", *LEARNING_DATA, "trainer.log_every_n_steps=1",
                "trainer.val_check_interval=5"]


def resume(run_path, overrides, steps):
    """Resume the run; it must run exactly `steps` steps (the rest after its checkpoint)."""
    cfg = OmegaConf.merge(compose("pretrain", [*WITH_DROPOUT, *overrides]), {"resume": str(run_path)})
    run = Run.open(run_path)
    run.resume()
    counted = CountSteps()
    pretrain.run(cfg, run, callbacks=[counted])
    assert counted.steps == steps
    return run


def same_weights(a, b):
    wa, wb = load_file(a.model_dir / "model.safetensors"), load_file(b.model_dir / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class SendSignal(Callback):
    """Sends this process `signum` during step `step`, as a user's Ctrl-C or a scheduler would."""

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("whole") / "runs", "pretrain",
                     [*WITH_DROPOUT, "trainer.max_steps=10", "checkpoint_every=4"], name="whole")


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_the_resumed_run_matches(tmp_path, uninterrupted):
    overrides = ["trainer.max_steps=10", "checkpoint_every=4"]
    cfg = compose("pretrain", [*WITH_DROPOUT, *overrides])
    run = Run.create(tmp_path / "runs", "pretrain", "stopped", cfg, argv=["test"])
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN under a background job
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # what an interactive Ctrl-C reaches
    try:
        with pytest.raises(Stopped, match="stopped by SIGINT after step 7; checkpoint saved: checkpoints/step-00000007.ckpt"):
            pretrain.run(cfg, run, callbacks=[SendSignal(6, signal.SIGINT)])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are given back
    finally:
        signal.signal(signal.SIGINT, before)
    assert problem_with(run.checkpoint_dir / "step-00000007.ckpt") is None
    assert same_weights(resume(run.path, overrides, steps=10 - 7), uninterrupted)
    assert resumed_from(run.path) == ["resumed from step 7 (checkpoint checkpoints/step-00000007.ckpt); 3 steps to go"]


class HandlerDuringTraining(Callback):
    def on_train_batch_start(self, trainer, *args):
        self.seen = signal.getsignal(signal.SIGINT)


def test_a_run_started_with_sigint_ignored_keeps_it_ignored(tmp_path):
    """A background job or nohup starts the process with SIGINT ignored: training leaves it so (a Ctrl-C
    meant for the shell's foreground job must not stop it) and gives it back ignored."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        watch = HandlerDuringTraining()
        train_run(tmp_path / "runs", "pretrain", [*WITH_DROPOUT, "trainer.max_steps=2"], callbacks=[watch])
        assert watch.seen is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigterm_to_the_cli_marks_the_run_interrupted_and_resume_unfinished_finishes_it(tmp_path):
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "slmctl", "pretrain", *WITH_DROPOUT, "trainer.max_steps=100000", "checkpoint_every=100000",
               "--runs-dir", str(runs)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(runs, "pretrain", 3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "stopped by SIGTERM after step" in stderr and "resume with: slmctl pretrain resume=" in stderr
    (run_dir,) = stage_runs(runs, "pretrain")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and "SIGTERM" in status["error"]
    saved = last_good_checkpoint(run_dir / "checkpoints")
    step = int(saved.stem.split("-")[1])
    assert step >= 3 and not (run_dir / ".lock").exists()
    assert (run_dir / "checkpoints" / MANIFEST).is_file()


def test_a_corrupt_or_unrecorded_newest_checkpoint_is_skipped_and_the_resumed_run_still_matches(tmp_path, uninterrupted):
    overrides = ["trainer.max_steps=10", "checkpoint_every=2"]
    cfg = compose("pretrain", [*WITH_DROPOUT, *overrides])
    killed = Run.create(tmp_path / "runs", "pretrain", "killed", cfg, argv=["test"])
    with pytest.raises(SystemExit):
        pretrain.run(cfg, killed, callbacks=[Crash(7)])
    newest = killed.checkpoint_dir / "step-00000006.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    newest.write_bytes(bytes(data))
    (killed.checkpoint_dir / "step-00000007.ckpt").write_bytes(b"half a checkpoint")  # killed before its record
    assert "corrupt" in problem_with(newest)
    assert "not recorded" in problem_with(killed.checkpoint_dir / "step-00000007.ckpt")

    resumed = resume(killed.path, ["trainer.max_steps=10", "checkpoint_every=4"], steps=10 - 4)
    log = (resumed.path / "log.txt").read_text()
    assert "skipping checkpoint" in log and "resumed from step 4 (checkpoint checkpoints/step-00000004.ckpt); 6 steps to go" in log
    assert same_weights(resumed, uninterrupted)


def test_loading_a_damaged_checkpoint_is_a_one_line_error(tmp_path):
    io = VerifiedCheckpointIO()
    path = tmp_path / "step-00000001.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
    assert io.load_checkpoint(path)["global_step"] == 1
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"is 100 bytes, \d+ were saved \(truncated or replaced\)") as error:
        io.load_checkpoint(path)
    assert "\n" not in str(error.value)


def test_a_full_disk_while_saving_fails_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from slmctl.train import checkpoints

    real_save, saves = torch.save, []

    def save_until_the_disk_is_full(obj, f):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(checkpoints.torch, "save", save_until_the_disk_is_full)
    result = cli("pretrain", *WITH_DROPOUT, "trainer.max_steps=10", "checkpoint_every=2", runs=tmp_path / "runs")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "could not save checkpoint step-00000004.ckpt: no space left on device" in message
    (run_dir,) = [p for p in (tmp_path / "runs" / "pretrain").iterdir()]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "no space left" in status["error"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [MANIFEST, "step-00000002.ckpt"]
    assert problem_with(run_dir / "checkpoints" / "step-00000002.ckpt") is None


def test_a_full_disk_while_writing_the_model_fails_the_run_with_one_line(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "model/model.safetensors")

    monkeypatch.setattr(pretrain, "save_trained", no_space)
    result = cli("pretrain", *WITH_DROPOUT, "trainer.max_steps=2", "checkpoint_every=2", runs=tmp_path / "runs")
    assert result.exit_code == 1
    assert "no space left on device writing model/model.safetensors" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    (run_dir,) = [p for p in (tmp_path / "runs" / "pretrain").iterdir()]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


def test_sigkill_while_checkpointing_every_step_leaves_a_run_that_resumes_to_the_same_weights(tmp_path):
    """kill -9 lands wherever it lands (here: while checkpoints are written every step); the
    killed run still says "running", its lock names a dead process, and resume=unfinished finishes it."""
    runs = tmp_path / "runs"
    overrides = ["trainer.max_steps=16", "checkpoint_every=1"]
    process = subprocess.Popen([sys.executable, "-m", "slmctl", "pretrain", *WITH_DROPOUT, *overrides, "--runs-dir", str(runs)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(runs.glob("pretrain/*/checkpoints/step-*.ckpt"))) < 5:
        time.sleep(0.05)
    process.kill()
    process.wait()
    (run_dir,) = stage_runs(runs, "pretrain")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    assert last_good_checkpoint(run_dir / "checkpoints") is not None

    result = cli("pretrain", "resume=unfinished", runs=runs)
    assert result.exit_code == 0, result.output
    assert "taking over the lock of process" in (run_dir / "log.txt").read_text()
    whole = train_run(tmp_path / "whole" / "runs", "pretrain", [*WITH_DROPOUT, *overrides], name="whole")
    assert same_weights(Run.open(run_dir), whole)


SLOW_THIRD_STEP = """
import sys, time
from pathlib import Path
from slmctl.train.module import LMTrainingModule
marker, step = Path(sys.argv.pop(1)), LMTrainingModule.training_step
def slow(self, batch, batch_idx):
    if self.global_step == 2:  # a step that takes a minute, begun after the run's first two
        marker.touch()
        for _ in range(600):  # in short waits, as compute returns to Python: a signal that the kernel hands
            time.sleep(0.1)   # to another of the process's threads wakes no sleep of the main thread's
    return step(self, batch, batch_idx)
LMTrainingModule.training_step = slow
from slmctl.cli import main
main()
"""


# slow: under the full suite's two workers on a 2-core machine it timed out in 5 of 7 runs (2026-12-07, at the previous
# commit too), alone or beside the other training tests never; `make test-slow` runs it until the cause is found
@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_finishing_the_step(tmp_path):
    """The first SIGINT asks for a stop after the step in flight; a second one does not wait for
    it (here a step that takes a minute): the process ends within seconds, exit 130, the run
    interrupted and no checkpoint of the unfinished step."""
    runs, marker = tmp_path / "runs", tmp_path / "in-step-3"
    process = subprocess.Popen([sys.executable, "-c", SLOW_THIRD_STEP, str(marker), "pretrain", *WITH_DROPOUT,
                                "trainer.max_steps=10", "checkpoint_every=100", "--runs-dir", str(runs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not marker.exists() and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        second = time.time()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)  # the step alone would take 60 s
    finally:
        process.kill()
    assert time.time() - second < 20
    assert process.returncode == 130, stderr
    (run_dir,) = stage_runs(runs, "pretrain")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert not list(run_dir.glob("checkpoints/*.ckpt")) and not (run_dir / ".lock").exists()
