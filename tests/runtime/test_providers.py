"""Execution providers: `--ep`, where ONNX Runtime placed every node, and no silent NPU fallback."""

import json

import onnx
import onnxruntime
import pytest
from conftest import cli, newest_run

from slmctl.runtime.onnx import OnnxLM
from slmctl.runtime.providers import CPU, ProviderError, check_fallback, placement, providers_for

FAST = ["validation.prompt_lens=[5,19]", "validation.steps=6"]
BENCH = ["--input-lens", "8", "--output-lens", "3", "--repeat", "1", "--warmup", "0"]
OPENVINO = "OpenVINOExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(runs directory, the export run) of the tiny preset, dynamic shapes."""
    runs = tmp_path_factory.mktemp("runs")
    result = cli("export", "onnx", "tiny", *FAST, runs=runs)
    assert result.exit_code == 0, result.output
    return runs, newest_run(runs, "export")


def test_placement_on_the_cpu_provider_lists_every_node(export):
    _, run = export
    model = OnnxLM(run / "export")
    for report in model.placement.values():
        assert report["provider"] == CPU and report["fallback"] == []
        assert report["nodes"] == report["on_provider"] == len(report["assignment"][CPU]) > 0
        assert sum(report["ops"].values()) == report["nodes"]
    validation = json.loads((run / "validation.json").read_text())
    assert validation["placement"]["decoder"]["nodes"] == model.placement["decoder"]["nodes"]
    # without graph optimisations the assignment is exactly the graph's nodes (Constants become initializers)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    path = run / "export" / "decoder.onnx"
    report = placement(onnxruntime.InferenceSession(str(path), options, providers=[CPU]), CPU)
    graph_nodes = sorted([node.name, node.op_type] for node in onnx.load(str(path)).graph.node if node.op_type != "Constant")
    assert sorted(report["assignment"][CPU]) == graph_nodes


def test_npu_refuses_nodes_that_would_fall_back_unless_allowed(export, monkeypatch):
    """ONNX Runtime given a provider it lacks warns and runs everything on the CPU: the silent
    fallback `--device npu` must refuse."""
    runs, run = export
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["QNNExecutionProvider", CPU])
    refused = cli("bench", run, "--device", "npu", *BENCH, runs=runs)
    assert refused.exit_code == 2
    message = " ".join(refused.output.split())
    assert "none of the" in message and "would run on QNNExecutionProvider" in message and "Gather x" in message
    assert "--allow-fallback" in message
    allowed = cli("bench", run, "--device", "npu", "--allow-fallback", *BENCH, runs=runs)
    assert allowed.exit_code == 0, allowed.output
    bench = json.loads((newest_run(runs, "bench") / "bench.json").read_text())
    record = bench["records"][0]
    assert record["ep"] == "QNNExecutionProvider" and record["placement"]["decoder"]["on_provider"] == 0
    full = bench["placement"][record["model"]]["decoder"]
    assert len(full["fallback"]) == full["nodes"] == len(full["assignment"][CPU])
    assert "assignment" not in record["placement"]["decoder"]  # the node lists are kept once per model


def test_a_partial_fallback_lists_every_fallen_node_and_only_npus_refuse():
    def report(on, fallen):
        return {"provider": "QNNExecutionProvider", "nodes": on + len(fallen), "on_provider": on,
                "fallback": [[name, op, CPU] for name, op in fallen]}

    placements = {"encoder": report(40, [["/embed/Gather", "Gather"]]), "decoder": report(30, [["/a/TopK", "TopK"], ["/b/Mod", "Mod"]])}
    with pytest.raises(ProviderError) as refused:
        check_fallback(placements, "npu", allow_fallback=False)
    assert "3 of 73 nodes would fall back from QNNExecutionProvider to CPUExecutionProvider" in str(refused.value)
    assert "encoder:/embed/Gather (Gather), decoder:/a/TopK (TopK), decoder:/b/Mod (Mod)" in str(refused.value)
    check_fallback(placements, "npu", allow_fallback=True)
    check_fallback(placements, "cpu", allow_fallback=False)  # --ep openvino on the CPU: reported, not refused
    check_fallback({"decoder": report(30, [])}, "npu", allow_fallback=False)


def test_npu_providers_are_chosen_with_their_npu_settings(monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["QNNExecutionProvider", CPU])
    provider, options = providers_for("npu")[0]
    assert provider == "QNNExecutionProvider" and options["backend_path"].startswith(("libQnnHtp", "QnnHtp"))
    assert providers_for("cpu", "qnn")[0][1]["backend_path"].startswith(("libQnnCpu", "QnnCpu"))
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["OpenVINOExecutionProvider", CPU])
    assert providers_for("npu")[0] == ("OpenVINOExecutionProvider", {"device_type": "NPU"})
    assert providers_for("cpu", "openvino") == [("OpenVINOExecutionProvider", {"device_type": "CPU"}), CPU]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    with pytest.raises(ProviderError, match="no NPU execution provider"):
        providers_for("npu")


def test_bad_providers_are_one_line_errors(export):
    runs, run = export
    for args, expected in ((["--ep", "tpu"], "unknown --ep 'tpu'"), (["--ep", "migraphx"], "has no MIGraphXExecutionProvider"),
                           (["--ep", "cpu", "--device", "npu"], None)):
        result = cli("bench", run, *args, *BENCH, runs=runs)
        assert result.exit_code == 2, result.output
        if expected:
            assert expected in " ".join(result.output.split())
    model_dir = cli("generate", "tiny", "prompt=hi", "--ep", "cpu", runs=runs)
    assert model_dir.exit_code == 2
    for ref, expected in ((f"{run}@tpu", "'@tpu' names the execution provider of an ONNX export"),
                          ("tiny@cpu", "'@cpu' names the execution provider of an ONNX export")):
        result = cli("bench", ref, *BENCH, runs=runs)
        assert result.exit_code == 2 and expected in " ".join(result.output.split())


def test_a_model_reference_names_its_provider(export, monkeypatch):
    """One bench command can measure the same export on two providers: EXPORT[:variant]@ep."""
    runs, run = export
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["QNNExecutionProvider", CPU])
    result = cli("bench", f"{run}:fp32@qnn", run, *BENCH, runs=runs)
    assert result.exit_code == 0, result.output
    records = json.loads((newest_run(runs, "bench") / "bench.json").read_text())["records"]
    assert [r["model"].rsplit(":", 1)[1] for r in records] == ["fp32@qnn", "fp32"]
    assert [r["ep"] for r in records] == ["QNNExecutionProvider", CPU]  # the named provider, then the device's


@pytest.mark.skipif(not OPENVINO, reason="onnxruntime-openvino is not installed (make test-openvino)")
def test_openvino_runs_the_static_graphs_as_the_cpu_provider(tmp_path):
    """The OpenVINO provider on its CPU device: every node placed on it, greedy tokens identical
    to the CPU provider's, timings and placement in bench.json."""
    import torch

    runs = tmp_path / "runs"
    result = cli("export", "onnx", "tiny", "--static", "ep=openvino", *FAST, runs=runs)
    assert result.exit_code == 0, result.output
    run = newest_run(runs, "export")
    validation = json.loads((run / "validation.json").read_text())
    assert validation["passed"] and validation["placement"]["decoder"]["provider"] == "OpenVINOExecutionProvider"
    cpu, openvino = OnnxLM(run / "export"), OnnxLM(run / "export", ep="openvino")
    for report in openvino.placement.values():
        assert report["fallback"] == [] and report["on_provider"] == report["nodes"] > 0
    prompts = torch.randint(4, cpu.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(cpu.generate(prompts, max_new_tokens=10), openvino.generate(prompts, max_new_tokens=10))
    bench = cli("bench", f"{run}@openvino", run, *BENCH, runs=runs)
    assert bench.exit_code == 0, bench.output
    records = json.loads((newest_run(runs, "bench") / "bench.json").read_text())["records"]
    assert [r["ep"] for r in records] == ["OpenVINOExecutionProvider", CPU] and records[0]["decode_tok_s"] > 0
