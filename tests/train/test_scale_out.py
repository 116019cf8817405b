"""Multi-process training through Lightning's DDP strategy: two CPU processes (gloo) take the
same optimizer steps as one process with the same global batch, in every training stage, and
only rank 0 writes.

"The same steps": every logged training loss agrees, and each weight tensor's movement
(final - initial) agrees to 1e-3 of its size, after enough steps at a high enough learning rate
that the weights moved far beyond that tolerance (asserted)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import DISTILL_DATA, LEARNING_DATA, InitialWeights, cli, stage_runs, train_run, wait_for_steps
from safetensors.torch import load_file

from slmctl.runs.lookup import verify_manifest
from slmctl.runs.run import Run

# twelve steps at a high learning rate: the weights move far beyond the tolerance
TWELVE_FAST_STEPS = ["model=tiny", *LEARNING_DATA, "trainer.log_every_n_steps=1", "trainer.val_check_interval=6", "trainer.max_steps=12",
        "checkpoint_every=6", "optim.lr=3e-3", "optim.warmup_steps=2"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
LAUNCHES = {
    "lightning": [sys.executable, "-m", "slmctl", "pretrain"],  # Lightning starts the second process
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "slmctl", "pretrain"],
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    initial = InitialWeights()
    run = train_run(tmp_path_factory.mktemp("single") / "runs", "pretrain", TWELVE_FAST_STEPS, name="single", callbacks=[initial])
    return run, initial.fits[0]


def logged_losses(run_dir) -> dict[str, list[float]]:
    """Every loss in metrics.jsonl, by name, in logging order."""
    losses = {}
    for record in Run.open(run_dir).metrics():
        for key, value in record.items():
            if key.endswith("_loss"):
                losses.setdefault(key, []).append(value)
    return losses


def assert_same_steps(ddp_dir, single_dir, weights, rtol=1e-3):
    """The DDP run logged the same losses and moved each weight tensor as the single process did.
    `weights`: (file in the run, initial state dict, the prefix the file's keys have in it)."""
    ddp, single = logged_losses(ddp_dir), logged_losses(single_dir)
    assert ddp.keys() == single.keys() and all(len(v) >= 2 for v in single.values())
    for key in single:
        assert ddp[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key
    error = movement = start_norm = 0.0  # squared norms over every tensor: a parameter whose
    for name, initial, prefix in weights:  # gradient is only rounding noise (an attention key's bias) moves apart
        a, b = load_file(ddp_dir / name), load_file(single_dir / name)
        assert a.keys() == b.keys()
        for key in b:
            start = initial[prefix + key]
            error += float(((a[key] - start) - (b[key] - start)).norm()) ** 2
            movement += float((b[key] - start).norm()) ** 2
            start_norm += float(start.norm()) ** 2
    assert error ** 0.5 <= rtol * movement ** 0.5, (error ** 0.5, movement ** 0.5)
    assert movement ** 0.5 > 0.01 * start_norm ** 0.5  # trained, not nudged: 10x rtol of the weights themselves


# torchrun is slow-only: Lightning's own launch (kept in make test) sets the same rank environment
@pytest.mark.parametrize("launch", ["lightning", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_two_process_ddp_equals_one_process_and_writes_one_artifact(tmp_path, one_process, launch):
    runs = tmp_path / "runs"
    result = subprocess.run([*LAUNCHES[launch], *TWELVE_FAST_STEPS, *DDP, "--runs-dir", str(runs)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = stage_runs(runs, "pretrain")
    assert len(run_dirs) == 1  # one run, written by rank 0
    run_dir = run_dirs[0]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "succeeded"
    assert len(list(tmp_path.rglob("model.safetensors"))) == 1
    assert verify_manifest(run_dir) == []
    assert "data: 400 train" in (run_dir / "ranks" / "rank-1.log").read_text()  # rank 1 logs to its own file

    single, initial = one_process
    assert_same_steps(run_dir, single.path, [("model/model.safetensors", initial, "")])


def test_a_global_batch_that_does_not_split_over_the_processes_is_a_one_line_error(tmp_path):
    result = cli("pretrain", *TWELVE_FAST_STEPS, *DDP, "trainer.devices=3", runs=tmp_path / "runs")
    assert result.exit_code == 2
    assert "batch_size=8 is the global batch and does not split over 3 processes" in " ".join(result.output.split())


@pytest.mark.slow  # three two-process launches (90 s); make test keeps pretrain's DDP equality and rank 0's SIGTERM
def test_distill_with_a_replicated_or_sharded_teacher_and_add_vision_under_ddp_equal_one_process(tmp_path, llama_dir):
    """The other two training stages: two processes take one process's steps in distill (student
    and control=true's control, which starts from the same weights), also when the teacher's
    weights are sharded over them (teacher.shard=true), and in both stages of add-vision. Three
    validation batches over two ranks: one rank runs an unscored repeat, so both run the teacher
    equally often."""
    fast = ["optim.lr=3e-3", "optim.warmup_steps=1"]
    distill_args = [f"teacher.path={llama_dir}", "tokenizer=teacher", "student=tiny", "control=true", *DISTILL_DATA, *fast,
                    "trainer.max_steps=8", "trainer.val_check_interval=4"]
    one = tmp_path / "one" / "runs"
    initial = InitialWeights()
    single = train_run(one, "distill", distill_args, name="single", callbacks=[initial])
    student, control = initial.fits
    assert all(torch.equal(student[k], control[k]) for k in student)  # the control starts where the student did
    for label, extra in {"replicated": [], "sharded": ["teacher.shard=true"]}.items():
        ddp = launch(tmp_path / label, "distill", [*distill_args, *extra])
        assert_same_steps(ddp, single.path, [("model/model.safetensors", student, ""),
                                             ("control/model/model.safetensors", control, "")])
        if label == "sharded":
            assert "teacher sharded over 2 processes" in (ddp / "log.txt").read_text()

    vision_args = [f"source={single.path}", "vision.image_size=32", "vision.patch_size=16", "vision.width=32",
                   "vision.layers=1", "vision.heads=2", "vision.max_tokens_per_image=8", "stage1.steps=4", "stage2.steps=4",
                   "stage2.lr=1e-3", "optim.warmup_steps=1", "validation_every=2", "batch_size=4",
                   "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "data.train_examples=40",
                   "data.validation_examples=8"]
    initial = InitialWeights()
    single = train_run(one, "add-vision", vision_args, name="single", callbacks=[initial])
    ddp = launch(tmp_path / "vision", "add-vision", vision_args)
    assert_same_steps(ddp, single.path, [("model/model.safetensors", initial.fits[0], "text."),
                                         ("model/vision.safetensors", initial.fits[0], "")])


def launch(runs, stage, args):
    """`slmctl STAGE ARGS` on two processes; the run directory it wrote (one, by rank 0)."""
    result = subprocess.run([sys.executable, "-m", "slmctl", stage, *args, *DDP, "--runs-dir", str(runs)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = stage_runs(runs, stage)
    assert (run_dir / "ranks" / "rank-1.log").is_file() and verify_manifest(run_dir) == []
    return run_dir


def test_sigterm_to_rank_0_stops_every_rank_after_the_same_step_with_one_checkpoint(tmp_path):
    """A scheduler's SIGTERM reaches rank 0 of a 2-process run: both ranks stop after the same
    step (the stop is agreed every step), one resumable checkpoint is written, exit 130."""
    import signal

    runs = tmp_path / "runs"
    process = subprocess.Popen([sys.executable, "-m", "slmctl", "pretrain", *TWELVE_FAST_STEPS, *DDP, "trainer.max_steps=100000",
                                "checkpoint_every=100000", "--runs-dir", str(runs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(runs, "pretrain", 3, process, timeout=180)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]
    (run_dir,) = stage_runs(runs, "pretrain")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and "SIGTERM" in status["error"]
    (saved,) = (run_dir / "checkpoints").glob("step-*.ckpt")
    step = int(saved.stem.split("-")[1])
    assert step >= 3 and f"after step {step}" in status["error"]
    assert f"after step {step}" in (run_dir / "ranks" / "rank-1.log").read_text()  # rank 1 stopped there too
