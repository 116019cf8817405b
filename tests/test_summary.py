"""A recipe's closing summary reads every number from the runs it names, refuses runs that did not
succeed or changed since, and writes its tables into a run of its own."""

import json

import pytest
import yaml
from conftest import cli

from slmctl.errors import ConfigError
from slmctl.runs.lookup import verify_manifest
from slmctl.runs.run import Run
from slmctl.summary import build, check_spec


def finished_run(runs, stage, name, files: dict) -> str:
    run = Run.create(runs, stage, name, {}, argv=["test"])
    for file, content in files.items():
        run.write_json(file, content)
    run.succeed({})
    return str(run.path)


def result(value, low, high, n=200):
    return {"value": value, "low": low, "high": high, "n": n}


def qa_eval(runs) -> str:
    models = {"encdec": {"exact_match": result(0.61, 0.54, 0.68), "f1": result(0.66, 0.6, 0.72)},
              "deconly": {"exact_match": result(0.57, 0.5, 0.64), "f1": result(0.6, 0.53, 0.67)},
              "student": {"exact_match": result(0.42, 0.35, 0.49), "f1": result(0.45, 0.38, 0.52)},
              "control": {"exact_match": result(0.31, 0.25, 0.38), "f1": result(0.33, 0.27, 0.4)}}
    paired = [{"model": "encdec", "baseline": "deconly", "metrics": {"exact_match": {"difference": 0.04, "low": -0.02,
                                                                                     "high": 0.1, "n": 200}}},
              {"model": "student", "baseline": "control", "metrics": {"exact_match": {"difference": 0.11, "low": 0.055,
                                                                                      "high": 0.17, "n": 200}}}]
    cost = {"encdec": {"cpu_s": 3.25, "wall_s": 1.7, "examples": 200}, "deconly": {"cpu_s": 7.5, "wall_s": 3.9, "examples": 200}}
    return finished_run(runs, "eval", "eval", {"metrics.json": {"tasks": {"synthetic_qa": {
        "n": 200, "models": models, "paired": paired, "cost": cost}}}})


def bench(runs) -> str:
    def record(model, input_len, first_token_ms, decode_tok_s):
        return {"model": model, "batch": 1, "input_len": input_len, "output_len": 32, "params": 6_184_704,
                "first_token_ms": first_token_ms, "decode_tok_s": decode_tok_s, "cpu": "AMD EPYC 7B13", "runtime": "onnx"}

    return finished_run(runs, "bench", "bench", {"bench.json": {"records": [
        record("encdec", 64, 7.0, 1000.0), record("encdec", 256, 18.25, 950.0),
        record("deconly", 64, 9.0, 400.0), record("deconly", 256, 29.5, 350.0)]}})


def test_every_number_of_the_summary_comes_from_the_runs(tmp_path):
    runs = tmp_path / "runs"
    evaluated, benched = qa_eval(runs), bench(runs)
    exported = finished_run(runs, "export", "export", {"quantization.json": {
        "speed_setting": {"input_len": 128, "output_len": 32, "eval_limit": 50},
        "variants": {"fp32": {"mb": 27.08, "first_token_ms": 10.93, "decode_tok_s": 1489.6, "task": result(0.76, 0.64, 0.86, 50)},
                     "int8": {"mb": 8.85, "first_token_ms": 5.13, "decode_tok_s": 2666.7, "token_agreement": 0.969,
                              "task": result(0.74, 0.62, 0.84, 50)}}}})
    shapes = finished_run(runs, "eval", "eval-vision", {"metrics.json": {"tasks": {"shapes_vqa": {
        "n": 200, "models": {"vision": {"exact_match": result(0.655, 0.59, 0.72)}},
        "chance": {"overall": 0.375, "colour": 0.21, "shape": 0.4}, "per_kind": {"vision": {"colour": 1.0, "shape": 0.44}},
        "per_kind_interval": {"vision": {"colour": [1.0, 1.0], "shape": [0.32, 0.56]}}}}}})
    towered = finished_run(runs, "add-vision", "vision", {"stages.json": [
        {"stage": 0, "steps": 600, "objective": "layout (counts, and what covers each position: cross-entropy)",
         "scenes": 4000, "max_shapes": 1, "seconds": 95.6}, {"stage": 1, "steps": 100}, {"stage": 2, "steps": 200}]})
    spec = {"architecture": {"eval": evaluated, "bench": benched, "models": ["encdec", "deconly"]},
            "distillation": {"eval": evaluated, "models": ["deconly", "student", "control"]},
            "export": {"export": exported}, "vision": {"eval": shapes, "model_run": towered}}
    sections, points = build(spec)
    architecture, distillation, export, vision = sections
    assert architecture.title.endswith("256 -> 32 tokens, batch 1, AMD EPYC 7B13, ONNX Runtime")  # the longest prompt, the CPU
    assert architecture.rows == [["encdec", "6.18M", "0.610 [0.540, 0.680]", "18.2", "950", "3.2"],
                                 ["deconly", "6.18M", "0.570 [0.500, 0.640]", "29.5", "350", "7.5"]]
    assert architecture.notes == ["exact match encdec - deconly on the same questions: +0.040 [-0.020, +0.100] (paired bootstrap)"]
    assert points["deconly"]["cpu_s"] == 7.5 and points["encdec"]["exact_match"]["low"] == 0.54
    assert [row[:2] for row in distillation.rows] == [["deconly", "0.570 [0.500, 0.640]"], ["student", "0.420 [0.350, 0.490]"],
                                                       ["control", "0.310 [0.250, 0.380]"]]
    assert distillation.notes == ["exact match student - control on the same questions: +0.110 [+0.055, +0.170]"]
    assert export.rows[1] == ["int8", "8.8", "5.1", "2667", "0.969", "0.740 [0.620, 0.840]"]
    assert vision.rows == [["colour", "1.000 [1.000, 1.000]", "0.210", "+0.790"], ["shape", "0.440 [0.320, 0.560]", "0.400", "+0.040"],
                           ["all [95% CI]", "0.655 [0.590, 0.720]", "0.375", "+0.280"]]
    assert vision.notes == ["tower pretrained first on 4000 one-shape scenes: layout (counts, and what covers each position: "
                            "cross-entropy), 600 steps in 96 s; then stage 1 100 steps, stage 2 200 steps"]

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "story", "steps": [{"name": "summary", "summary": spec}]}))
    result_ = cli("recipe", "run", str(recipe), runs=runs)
    assert result_.exit_code == 0, result_.output
    [summary_run] = (runs / "summary").glob("*-summary")
    text = (summary_run / "summary.md").read_text()
    assert "| encdec | 6.18M | 0.610 [0.540, 0.680] | 18.2 | 950 | 3.2 |" in text and "+0.110 [+0.055, +0.170]" in text
    assert json.loads((summary_run / "summary.json").read_text())[0]["rows"] == architecture.rows
    assert (summary_run / "architecture.png").stat().st_size > 1000 and not verify_manifest(summary_run)
    roles = {i["role"] for i in json.loads((summary_run / "inputs.json").read_text())}
    assert roles == {"architecture.eval", "architecture.bench", "distillation.eval", "export.export", "vision.eval",
                     "vision.model_run"}


def test_several_seeds_are_summarised_by_their_mean_gain_and_how_many_intervals_exclude_zero(tmp_path):
    evaluated = qa_eval(tmp_path / "runs")
    [section], _ = build({"distillation": {"eval": evaluated, "models": ["encdec", "deconly", "student", "control"]}})
    assert section.notes[-1] == "mean difference over the 2 pairs: +0.075 (range +0.040 to +0.110); 1 of 2 intervals above 0"


def test_a_summary_refuses_runs_that_failed_or_changed(tmp_path):
    runs = tmp_path / "runs"
    evaluated = qa_eval(runs)
    spec = {"distillation": {"eval": evaluated, "models": ["student", "control"]}}
    metrics = tmp_path / "runs" / "eval" / evaluated.rsplit("/", 1)[1] / "metrics.json"
    metrics.write_text(metrics.read_text().replace("0.42", "0.92"))  # edited after the run finished
    with pytest.raises(ConfigError, match="changed since it finished"):
        build(spec)
    failed = Run.create(runs, "eval", "failed", {}, argv=["test"])
    failed.fail("boom")
    with pytest.raises(ConfigError, match="not a succeeded run"):
        build({"distillation": {"eval": str(failed.path), "models": ["student"]}})
    with pytest.raises(ConfigError, match="evaluated no model 'teacher'"):
        build({"distillation": {"eval": qa_eval(runs), "models": ["teacher"]}})


@pytest.mark.parametrize("spec, message", [
    ({}, "names one or more of"),
    ({"speed": {}}, "unknown summary section 'speed'"),
    ({"architecture": {"eval": "x", "models": ["a"]}}, "needs eval, bench, models"),
])
def test_bad_summary_steps_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        check_spec(spec, "step 'summary'")


def test_the_drafting_table_sets_drafted_answers_beside_plain_ones_with_the_speed_up(tmp_path):
    runs = tmp_path / "runs"

    def about_eval(name, wall_s, draft=None, decode_tok_s=None):
        cost = {"cpu_s": 2 * wall_s, "wall_s": wall_s, "examples": 100, **({"draft": draft} if draft else {}),
                **({"decode_tok_s": decode_tok_s} if decode_tok_s else {})}
        return finished_run(runs, "eval", name, {"metrics.json": {"tasks": {"synthetic_about": {"n": 100, "models": {
            "encdec": {"exact_match": result(0.81, 0.73, 0.88, 100), "rougeLsum": result(0.97, 0.95, 0.98, 100)}},
            "cost": {"encdec": cost}}}}})

    draft = {"drafter": "prompt", "draft_tokens": 10, "passes": 900, "drafted": 6000, "accepted": 5400, "accepted_per_pass": 6.0}
    plain, drafted = about_eval("plain", 40.0, decode_tok_s=150.0), about_eval("drafted", 12.5, draft, decode_tok_s=600.0)
    [section], _ = build({"drafting": [{"plain": plain, "drafted": drafted}]})
    assert section.rows == [["plain greedy", "0.810 [0.730, 0.880]", "0.970 [0.950, 0.980]", "40.0", "1.00x", "150", "1.00x",
                             "-"],
                            ["encdec + prompt lookup (K <= 10)", "0.810 [0.730, 0.880]", "0.970 [0.950, 0.980]", "12.5",
                             "3.20x", "600", "4.00x", "6.00"]]
    older = about_eval("older", 12.5, draft)  # an eval from before the decode speed was recorded: its cells say so
    [section], _ = build({"drafting": [{"plain": plain, "drafted": older}]})
    assert section.rows[1][5:7] == ["-", "-"]
    with pytest.raises(ConfigError, match="drafting.plain must be an eval without drafts"):  # the two runs the wrong way round
        build({"drafting": {"plain": drafted, "drafted": plain}})
    with pytest.raises(ConfigError, match="needs plain, drafted"):
        check_spec({"drafting": [{"plain": plain}]}, "step 'summary'")
