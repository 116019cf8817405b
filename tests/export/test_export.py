"""slmctl export onnx: graphs that ONNX Runtime runs and that compute what PyTorch computes."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO, TINY_PRETRAIN, cli, newest_run, train_run

from slmctl.config.compose import compose
from slmctl.errors import ConfigError
from slmctl.model import build_model
from slmctl.runtime.onnx import CONTRACT_VERSION, SPEC_FILE, OnnxExportError, OnnxLM

FAST = ["validation.prompt_lens=[5,19]", "validation.steps=12"]
SMALL_REPORT = ["report.prompts=6", "report.steps=8", "report.eval_limit=8", "report.input_len=16", "report.output_len=4",
                "report.repeat=1", "qdq.calibration_prompts=4", "qdq.calibration_steps=3", "task.n_people=200"]


# The tiny preset with one encoder and two decoder layers: ONNX Runtime's quantizers, calibrator and
# optimizer take time that grows faster than a graph's node count, and the tests of the `trained` and
# `shallow` models do not need the preset's depth (a second decoder layer keeps a layer-to-layer residual).
SHALLOW = {"n_encoder_layers": 1, "n_decoder_layers": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A shallow tiny trained encoder-decoder with its tokenizer (a pretrain run)."""
    shallow = [f"model.{key}={value}" for key, value in SHALLOW.items()]
    return train_run(tmp_path_factory.mktemp("runs"), "pretrain", [*TINY_PRETRAIN, *shallow], name="tiny").path


@pytest.fixture(scope="module")
def shallow(tmp_path_factory):
    """The shallow tiny model with its initial weights, saved as a model directory."""
    from slmctl.model.store import save_model

    return save_model(build_model("tiny", seed=0, **SHALLOW), tmp_path_factory.mktemp("shallow") / "model")


@pytest.fixture(scope="module")
def randomized_export(tmp_path_factory):
    """randomized_export(preset, static=None, scale=3.0, in_place=False) -> (model, export directory with
    slmctl_onnx.json, spec): a tiny model with conftest.randomize weights, exported once per module."""
    from slmctl.export.stage import _spec, export_graphs
    from tests.conftest import randomize

    made = {}

    def get(preset, static=None, scale=3.0, in_place=False):
        key = (preset, json.dumps(static), scale, in_place)
        if key not in made:
            model = randomize(build_model(preset, seed=0), scale=scale).eval()
            directory = tmp_path_factory.mktemp(preset)
            spec = _spec(model, None, compose("export", [f"source={preset}"]), {})
            spec["variants"]["fp32"] = export_graphs(model, directory, static=static, in_place=in_place)
            (directory / SPEC_FILE).write_text(json.dumps(spec))
            made[key] = model, directory, spec
        return made[key]

    return get


def test_encoder_decoder_export_is_described_checked_and_validated(tmp_path):
    result = cli("export", "onnx", "tiny", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    out = run / "export"
    spec = json.loads((out / SPEC_FILE).read_text())
    graphs = spec["variants"]["fp32"]["graphs"]
    assert set(graphs) == {"encoder", "decoder"} and spec["opset"] >= 17
    encoder = [o["name"] for o in graphs["encoder"]["outputs"]]
    assert encoder[0] == "encoder_hidden_states" and encoder[1:3] == ["cross.0.key", "cross.0.value"]
    decoder_inputs = {i["name"]: i for i in graphs["decoder"]["inputs"]}
    assert decoder_inputs["past_key_values.0.key"]["shape"] == ["batch", 2, "past_sequence", 16]
    assert decoder_inputs["input_ids"]["dtype"] == "int64" and spec["special_tokens"]["decoder_start"] == 1
    for graph in graphs.values():
        model = onnx.load(str(out / graph["file"]))
        onnx.checker.check_model(model, full_check=True)
        assert not [n for n in model.graph.node if n.op_type in ("If", "Loop")]  # one graph, no control flow
    report = json.loads((run / "validation.json").read_text())
    assert report["passed"] and report["greedy_identical"] and [c["prompt_len"] for c in report["cases"]] == [5, 19]
    assert all(c["max_abs_logit_diff"] <= 1e-4 and c["steps"] == 12 for c in report["cases"])
    manifest = json.loads((run / "MANIFEST.json").read_text())
    assert "export/encoder.onnx" in manifest and f"export/{SPEC_FILE}" in manifest


@pytest.mark.parametrize("preset, in_place", [("tiny", False), ("tiny", True), ("deconly-tiny", False)])
def test_greedy_and_beam_generations_match_torch_on_padded_batches(randomized_export, preset, in_place):
    """Either decoder cache (grown each step, or buffers written in place) decodes as PyTorch does."""
    model, directory, _ = randomized_export(preset, in_place=in_place)
    onnx_model = OnnxLM(directory)
    ids = torch.randint(4, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if model.config.is_encoder_decoder:
        mask[1, 7:], mask[2, 3:] = 0, 0
    else:
        mask[1, :4], mask[2, :8] = 0, 0
    for kwargs in ({"max_new_tokens": 32}, {"max_new_tokens": 10, "num_beams": 3}):
        expected = model.generate(ids, mask, **kwargs)
        assert torch.equal(onnx_model.generate(ids, mask, **kwargs), expected)
    for row in range(3):  # a padded row decodes as it does alone
        alone = ids[row:row + 1, mask[row].bool()]
        assert torch.equal(onnx_model.generate(alone, max_new_tokens=16), model.generate(ids, mask, max_new_tokens=16)[row:row + 1])


def test_decoder_only_export_is_one_graph_with_cache(tmp_path):
    result = cli("export", "onnx", "deconly-tiny", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    spec = json.loads((run / "export" / SPEC_FILE).read_text())
    assert list(spec["variants"]["fp32"]["graphs"]) == ["decoder"] and spec["architecture"] == "decoder-only"
    assert (run / "export" / "model.onnx").is_file() and json.loads((run / "validation.json").read_text())["passed"]


def test_an_in_place_cache_export_attends_with_one_node_per_layer_over_buffers(tmp_path):
    """cache=in_place: contract 3, the cache inputs are buffers of any capacity, each layer's
    self-attention one GroupQueryAttention node; validated against PyTorch like the portable graphs."""
    result = cli("export", "onnx", "tiny", "cache=in_place", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    spec = json.loads((run / "export" / SPEC_FILE).read_text())
    decoder = spec["variants"]["fp32"]["graphs"]["decoder"]
    assert decoder["cache"] == "in_place" and spec["version"] == 3
    assert decoder["inputs"][3]["shape"] == ["batch", 2, "capacity", 16]
    ops = [n.op_type for n in onnx.load(str(run / "export" / "decoder.onnx")).graph.node]
    assert ops.count("GroupQueryAttention") == spec["model"]["n_decoder_layers"]
    assert json.loads((run / "validation.json").read_text())["passed"] and OnnxLM(run / "export").in_place


def test_an_in_place_cache_with_static_shapes_is_refused_before_a_run_exists(tmp_path):
    result = cli("export", "onnx", "tiny", "--static", "cache=in_place", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "cache=in_place" in result.output and not (tmp_path / "runs").exists()


def test_static_variant_runs_on_ort_cpu_with_fixed_shapes(tmp_path):
    result = cli("export", "onnx", "tiny", "--static", "static.prompt_len=24", "static.capacity=40", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    out = run / "export"
    for name in ("encoder.onnx", "decoder.onnx"):
        graph = onnx.load(str(out / name)).graph
        for value in [*graph.input, *graph.output]:
            assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value.name
    onnx_model = OnnxLM(out)
    assert onnx_model.is_static
    inputs = [i.name for i in onnx_model.sessions["decoder"].get_inputs()]
    assert inputs[:3] == ["input_ids", "position", "encoder_attention_mask"]
    model = build_model("tiny", seed=0).eval()
    ids = torch.randint(4, 512, (1, 17), generator=torch.Generator().manual_seed(3))
    assert torch.equal(onnx_model.generate(ids, max_new_tokens=40), model.generate(ids, max_new_tokens=40))
    with pytest.raises(OnnxExportError, match="prompts up to 24 tokens"):
        onnx_model.generate(torch.ones(1, 30, dtype=torch.long), max_new_tokens=4)


def test_a_tampered_weight_fails_validation_with_exit_1(tmp_path, monkeypatch):
    import slmctl.export.stage as stage

    original = stage.export_graphs

    def export_then_tamper(model, directory, **kwargs):
        variant = original(model, directory, **kwargs)
        path = directory / variant["graphs"]["decoder"]["file"]
        graph = onnx.load(str(path))
        weight = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
        values = onnx.numpy_helper.to_array(weight).copy()
        values *= 1.01  # a 1% change of one weight matrix
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        onnx.save(graph, str(path))
        return variant

    monkeypatch.setattr(stage, "export_graphs", export_then_tamper)
    result = cli("export", "onnx", "tiny", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 1
    run = newest_run(tmp_path / "runs", "export")
    message = " ".join(result.output.split())
    assert "validation failed: max |logit diff|" in message and "Traceback" not in message
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "validation failed" in status["error"]
    assert not (run / "export" / SPEC_FILE).exists()  # nothing describes the graphs as usable
    assert json.loads((run / "validation.json").read_text())["passed"] is False


def test_external_data_keeps_weights_beside_the_graph(tmp_path):
    result = cli("export", "onnx", "tiny", "external_data=always", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    out = run / "export"
    assert (out / "decoder.onnx.data").stat().st_size > (out / "decoder.onnx").stat().st_size
    graph = json.loads((out / SPEC_FILE).read_text())["variants"]["fp32"]["graphs"]["decoder"]
    assert graph["external_data"] == "decoder.onnx.data"


def test_int8_and_qdq_variants_report_size_speed_agreement_and_task_metric(tmp_path, trained):
    result = cli("export", "onnx", str(trained), "--quantize", "int8", "--quantize", "int4", "--quantize", "qdq", *FAST,
                 *SMALL_REPORT, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    out = run / "export"
    assert (out / "tokenizer.json").is_file()
    report = json.loads((run / "quantization.json").read_text())
    fp32, int8, int4, qdq = (report["variants"][name] for name in ("fp32", "int8", "int4", "qdq"))
    assert report["prompt_source"] == "task"
    for row in (int8, int4, qdq):  # (token agreement itself: test_token_agreement_counts_each_sequence_up_to_its_first_difference)
        assert 0 <= row["token_agreement"] <= 1 and row["prompts"] == 6 and row["size_vs_fp32"] < 0.9
        assert row["token_agreement"] == 1 or row["identical_sequences"] < 1  # all identical: every token agrees
        assert row["size_vs_fp32"] == pytest.approx(row["mb"] / fp32["mb"])
        assert row["decode_vs_fp32"] == pytest.approx(row["decode_tok_s"] / fp32["decode_tok_s"])
        assert row["first_token_vs_fp32"] == pytest.approx(row["first_token_ms"] / fp32["first_token_ms"])
        assert row["decode_tok_s"] > 0 and row["task"]["metric"] == "exact_match" and row["task"]["n"] == 8
    assert fp32["task"]["n"] == 8 and fp32["size_vs_fp32"] == 1.0
    ops = {n.op_type for n in onnx.load(str(out / "int8" / "decoder.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out / "qdq" / "decoder.onnx")).graph.node}
    spec = json.loads((out / SPEC_FILE).read_text())
    int4_ops = [n.op_type for n in onnx.load(str(out / "int4" / "decoder.onnx")).graph.node]
    layers = spec["model"]["n_decoder_layers"]  # every projection (6 a layer) + the LM head
    assert int4_ops.count("MatMulNBits") == 6 * layers + 1 and "Gemm" not in int4_ops
    int4_decoder = onnx.load(str(out / "int4" / "decoder.onnx")).graph  # the embedding table too: no Gather reads a weight
    weights = {init.name for init in int4_decoder.initializer}
    assert int4_ops.count("GatherBlockQuantized") == 1
    assert not [n.name for n in int4_decoder.node if n.op_type == "Gather" and n.input[0] in weights]
    assert int4["mb"] < int8["mb"] and report["methods"]["int4"]["block_size"] == 32
    assert set(spec["variants"]) == {"fp32", "int8", "int4", "qdq"}

    runs_dir = tmp_path / "runs"
    generated = cli("generate", str(run), "prompt=Where does Ana live?", "--max-new-tokens", "6", runs=runs_dir)
    torch_generated = cli("generate", str(trained), "prompt=Where does Ana live?",
                          "--max-new-tokens", "6", runs=runs_dir)
    assert generated.exit_code == 0, generated.output
    assert generated.stdout.splitlines()[1:] == torch_generated.stdout.splitlines()[1:]

    bench = cli("bench", "--compare", f"{run}:int8", f"{run}:int4", str(run), str(trained), "--input-lens", "16",
                "--output-lens", "4", "--repeat", "1", "--format", "json", runs=runs_dir)
    assert bench.exit_code == 0, bench.output
    records = json.loads(bench.stdout[bench.stdout.index("["):bench.stdout.rindex("]") + 1])
    assert [(r["runtime"], r["dtype"]) for r in records] == [("onnx", "int8"), ("onnx", "int4"), ("onnx", "float32"),
                                                            ("torch", "float32")]
    assert records[0]["model"].endswith(":int8") and all(r["decode_tok_s"] > 0 for r in records)


def test_onnx_runtime_needs_an_export_or_a_model_directory(tmp_path, llama_dir):
    # a model directory gets its export made once (tests/runtime/test_routes.py); a preset or a transformers model cannot
    result = cli("bench", "tiny", "--runtime", "onnx", "--repeat", "1", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "slmctl export onnx" in result.output
    result = cli("generate", str(llama_dir), "prompt=hi", "--runtime", "onnx")
    assert result.exit_code == 2 and "make one with `slmctl export onnx" in " ".join(result.output.split())
    result = cli("export", "onnx", "tiny", "--quantize", "int3", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "quantize='int3' is not one of: int8, int4, qdq" in result.output


def test_ort_outputs_stay_bound_between_steps(tmp_path):
    """IO binding: the decoder's present outputs are fed back as ORT values, not numpy copies."""
    import onnxruntime as ort

    from slmctl.runtime.onnx import EncoderDecoderOnnxSession

    model = build_model("tiny", seed=0).eval()
    from slmctl.export.stage import _spec, export_graphs

    spec = _spec(model, None, compose("export", ["source=tiny"]), {})
    spec["variants"]["fp32"] = export_graphs(model, tmp_path)
    session = EncoderDecoderOnnxSession(OnnxLM(tmp_path, spec=spec), torch.ones(1, 5, dtype=torch.long), None, 4)
    session.first_logits()
    session.step(torch.tensor([7]))
    assert all(isinstance(v, ort.OrtValue) for v in session.cache + session.cross)
    assert session.cache[0].shape() == [1, 2, 2, 16] and np.isfinite(session.cache[0].numpy()).all()


def test_without_a_model_the_newest_distill_or_pretrain_run_is_exported(tmp_path, trained):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(trained.parent.parent, runs, symlinks=True)
    result = cli("export", "onnx", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    inputs = json.loads((run / "inputs.json").read_text())
    assert inputs[0]["role"] == "model" and inputs[0]["path"].endswith("/model")
    empty = cli("export", "onnx", runs=tmp_path / "none")
    assert empty.exit_code == 2 and "no model given and no succeeded distill or pretrain run" in " ".join(empty.output.split())


def test_the_docs_standalone_example_matches_slmctl_generate(tmp_path, trained, capsys):
    """docs/export.md's ONNX Runtime loop (no slmctl) answers what `slmctl generate` answers."""
    import re

    result = cli("export", "onnx", str(trained), *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    doc = (REPO / "docs" / "export.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    code = code.replace('"runs/export/latest/export"', repr(str(run / "export")))
    capsys.readouterr()
    exec(compile(code, "docs/export.md", "exec"), {})
    standalone = capsys.readouterr().out.strip()
    generated = cli("generate", str(run), "prompt=Where does Ana live?", "--max-new-tokens", "16")
    assert generated.exit_code == 0, generated.output
    assert standalone == generated.stdout.splitlines()[1].strip()


def test_eval_scores_an_export_like_its_torch_model(tmp_path, trained):
    result = cli("export", "onnx", str(trained), *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    evaluated = cli("eval", str(run), str(trained), "task.n_people=200", "limit=8", "bootstrap=20", runs=tmp_path / "runs")
    assert evaluated.exit_code == 0, evaluated.output
    eval_run = sorted((tmp_path / "runs" / "eval").glob("*"))[-1]
    models = json.loads((eval_run / "metrics.json").read_text())["tasks"]["synthetic_qa"]["models"]
    onnx_scores, torch_scores = (models[name] for name in models)
    assert list(models)[0].endswith("export:fp32") and "perplexity" not in onnx_scores
    assert onnx_scores["exact_match"] == torch_scores["exact_match"] and onnx_scores["f1"] == torch_scores["f1"]


class _Fixed:
    """A model whose greedy generations are given: one [1, T] sequence per call."""

    def __init__(self, sequences):
        self.sequences, self.steps = iter(sequences), []

    def generate(self, ids, max_new_tokens):
        self.steps.append(max_new_tokens)
        return torch.tensor([next(self.sequences)])


def test_token_agreement_counts_each_sequence_up_to_its_first_difference():
    from slmctl.export.validate import token_agreement

    fp32 = [[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 2], [3], [5, 2]]
    int8 = [[5, 6, 7, 8],  # identical: 4 of 4
            [5, 9, 7, 8],  # differs at 1 and re-aligns: 1 of 4 (the lucky 7, 8 do not count)
            [5, 6, 7, 8],  # fp32 stopped at EOS (2) where int8 went on: 2 of 4
            [4],  # 0 of 1
            [5, 2]]  # identical, both stopped early: 2 of 2
    reference, candidate = _Fixed(fp32), _Fixed(int8)
    prompts = [torch.tensor([[7, 8, 9]])] * 5
    result = token_agreement(reference, candidate, prompts, steps=4)
    assert result["token_agreement"] == pytest.approx((4 + 1 + 2 + 0 + 2) / (4 + 4 + 4 + 1 + 2))
    assert result["identical_sequences"] == pytest.approx(2 / 5) and result["prompts"] == 5
    assert reference.steps == candidate.steps == [4] * 5
    swapped = token_agreement(_Fixed(int8), _Fixed(fp32), prompts, steps=4)  # symmetric
    assert swapped["token_agreement"] == result["token_agreement"]


def test_int8_variant_runs_the_int8_graphs_close_to_fp32(randomized_export):
    """OnnxLM(variant="int8") runs the quantized graphs: its logits are not fp32's (the fp32 export
    matches PyTorch within 1e-5 of the logit scale), yet within a few percent of them."""
    from slmctl.export.quantize import quantize_int8
    from slmctl.export.validate import compare_decoding
    from tests.conftest import random_prompts

    # scale 1: weights whose int8 rounding is not amplified layer after layer (at scale 3, where
    # greedy decoding is diverse, a 1% weight change moves the logits by half their scale)
    model, directory, spec = randomized_export("tiny", scale=1.0)
    spec = dict(spec, variants={"fp32": spec["variants"]["fp32"]})
    spec["variants"]["int8"] = quantize_int8(directory, spec["variants"]["fp32"])
    fp32, int8 = OnnxLM(directory, spec=spec), OnnxLM(directory, variant="int8", spec=spec)
    ids, mask, _ = random_prompts([9, 5], seed=3)
    scale = model.start_decoding(ids, mask, 1).first_logits().abs().max().item()
    exact = compare_decoding(model, fp32, ids, mask, 8)
    quantized = compare_decoding(fp32, int8, ids, mask, 8)  # fp32 leads; int8 reads the same tokens
    assert exact["max_abs_logit_diff"] < 1e-4 * scale
    assert 1e-3 * scale < quantized["max_abs_logit_diff"] < 0.1 * scale, (quantized["max_abs_logit_diff"], scale)
    assert quantized["greedy_identical"]


def standalone_greedy(export_dir, ids, mask, steps):
    """docs/export.md's loop, generalised to every graph kind and to padded batches, with nothing
    from slmctl: onnxruntime, numpy and the export's slmctl_onnx.json. `ids`/`mask`: numpy [B, S],
    right-padded for the encoder-decoder, left-padded for the decoder-only graph.
    -> (each step's logits [steps, B, vocab], the greedy tokens [B, steps])"""
    import onnxruntime as ort

    spec = json.loads((export_dir / "slmctl_onnx.json").read_text())
    variant, config, special = spec["variants"]["fp32"], spec["model"], spec["special_tokens"]
    graphs, static = variant["graphs"], variant["static"]
    in_place = graphs["decoder"].get("cache") == "in_place"  # contract 3: buffers of a fixed capacity
    session = {role: ort.InferenceSession(str(export_dir / g["file"])) for role, g in graphs.items()}
    layers, batch = range(config["n_decoder_layers"]), ids.shape[0]
    past_names = [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")]

    def empty(length):
        return [np.zeros((batch, config["n_kv_heads"], length, config["head_dim"]), np.float32) for _ in past_names]

    all_logits, tokens = [], []
    if spec["architecture"] == "decoder-only":
        past, feed = empty(0), ids
        for _ in range(steps):
            logits, *past = session["decoder"].run(["logits", *present_names],
                                                   {"input_ids": feed, "attention_mask": mask, **dict(zip(past_names, past))})
            all_logits.append(logits)
            tokens.append(logits.argmax(-1))
            feed, mask = tokens[-1][:, None], np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        return np.stack(all_logits), np.stack(tokens, axis=1)
    if static:  # fixed shapes: right-pad the prompt to the exported length
        assert batch == static["batch"] and steps <= static["capacity"]
        width = static["prompt_len"]
        ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])), constant_values=special["pad"])
        mask = np.pad(mask, ((0, 0), (0, width - mask.shape[1])))
    cross_names = [f"cross.{i}.{kv}" for i in layers for kv in ("key", "value")]
    cross = session["encoder"].run(cross_names, {"input_ids": ids, "attention_mask": mask})
    past = empty(static["capacity"] if static else steps if in_place else 0)
    token = np.full((batch, 1), special["decoder_start"], np.int64)
    for position in range(steps):
        feeds = {"input_ids": token, "encoder_attention_mask": mask, **dict(zip(past_names, past)),
                 **dict(zip(cross_names, cross))}
        if static:
            feeds["position"] = np.array([position], np.int64)
        else:  # every row has `position` tokens cached
            feeds["positions"] = np.full(batch, position, np.int64)
        logits, *present = session["decoder"].run(["logits", *present_names], feeds)
        logits = logits[:, -1] if logits.ndim == 3 else logits  # contract 2: every new token's logits
        if static:  # this step's key/value, written into the buffers at `position`
            for buffer, new in zip(past, present):
                buffer[:, :, position] = new[:, :, 0]
        else:  # grown by the new token, or (in place) the buffers with it written at `position`
            past = present
        all_logits.append(logits)
        tokens.append(logits.argmax(-1))
        token = tokens[-1][:, None]
    return np.stack(all_logits), np.stack(tokens, axis=1)


@pytest.mark.parametrize("preset, static, in_place", [("tiny", None, False), ("tiny", None, True), ("deconly-tiny", None, False),
                                                      ("tiny", {"batch": 3, "prompt_len": 16, "capacity": 10}, False)],
                         ids=["encoder-decoder", "in-place", "decoder-only", "static"])
def test_plain_onnx_runtime_loop_matches_the_torch_forward_at_every_step(randomized_export, preset, static, in_place):
    """Each row of a padded batch, decoded by plain ONNX Runtime, has at every step the logits that
    slmctl's PyTorch forward (no cache) gives that row alone with the same tokens."""
    from tests.conftest import max_logit_error, random_prompts

    model, directory, _ = randomized_export(preset, static, in_place=in_place)
    encdec = model.config.is_encoder_decoder
    ids, mask, rows = random_prompts([9, 4, 13], vocab=model.config.vocab_size, seed=5, side="right" if encdec else "left",
                                     pad_id=model.config.pad_token_id)
    steps = 10
    logits, tokens = standalone_greedy(directory, ids.numpy(), mask.numpy(), steps)
    assert logits.shape == (steps, 3, model.config.vocab_size)
    start = model.config.bos_token_id
    with torch.no_grad():
        for b, row in enumerate(rows):
            new = torch.from_numpy(tokens[b])
            if encdec:
                expected = model(input_ids=row[None], decoder_input_ids=torch.cat([torch.tensor([start]), new[:-1]])[None])
                expected = expected.logits[0]
            else:
                expected = model(input_ids=torch.cat([row, new[:-1]])[None]).logits[0, len(row) - 1:]
            got = torch.from_numpy(logits[:, b])
            assert max_logit_error(got, expected) < 1e-4, (b, max_logit_error(got, expected))
            assert torch.equal(expected.argmax(-1), new), b
        assert len(set(tokens.flatten().tolist())) > 5  # a real decode, not one token repeated


@pytest.mark.parametrize("trans_b, bias", [(1, True), (0, True), (1, False)])
def test_a_weight_gemm_rewritten_as_matmul_computes_the_same(trans_b, bias):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slmctl.export.quantize import gemm_as_matmul

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4) if trans_b else (4, 6)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W")] + ([numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "C")]
                                                     if bias else [])
    node = helper.make_node("Gemm", ["A", "W", *(["C"] if bias else [])], ["Y"], transB=trans_b, name="proj")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    a = rng.standard_normal((3, 4)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]

    expected = run(model)
    assert gemm_as_matmul(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", *(["Add"] if bias else [])]
    np.testing.assert_allclose(run(model), expected, rtol=1e-6, atol=1e-6)


def test_optimize_ort_fuses_norms_and_gelu_and_decodes_as_the_plain_graphs(tmp_path, shallow):
    result = cli("export", "onnx", shallow, "--optimize", "ort", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = newest_run(tmp_path / "runs", "export")
    spec = json.loads((run / "export" / SPEC_FILE).read_text())
    fused = spec["variants"]["ort"]["quantization"]["fused"]
    layers = spec["model"]["n_encoder_layers"], spec["model"]["n_decoder_layers"]
    assert fused["encoder"]["FastGelu"] == layers[0] and fused["decoder"]["FastGelu"] == layers[1]
    # every norm but the first of each stack takes the residual Add with it
    assert fused["encoder"]["SkipSimplifiedLayerNormalization"] == 2 * layers[0]
    assert fused["decoder"]["SkipSimplifiedLayerNormalization"] + fused["decoder"]["SimplifiedLayerNormalization"] == 3 * layers[1] + 1
    decoder = onnx.load(str(run / "export" / spec["variants"]["ort"]["graphs"]["decoder"]["file"]))
    assert {"Pow", "Gelu"}.isdisjoint(n.op_type for n in decoder.graph.node)
    assert json.loads((run / "validation_ort.json").read_text())["passed"]
    plain, optimized = OnnxLM(run / "export"), OnnxLM(run / "export", variant="ort")
    prompts = torch.randint(4, 500, (2, 11), generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain.generate(prompts, max_new_tokens=8), optimized.generate(prompts, max_new_tokens=8))
    bench = cli("bench", f"{run}:ort", "--input-lens", "8", "--output-lens", "3", "--repeat", "1", runs=tmp_path / "runs")
    assert bench.exit_code == 0, bench.output
    record = json.loads((newest_run(tmp_path / "runs", "bench") / "bench.json").read_text())["records"][0]
    assert record["dtype"] == "float32" and record["placement"]["decoder"]["ops"]["SkipSimplifiedLayerNormalization"] > 0


@pytest.mark.parametrize("in_place", [False, True])
def test_drafted_decoding_on_onnx_runtime_gives_plain_decodings_tokens(randomized_export, in_place):
    """Contract 2: the decoder returns every new token's logits, so one call checks drafted tokens; with
    the cache written in place (contract 3) a pass over several tokens at batch 3 runs row by row."""
    from conftest import Scripted

    model, directory, spec = randomized_export("tiny", in_place=in_place)
    assert spec["variants"]["fp32"]["graphs"]["decoder"]["outputs"][0]["shape"][1] == "decoder_sequence"
    onnx_model = OnnxLM(directory)
    ids = torch.randint(4, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 3:] = 0, 0
    settings = {"max_new_tokens": 20, "min_new_tokens": 20, "repetition_penalty": 1.2}
    plain = model.generate(ids, mask, **settings)
    drafter = Scripted(plain, wrong=3)
    assert torch.equal(onnx_model.generate(ids, mask, drafter=drafter, **settings), plain)
    assert 0 < drafter.stats.accepted < drafter.stats.drafted


def test_a_contract_1_export_still_decodes_and_refuses_drafts_in_one_line(randomized_export, tmp_path, monkeypatch):
    """An export written before contract 2 (its decoder returns the last token's logits) runs as before."""
    from slmctl.export import graphs
    from slmctl.export.stage import _spec, export_graphs
    from slmctl.runtime.generator import Generator, check_drafting

    model, _, _ = randomized_export("tiny")
    every = graphs.DecoderGraph.forward
    monkeypatch.setattr(graphs.DecoderGraph, "forward", lambda self, *a: (lambda out: (out[0][:, -1], *out[1:]))(every(self, *a)))
    variant = export_graphs(model, tmp_path)
    logits = variant["graphs"]["decoder"]["outputs"][0]
    logits["shape"] = [logits["shape"][0], logits["shape"][2]]  # as contract 1 described it: [batch, vocab]
    spec = {**_spec(model, None, compose("export", ["source=tiny"]), {"fp32": variant}), "version": 1}
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    old = OnnxLM(tmp_path)
    ids = torch.randint(4, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(old.generate(ids, max_new_tokens=12), model.generate(ids, max_new_tokens=12))
    with pytest.raises(ConfigError, match=r"export contract 1\); export the model again"):
        check_drafting(Generator(old, None, "encdec", tmp_path), num_beams=1)
    (tmp_path / SPEC_FILE).write_text(json.dumps({**spec, "version": CONTRACT_VERSION + 1}))
    with pytest.raises(OnnxExportError, match=f"contract version {CONTRACT_VERSION + 1}, this slmctl reads 1 to {CONTRACT_VERSION}"):
        OnnxLM(tmp_path)
