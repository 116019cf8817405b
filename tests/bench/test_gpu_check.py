"""make gpu-check's script: every command line it runs parses and composes (fast, in-process), and
in its CPU dry mode every step works end to end (slow: seven child processes)."""

import json

import pytest

from slmctl.bench import gpu_check
from tests.conftest import cli


@pytest.mark.parametrize("sizes", [gpu_check.DRY, gpu_check.GPU], ids=["dry", "gpu"])
def test_every_command_of_the_gpu_check_parses_and_composes(tmp_path, sizes):
    """Each step's arguments through the real command with --dry-run (the config is composed and
    validated, nothing runs); the GPU's --device cuda is left out, since this machine has no GPU."""
    steps = gpu_check.steps(tmp_path, sizes)
    assert [name for name, _ in steps] == ["prepare", "pretrain", "prepare_pairs", "distill", "bench", "export", "bench_onnx"]
    for name, args in steps:
        without_device = [a for i, a in enumerate(args) if a != "--device" and (i == 0 or args[i - 1] != "--device")]
        result = cli(*without_device, "--dry-run")
        assert result.exit_code == 0, (name, result.output)


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_in_dry_mode_and_writes_its_report(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    for step in ("prepare", "pretrain", "prepare_pairs", "distill", "bench", "export", "bench_onnx"):
        assert report[step]["ok"], (step, report[step].get("error"))
    throughput = report["pretrain"]["summary"]["throughput"]
    assert throughput["tokens_per_s"] > 0 and 0 < throughput["mfu"] < 1.5
    assert report["pretrain"]["summary"]["packing_efficiency"] > 0.9
    assert "| pretrain | True |" in (tmp_path / "gpu-check.md").read_text()
