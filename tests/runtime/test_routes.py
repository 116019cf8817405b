"""`--runtime auto` on a model directory: PyTorch, or ONNX Runtime from an export made once, chosen per CPU."""

import json

import pytest

from conftest import TINY_PRETRAIN, cli, stage_runs, train_run
from slmctl.errors import ConfigError
from slmctl.runtime.routes import CACHE_DIR, RUNTIME_ENV, choose_runtime

AMD = {"cpu": "AMD EPYC 7B13", "cpu_vendor": "AuthenticAMD", "cpu_features": ["avx2", "fma"], "torch_blas": "mkl"}
INTEL = {"cpu": "Intel(R) Xeon(R) Platinum 8481C", "cpu_vendor": "GenuineIntel", "cpu_features": ["avx512f", "amx_tile"],
         "torch_blas": "mkl"}


@pytest.mark.parametrize("identity, environ, runtime", [
    (AMD, {}, "onnx"),  # MKL's fp32 GEMV reads at half the bandwidth on AMD
    (INTEL, {}, "torch"),
    ({**AMD, "torch_blas": "open"}, {}, "torch"),  # a torch built on another BLAS
    (AMD, {RUNTIME_ENV: "torch"}, "torch"),
    (INTEL, {RUNTIME_ENV: "onnx"}, "onnx"),
    (INTEL, {RUNTIME_ENV: "auto"}, "torch"),
])
def test_the_runtime_is_chosen_from_the_cpu_and_overridden_by_the_environment(identity, environ, runtime):
    chosen, why = choose_runtime(identity, environ)
    assert chosen == runtime and why


def test_a_bad_runtime_in_the_environment_is_a_one_line_error():
    with pytest.raises(ConfigError, match="SLMCTL_RUNTIME='fast': choose auto, torch or onnx"):
        choose_runtime(AMD, {RUNTIME_ENV: "fast"})


@pytest.fixture(scope="module")
def exportable_dir(tmp_path_factory):
    """A tiny trained encoder-decoder: its export passes validation, and it answers with words."""
    return train_run(tmp_path_factory.mktemp("runs"), "pretrain", TINY_PRETRAIN).path / "model"


@pytest.fixture(scope="module")
def routed_runs(tmp_path_factory):
    """One runs directory for the tests that route `exportable_dir`: its export is made once for all of them."""
    return tmp_path_factory.mktemp("routed") / "runs"


def test_a_model_directory_on_onnx_runtime_answers_as_pytorch_and_is_exported_once(exportable_dir, routed_runs, monkeypatch):
    from slmctl.bench.measure import load_for_bench

    runs = routed_runs
    plain = cli("generate", exportable_dir, "Who is Anna?", "--max-new-tokens", 12, "--runtime", "torch", runs=runs)
    assert plain.exit_code == 0, plain.output
    monkeypatch.setenv(RUNTIME_ENV, "onnx")  # what auto chooses on an AMD CPU
    for _ in range(2):
        routed = cli("generate", exportable_dir, "Who is Anna?", "--max-new-tokens", 12, runs=runs)
        assert routed.exit_code == 0, routed.output
        assert routed.stdout == plain.stdout  # the same answer, and stdout holds only the answer
        assert "runtime: ONNX Runtime" in routed.stderr
    exports = stage_runs(runs / CACHE_DIR, "export")
    assert len(exports) == 1  # the second call reused the first's export
    loaded = load_for_bench(exportable_dir, runs, "cpu", "float32")
    assert (loaded.runtime, loaded.name) == ("onnx", "pretrain")  # named as the user named it (the run)
    assert len(stage_runs(runs / CACHE_DIR, "export")) == 1


def test_a_model_whose_export_fails_runs_on_pytorch_without_trying_again(tiny_model_dir, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv(RUNTIME_ENV, "auto")
    monkeypatch.setattr("slmctl.runtime.hardware.cpu_identity", lambda: AMD)
    for _ in range(2):  # tiny_model_dir's large random logits fail the export's validation
        result = cli("generate", tiny_model_dir, "Who is Anna?", "--max-new-tokens", 4, runs=runs)
        assert result.exit_code == 0, result.output
        assert "runtime: PyTorch for model (its export failed" in result.stderr
    assert len(stage_runs(runs / CACHE_DIR, "export")) == 1
    forced = cli("generate", tiny_model_dir, "Who is Anna?", "--runtime", "onnx", runs=runs)
    assert forced.exit_code == 2 and "--runtime onnx needs an export of it" in forced.stderr


def test_eval_on_the_routed_runtime_predicts_as_pytorch_and_scores_perplexity_with_pytorch(exportable_dir, routed_runs,
                                                                                         tmp_path, monkeypatch):
    runs = routed_runs
    rows = [{"source": f"Who is person {i}?", "target": f"Person {i}."} for i in range(4)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = ["task=synthetic_qa", "task.n_people=200", "task.n=6", "generation.max_new_tokens=8", "bootstrap=50"]

    def predictions(name):
        [run] = (runs / "eval").glob(f"*-{name}")
        return [json.loads(line)["prediction"] for line in (run / "predictions.jsonl").read_text().splitlines()]

    assert cli("eval", exportable_dir, *tasks, "--name", "plain", runs=runs).exit_code == 0
    monkeypatch.setenv(RUNTIME_ENV, "onnx")
    routed = cli("eval", exportable_dir, *tasks, "--name", "routed", runs=runs)
    assert routed.exit_code == 0, routed.output
    assert "runtime: ONNX Runtime" in routed.stderr and predictions("routed") == predictions("plain")
    assert any(predictions("plain"))
    monkeypatch.setenv(RUNTIME_ENV, "torch")  # eval's own --runtime (runtime=) names the runtime whatever the CPU
    flagged = cli("eval", exportable_dir, *tasks, "--runtime", "onnx", "--name", "flagged", runs=runs)
    assert flagged.exit_code == 0, flagged.output
    assert "runtime: ONNX Runtime" in flagged.stderr and predictions("flagged") == predictions("plain")
    scored = cli("eval", exportable_dir, "task=jsonl", f"task.data_files={data}", "generation.max_new_tokens=4",
                 "bootstrap=50", "--name", "ppl", runs=runs)
    assert scored.exit_code == 0, scored.output
    [run] = (runs / "eval").glob("*-ppl")
    assert "perplexity" in json.loads((run / "metrics.json").read_text())["tasks"]["jsonl"]["models"]["pretrain"]
