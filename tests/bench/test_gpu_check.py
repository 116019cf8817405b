"""make gpu-check's script, run in its CPU dry mode: every step it times on a GPU must work end to end."""

import json

from slmctl.bench import gpu_check


def test_the_gpu_check_runs_every_step_in_dry_mode_and_writes_its_report(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    for step in ("prepare", "pretrain", "prepare_pairs", "distill", "bench", "export", "bench_onnx"):
        assert report[step]["ok"], (step, report[step].get("error"))
    throughput = report["pretrain"]["summary"]["throughput"]
    assert throughput["tokens_per_s"] > 0 and 0 < throughput["mfu"] < 1.5
    assert report["pretrain"]["summary"]["packing_efficiency"] > 0.9
    assert "| pretrain | True |" in (tmp_path / "gpu-check.md").read_text()
