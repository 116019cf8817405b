"""The weight-kernel probe: each variant's M = 1 products, made by the export's own tools."""

from pathlib import Path

import onnx

from slmctl.bench import kernels


def test_the_probe_times_fp32_int8_and_int4_chains_of_the_exports_kernels(tmp_path):
    paths = kernels.variant_models(64, 128, 2, tmp_path)
    ops = {name: [n.op_type for n in onnx.load(str(path)).graph.node] for name, path in paths.items()}
    assert ops["fp32"] == ["MatMul"] * 4 and ops["int4"] == ["MatMulNBits"] * 4
    assert ops["int8"].count("MatMulInteger") == 4  # fused into DynamicQuantizeMatMul when the session loads
    result = kernels.main(["--shape", "64x128", "--pairs", "2", "--calls", "3", "--output", str(tmp_path / "k.json")])
    assert [r["variant"] for r in result["rows"]] == ["fp32", "int8", "int4"]
    assert all(r["us_per_product"] > 0 and r["weight_gb_s"] > 0 for r in result["rows"])
    assert (tmp_path / "k.json").is_file()


def test_the_op_profile_sums_the_encoders_kernel_time_by_op_type(tmp_path):
    from conftest import cli, newest_run

    from slmctl.bench import op_profile

    runs = tmp_path / "runs"
    assert cli("export", "onnx", "tiny", "validation.prompt_lens=[5]", "validation.steps=4", runs=runs).exit_code == 0
    result = op_profile.profile(str(newest_run(runs, "export")), prompt_len=16, threads=1, runs=2, runs_dir=str(runs))
    assert result["graph"] == "encoder" and result["variant"] == "fp32"
    assert result["ops"]["Gemm"] > 0 and abs(sum(result["ops"].values()) - result["total_ms"]) < 1e-6
    assert not list(Path.cwd().glob("slmctl_op_profile*"))  # the trace is removed once read
