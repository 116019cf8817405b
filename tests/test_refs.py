"""slmctl.refs: every form a user may type to name a model, parsed to one typed reference that
verifies, loads and records itself."""

import json
import subprocess
import sys

import pytest
import torch

from slmctl.files import EXPORT_SPEC_FILE
from slmctl.model import build_model, save_model
from slmctl.refs import KINDS, ModelRef, RefError, parse, resolve
from slmctl.runs.lookup import RunError
from slmctl.runs.run import Run
from slmctl.runtime.onnx import open_export

CONFIG = {"model": {"preset": "tiny"}}
NO_HUB = tuple(kind for kind in KINDS if kind != "hub")  # with a hub id allowed, "nonesuch" would be one


def finished_run(runs_dir, stage, name, files):
    """A succeeded run holding `files` ({relative path: text}), sealed by its manifest."""
    run = Run.create(runs_dir, stage, name, CONFIG, ["test"])
    for relative, text in files.items():
        run.write_text(relative, text)
    run.succeed()
    return run


def export_files(variants=("fp32", "int8")):
    spec = {"default_variant": "fp32", "model": {},
            "variants": {v: {"graphs": {"decoder": {"file": f"{v}/model.onnx"}}} for v in variants}}
    return {f"export/{EXPORT_SPEC_FILE}": json.dumps(spec), **{f"export/{v}/model.onnx": v for v in variants}}


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """runs/ under the working directory: a pretrain run, a distill run with a control student,
    an export run, a pretrain run of a Hugging Face model and a bench run (no model)."""
    monkeypatch.chdir(tmp_path)
    runs_dir = tmp_path / "runs"
    made = {"dir": runs_dir}
    made["pretrain"] = finished_run(runs_dir, "pretrain", "ours", {"model/model.json": "{}", "model/model.safetensors": "w"})
    made["distill"] = finished_run(runs_dir, "distill", "student", {"model/model.json": "{}",
                                                                    "control/model/model.json": "{}"})
    made["export"] = finished_run(runs_dir, "export", "onnx", export_files())
    made["hf"] = finished_run(runs_dir, "hf-pretrain", "llama", {"model/config.json": "{}"})
    made["bench"] = finished_run(runs_dir, "bench", "speed", {"bench.json": "{}"})
    return made


def test_every_form_parses_to_its_kind_path_variant_and_run(runs, tmp_path, monkeypatch):
    runs_dir, pretrain, export = runs["dir"], runs["pretrain"], runs["export"]
    for text in ("330m", "deconly-tiny"):
        assert resolve(text, runs_dir) == ModelRef("preset", text)
    for text in (pretrain.model_dir, pretrain.path, "pretrain/latest", "runs/pretrain/latest", "latest:pretrain",
                 f"pretrain/{pretrain.path.name}", pretrain.path.name):
        ref = resolve(text, runs_dir)
        assert (ref.kind, ref.text, ref.path, ref.variant, ref.run_dir) == \
            ("model_dir", str(text), pretrain.model_dir, None, pretrain.path)
    elsewhere = tmp_path / "elsewhere"  # runs/<stage>/latest typed in another directory than the runs'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve("runs/pretrain/latest", runs_dir).path == pretrain.model_dir
    monkeypatch.chdir(tmp_path)

    control = resolve(runs["distill"].path / "control" / "model", runs_dir)
    assert (control.kind, control.run_dir, control.label) == ("model_dir", runs["distill"].path, "student/control")

    for text, variant in (("export/latest", "fp32"), ("runs/export/latest:int8", "int8"), ("latest:export:int8", "int8"),
                          (f"{export.path / 'export'}:fp32", "fp32"), (export.path, "fp32")):
        ref = resolve(text, runs_dir)
        assert (ref.kind, ref.path, ref.variant, ref.run_dir, ref.label) == \
            ("export", export.path / "export", variant, export.path, f"onnx:{variant}")

    hf_run = resolve("hf-pretrain/latest", runs_dir)
    assert (hf_run.kind, hf_run.path, hf_run.run_dir) == ("hf_dir", runs["hf"].model_dir, runs["hf"].path)
    hf_dir = tmp_path / "llama"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert resolve("llama", runs_dir) == ModelRef("hf_dir", "llama", hf_dir, None, None)

    (tmp_path / "mu.pt").write_bytes(b"x")
    assert resolve("mu.pt", runs_dir) == ModelRef("reference_pt", "mu.pt", tmp_path / "mu.pt")

    for hub_id in ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "gpt2"):
        assert resolve(hub_id, runs_dir, allow=KINDS) == ModelRef("hub", hub_id)
        assert resolve(hub_id, runs_dir, allow=KINDS).where == hub_id


@pytest.mark.parametrize("text, allow, message", [
    ("nonesuch", NO_HUB, "no model at 'nonesuch': not a model directory (no model.json), not a file, and not a run"),
    ("org/name", ("model_dir",), "no model at 'org/name': not a model directory"),
    ("/no/such/dir", KINDS, "no model at '/no/such/dir': no such directory or file"),
    ("./empty", KINDS, "no model at './empty': not a model directory (no model.json), not a file, and not a run"),
    ("bench/latest", KINDS, "has no model ("),
    ("distill/latest", KINDS, None),  # the newest succeeded run: fine (a control for the next rows)
    ("pretrain/latest:int8", KINDS, "':int8' picks the graphs of an ONNX export, but 'pretrain/latest' is a slmctl model"),
    ("export/latest:int4", KINDS, "the export has no 'int4' graphs (it has: fp32, int8)"),
    ("notes.txt", KINDS, "is a file but not a reference-format .pt checkpoint"),
    ("eval/latest", KINDS, "no succeeded eval run"),  # a run form is never taken for a hub id
    ("330m", ("model_dir",), "'330m' is a preset (random weights); add-vision takes a slmctl model directory (model.json)"),
    ("export/latest", ("preset", "model_dir"),
     "is an ONNX export (slmctl_onnx.json); add-vision takes a preset (random weights) or a slmctl model directory"),
])
def test_forms_that_name_no_usable_model_are_one_line_errors(runs, tmp_path, text, allow, message):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    if message is None:
        assert resolve(text, runs["dir"], allow=allow, purpose="add-vision").kind == "model_dir"
        return
    with pytest.raises((RefError, RunError)) as error:
        resolve(text, runs["dir"], allow=allow, purpose="add-vision")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_resolve_refuses_an_artifact_changed_since_its_run_finished(runs):
    runs_dir = runs["dir"]
    (runs["pretrain"].model_dir / "model.safetensors").write_text("W")  # same size, other bytes
    assert parse("pretrain/latest", runs_dir).kind == "model_dir"  # parsing alone reads no weights
    with pytest.raises(RunError, match=r"model\.safetensors: sha256 differs .*MANIFEST\.json"):
        resolve("pretrain/latest", runs_dir)

    (runs["export"].path / "export" / "int8" / "model.onnx").write_text("int9")  # one variant's graph
    assert resolve("export/latest", runs_dir).variant == "fp32"  # the other variant is untouched: usable
    with pytest.raises(RunError, match=r"int8/model\.onnx: sha256 differs"):
        resolve("export/latest:int8", runs_dir)


def test_records_itself_as_a_run_input(runs, tmp_path):
    consumer = Run.create(runs["dir"], "eval", "consumer", CONFIG, ["test"])
    (tmp_path / "mu.pt").write_bytes(b"x")
    for text in ("tiny", "pretrain/latest", "mu.pt"):
        resolve(text, runs["dir"]).record_input(consumer, role="model")
    resolve("org/name", runs["dir"], allow=KINDS).record_input(consumer, role="teacher")
    recorded = [(i["kind"], i["ref"], i["path"], i["stage"], i.get("role")) for i in consumer.inputs()]
    assert recorded == [("preset", "tiny", None, None, "model"),
                        ("run", "pretrain/latest", str(runs["pretrain"].model_dir), "pretrain", "model"),
                        ("file", "mu.pt", str(tmp_path / "mu.pt"), None, "model"),
                        ("hub", "org/name", "org/name", None, "teacher")]


def test_loads_presets_model_dirs_exports_and_hugging_face_models(tmp_path, llama_dir):
    from slmctl.config.compose import compose
    from slmctl.export.onnx_export import export_graphs
    from slmctl.export.stage import _spec

    runs_dir = tmp_path / "runs"
    preset = resolve("tiny", runs_dir).load_torch(dtype=torch.bfloat16, seed=3)
    assert preset.config.name == "tiny" and preset.dtype == torch.bfloat16
    assert torch.equal(preset.embed.weight, build_model("tiny", seed=3).embed.weight.bfloat16())  # seeded

    model = build_model("tiny", seed=0).eval()
    run = Run.create(runs_dir, "export", "tiny", CONFIG, ["test"])
    save_model(model, run.model_dir)
    spec = _spec(model, None, compose("export", ["source=tiny"]), {})
    spec["variants"]["fp32"] = export_graphs(model, run.path / "export")
    run.write_json(f"export/{EXPORT_SPEC_FILE}", spec)
    run.succeed()
    loaded = resolve(run.model_dir, runs_dir).load_torch()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    onnx = open_export(resolve(f"{run.path / 'export'}:fp32", runs_dir))
    prompt = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(onnx.generate(prompt, max_new_tokens=4), model.generate(prompt, max_new_tokens=4))
    with pytest.raises(RefError, match="is an ONNX export .*PyTorch loading takes"):
        resolve(run.path / "export", runs_dir).load_torch()

    llama = resolve(llama_dir, runs_dir)
    assert llama.kind == "hf_dir" and type(llama.load_transformers()).__name__ == "LlamaForCausalLM"
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefError, match="cannot load teacher '.*empty'"):
        ModelRef("hf_dir", "empty", tmp_path / "empty").load_transformers(what="teacher")


def test_refs_imports_without_torch():
    code = "import sys, slmctl.refs; assert 'torch' not in sys.modules, 'refs pulled in torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
