"""Multi-process training through Lightning's DDP strategy: two CPU processes (gloo) take the
same optimizer steps as one process with the same global batch, in every training stage, and
only rank 0 writes."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from slmctl.cli import app
from slmctl.config import compose
from slmctl.runs import Run, verify_manifest
from slmctl.train import pretrain
from test_distill import DATA as DISTILL_DATA

BASE = ["model=tiny", "tokenizer.vocab_size=400", "data.train_examples=400", "data.validation_examples=32",
        "batch_size=8", "max_source_len=48", "max_target_len=16", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "trainer.val_check_interval=3", "trainer.max_steps=6", "checkpoint_every=3"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
LAUNCHES = {
    "lightning": [sys.executable, "-m", "slmctl", "pretrain"],  # Lightning starts the second process
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "slmctl", "pretrain"],
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    cfg = compose("pretrain", BASE)
    run = Run.create(tmp_path_factory.mktemp("single") / "runs", "pretrain", "single", cfg, argv=["test"])
    pretrain.run(cfg, run)
    return run


def train_losses(run_dir):
    return [m["train_loss"] for m in Run.open(run_dir).metrics() if "train_loss" in m]


@pytest.mark.parametrize("launch", LAUNCHES)
def test_two_process_ddp_equals_one_process_and_writes_one_artifact(tmp_path, one_process, launch):
    runs = tmp_path / "runs"
    result = subprocess.run([*LAUNCHES[launch], *BASE, *DDP, "--runs-dir", str(runs)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = [p for p in (runs / "pretrain").iterdir() if p.name != "latest"]
    assert len(run_dirs) == 1  # one run, written by rank 0
    run_dir = run_dirs[0]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "succeeded"
    assert len(list(tmp_path.rglob("model.safetensors"))) == 1
    assert verify_manifest(run_dir) == []
    assert "data: 400 train" in (run_dir / "ranks" / "rank-1.log").read_text()  # rank 1 logs to its own file

    assert train_losses(run_dir) == pytest.approx(train_losses(one_process.path), abs=1e-4)
    ddp = load_file(run_dir / "model" / "model.safetensors")
    single = load_file(one_process.model_dir / "model.safetensors")
    assert max(float((ddp[k] - single[k]).abs().max()) for k in single) < 1e-4


def test_a_global_batch_that_does_not_split_over_the_processes_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", *BASE, *DDP, "trainer.devices=3", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "batch_size=8 is the global batch and does not split over 3 processes" in " ".join(result.output.split())


def test_distill_with_a_replicated_or_sharded_teacher_and_add_vision_under_ddp_equal_one_process(tmp_path, llama_dir):
    """The other two training stages: two processes end where one process does, also when the
    teacher's weights are sharded over them (teacher.shard=true). Three validation batches over
    two ranks: one rank runs an unscored repeat, so both run the teacher equally often."""
    distill = [f"teacher.path={llama_dir}", "tokenizer=teacher", "student=tiny", "control=false", *DISTILL_DATA,
               "trainer.max_steps=4", "trainer.val_check_interval=2"]
    vision = ["vision.image_size=32", "vision.patch_size=16", "vision.width=32", "vision.layers=1", "vision.heads=2",
              "vision.max_tokens_per_image=8", "stage1.steps=2", "stage2.steps=2", "batch_size=4",
              "trainer.enable_progress_bar=false", "data.train_examples=40", "data.validation_examples=8"]
    one = tmp_path / "one"
    for stage, args in (("distill", distill), ("add-vision", vision)):
        source = [str(next((one / "distill").glob("2*")))] if stage == "add-vision" else []
        result = CliRunner().invoke(app, [stage, *source, *args, "--runs-dir", str(one)])
        assert result.exit_code == 0, result.output
        (single,) = (one / stage).glob("2*")
        variants = {"replicated": [], "sharded": ["teacher.shard=true"]} if stage == "distill" else {"ddp": []}
        for label, extra in variants.items():
            runs = tmp_path / label
            result = subprocess.run([sys.executable, "-m", "slmctl", stage, *source, *args, *extra, *DDP, "--runs-dir",
                                     str(runs)], capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            (ddp,) = (runs / stage).glob("2*")
            for weights in single.glob("model/*.safetensors"):
                a, b = load_file(ddp / "model" / weights.name), load_file(weights)
                assert max(float((a[k] - b[k]).abs().max()) for k in b) < 1e-4, (stage, label, weights.name)
            assert (ddp / "ranks" / "rank-1.log").is_file() and verify_manifest(ddp) == []
            if label == "sharded":
                assert "teacher sharded over 2 processes" in (ddp / "log.txt").read_text()
