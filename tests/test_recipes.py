"""Recipes: later steps consume earlier runs; bad recipes are one-line errors."""

import json
import re

import pytest
import yaml
from conftest import REPO, TINY_SYNTHETIC_DATA, TINY_TRAINING, cli

from slmctl.errors import ConfigError
from slmctl.recipes import load_recipe, run_recipe

SMALL = ["tokenizer.vocab_size=400", "objective=seq2seq", *TINY_SYNTHETIC_DATA, "max_source_len=48", *TINY_TRAINING,
         "checkpoint_every=3"]


def test_a_pipeline_shares_the_tokenizer_and_records_lineage(tmp_path):
    recipe = {"name": "mini-quickstart", "steps": [
        {"name": "encdec", "stage": "pretrain", "overrides": ["model=tiny", *SMALL]},
        {"name": "deconly", "stage": "pretrain",
         "overrides": ["model=deconly-tiny", "tokenizer=run", "tokenizer.path=${runs.encdec}",
                       *[o for o in SMALL if not o.startswith("tokenizer.")]]},
        {"name": "answers", "generate": {"model": "${runs.deconly}", "synthetic_questions": 2, "max_new_tokens": 3}},
    ]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    produced = run_recipe(path, tmp_path / "runs")
    assert set(produced) == {"encdec", "deconly"}
    encdec, deconly = produced["encdec"], produced["deconly"]
    assert (encdec / "model" / "tokenizer.json").read_text() == (deconly / "model" / "tokenizer.json").read_text()
    inputs = json.loads((deconly / "inputs.json").read_text())
    assert any(i["path"].startswith(str(encdec)) for i in inputs)
    assert json.loads((deconly / "status.json").read_text())["status"] == "succeeded"


def test_a_pipeline_distils_its_own_llama_teacher_with_a_control(tmp_path):
    no_tokenizer = [o for o in SMALL if not o.startswith("tokenizer.") and not o.startswith("objective")]
    recipe = {"name": "kd", "steps": [
        {"name": "encdec", "stage": "pretrain", "overrides": ["model=tiny", *SMALL]},
        {"name": "teacher", "stage": "pretrain",
         "overrides": ["model=hf-causal", "model.hf.hidden_size=32", "model.hf.intermediate_size=64",
                       "model.hf.num_hidden_layers=1", "objective=seq2seq", "tokenizer=run",
                       "tokenizer.path=${runs.encdec}", *no_tokenizer]},
        {"name": "distill", "stage": "distill",
         "overrides": ["teacher=run", "teacher.path=${runs.teacher}", "student=tiny", "control=true", *no_tokenizer]},
        {"name": "eval", "stage": "eval",
         "overrides": ["models=[${runs.distill},${runs.distill}/control/model]", "task.n_people=200", "task.n=6",
                       "bootstrap=50"]},
        {"name": "export", "stage": "export",
         "overrides": ["source=${runs.distill}", "quantize=[int8]", "validation.prompt_lens=[6]", "validation.steps=8",
                       "report.prompts=4", "report.steps=6", "report.eval_limit=4", "report.input_len=16",
                       "report.output_len=4", "report.repeat=1", "task.n_people=200"]},
        {"name": "bench", "stage": "bench",
         "overrides": ["models=[${runs.export}:int8,${runs.distill}]", "input_lens=[16]", "output_lens=[4]", "repeat=1"]},
    ]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    produced = run_recipe(path, tmp_path / "runs")
    status = json.loads((produced["distill"] / "status.json").read_text())
    assert status["status"] == "succeeded"
    assert {"val_ce_loss", "control_val_ce_loss", "val_ce_gain"} <= set(status["summary"])
    inputs = json.loads((produced["distill"] / "inputs.json").read_text())
    assert any(i.get("role") == "teacher" and i["path"].startswith(str(produced["teacher"])) for i in inputs)
    metrics = json.loads((produced["eval"] / "metrics.json").read_text())
    assert list(metrics["tasks"]["synthetic_qa"]["models"]) == ["distill", "distill/control"]
    assert (produced["eval"] / "comparison-synthetic_qa.png").is_file()
    records = json.loads((produced["bench"] / "bench.json").read_text())["records"]
    assert [(r["runtime"], r["dtype"]) for r in records] == [("onnx", "int8"), ("torch", "float32")]
    assert json.loads((produced["export"] / "validation.json").read_text())["passed"]


@pytest.mark.parametrize("recipe, message", [
    ({"steps": []}, "non-empty 'steps'"),
    ({"steps": [{"stage": "pretrain"}]}, "step 1 needs a 'name'"),
    ({"steps": [{"name": "a", "stage": "pretrain", "overrides": ["init=${runs.b}"]}]}, "uses ${runs.b} before"),
    ({"steps": [{"name": "a"}]}, "exactly one of 'stage', 'generate', 'summary'"),
    ({"steps": [{"name": "a", "summary": {"speed": {}}}]}, "unknown summary section 'speed'"),
])
def test_bad_recipes(tmp_path, recipe, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=message.replace("$", r"\$").replace("{", r"\{").replace("}", r"\}")):
        load_recipe(path)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_are_valid(name):
    from slmctl.config.compose import compose

    recipe = load_recipe(REPO / "recipes" / name)
    for step in recipe["steps"]:
        if "stage" in step:
            overrides = [re.sub(r"\$\{runs\.[A-Za-z0-9_-]+\}", "/tmp/x", o) for o in step["overrides"]]
            compose(step["stage"], overrides)


def test_a_recipe_step_stopped_by_sigterm_is_marked_interrupted_like_a_stage_alone(tmp_path, monkeypatch):
    """A Stopped (SIGTERM, Ctrl-C) inside a recipe step goes through the same runner as a stage
    run alone: the step's run says `interrupted`, the recipe exits 130 naming how to resume."""
    from slmctl.runs.lookup import list_runs
    from slmctl.train import pretrain
    from slmctl.interrupts import Stopped

    def stopped(cfg, run):
        raise Stopped("stopped by SIGTERM")

    monkeypatch.setattr(pretrain, "run", stopped)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"steps": [{"name": "encdec", "stage": "pretrain", "overrides": ["model=tiny", *SMALL]}]}))
    result = cli("recipe", "run", str(path), runs=tmp_path / "runs")
    assert result.exit_code == 130, result.output
    (run,) = list_runs(tmp_path / "runs", "pretrain")
    assert run.status == "interrupted"
    assert f"resume with: slmctl pretrain resume={run.path}" in " ".join(result.output.split())
