"""slmctl add-vision: a text encoder-decoder learns to read images, stage by stage."""

import json

import pytest
import torch
from conftest import TINY_PRETRAIN, CountSteps, Crash, cli, newest_run, resumed_from, train_run
from PIL import Image

from slmctl.config.compose import compose
from slmctl.data.shapes import ShapeScenes
from slmctl.errors import CheckpointError
from slmctl.eval.metrics import bootstrap_ci
from slmctl.model import load_model
from slmctl.model.counting import COUNTED
from slmctl.model.vlm import VisionEncoderDecoderLM
from slmctl.runs.run import Run

TINY_VISION = ["vision.image_size=32", "vision.patch_size=8", "vision.width=32", "vision.layers=2", "vision.heads=2",
               "vision.max_tokens_per_image=16", "batch_size=4", "validation_every=2", "stage1.steps=3", "stage2.steps=3",
               "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
SHAPES = ["data.train_examples=24", "data.validation_examples=6"]


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """A tiny trained encoder-decoder and a tiny decoder-only model (pretrain runs)."""
    runs = tmp_path_factory.mktemp("runs")
    made = {}
    for name, model in (("encdec", "tiny"), ("deconly", "deconly-tiny")):
        two_steps = [f"model={model}", *(o for o in TINY_PRETRAIN if not o.startswith("model=")), "data.train_examples=100",
                     "data.validation_examples=8", "trainer.max_steps=2", "trainer.val_check_interval=2"]
        made[name] = train_run(runs, "pretrain", two_steps, name=name).path
    return runs, made


def test_two_stages_train_the_right_parts_and_write_a_loadable_vision_model(text_runs, tmp_path):
    runs, made = text_runs
    result = cli("add-vision", str(made["encdec"]), *TINY_VISION, *SHAPES, runs=runs)
    assert result.exit_code == 0, result.output
    run = newest_run(runs, "add-vision")
    stages = json.loads((run / "stages.json").read_text())
    assert stages[0]["trained"] == ["compressor", "projector"] and set(stages[0]["frozen"]) == {"tower", "text"}
    assert set(stages[1]["trained"]) == {"compressor", "projector", "text", "tower"}  # vit-tiny: trained from scratch
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("stage1_train_loss" in m for m in metrics) and any("stage2_val_loss" in m for m in metrics)
    summary = json.loads((run / "status.json").read_text())["summary"]
    assert 0 <= summary["exact_match"] <= 1 and 0 < summary["chance"] < 1 and summary["tokens_per_image"] <= 16
    model = load_model(run / "model")
    assert isinstance(model, VisionEncoderDecoderLM) and (run / "model" / "vision.safetensors").is_file()
    image = Image.new("RGB", (90, 40), (200, 30, 30))
    ids = torch.tensor([[3, 10, 11]])
    assert model.generate(ids, images=[[image]], max_new_tokens=4).shape[1] <= 4
    generated = cli("generate", str(run), "prompt=<image>\nWhat color is the circle?",
                    "--image", str(_save(image, tmp_path / "x.png")), "--max-new-tokens", "4")
    assert generated.exit_code == 0, generated.output


def _save(image, path):
    image.save(path)
    return path


def test_stage_one_leaves_the_tower_and_the_language_model_untouched(text_runs):
    runs, made = text_runs
    result = cli("add-vision", str(made["encdec"]), *TINY_VISION, *SHAPES, "stage2.steps=0", "--name", "align", runs=runs)
    assert result.exit_code == 0, result.output
    run = newest_run(runs, "add-vision", "align")
    trained, original = load_model(run / "model"), load_model(made["encdec"] / "model")
    for (name, a), b in zip(trained.text.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    fresh = VisionEncoderDecoderLM(original, trained.vision_config, trained.image_token_id)
    assert all(torch.equal(a, b) for a, b in zip(trained.tower.state_dict().values(), fresh.tower.state_dict().values()))
    assert not torch.equal(trained.projector.net[1].weight, fresh.projector.net[1].weight)


def test_bad_inputs_are_one_line_errors(text_runs, tmp_path):
    runs, made = text_runs
    result = cli("add-vision", str(made["deconly"]), *TINY_VISION, *SHAPES, runs=runs)
    assert result.exit_code == 2 and "decoder-only model; add-vision feeds images to an encoder" in " ".join(result.output.split())
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    rows = [{"image": "ok.png", "prompt": "<image>\nWhat?", "answer": "x"}] * 6 + [{"image": "bad.png", "prompt": "<image>", "answer": "y"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli("add-vision", str(made["encdec"]), *TINY_VISION, "data=images", f"data.train={tmp_path / 'train.jsonl'}", runs=runs)
    assert result.exit_code == 2 and "train.jsonl:7: image" in " ".join(result.output.split()) and "Traceback" not in result.output
    result = cli("add-vision", str(made["encdec"]), *TINY_VISION, "data=images", f"data.train={tmp_path / 'train.jsonl'}",
                 "data.skip_bad=true", "data.validation_fraction=0.3", runs=runs)
    assert result.exit_code == 0, result.output
    run = newest_run(runs, "add-vision")
    assert "1 rows skipped for unreadable images" in (run / "log.txt").read_text()


def test_eval_scores_a_vision_model_on_held_out_shape_scenes(text_runs):
    runs, made = text_runs
    result = cli("add-vision", str(made["encdec"]), *TINY_VISION, *SHAPES, "--name", "for-eval", runs=runs)
    assert result.exit_code == 0, result.output
    run = newest_run(runs, "add-vision", "for-eval")
    evaluated = cli("eval", str(run), "task=shapes_vqa", "limit=6", "bootstrap=20", runs=runs)
    assert evaluated.exit_code == 0, evaluated.output
    eval_run = newest_run(runs, "eval")
    scores = json.loads((eval_run / "metrics.json").read_text())["tasks"]["shapes_vqa"]
    assert scores["n"] == 6 and 0 <= next(iter(scores["models"].values()))["exact_match"]["value"] <= 1
    assert 0 < scores["chance"]["overall"] <= 1
    (label, overall), = scores["models"].items()
    per_kind = scores["per_kind"][label]  # the kinds the 6 test questions have, each with its chance beside it
    kinds = [q["kind"] for q in ShapeScenes(seed=0).questions("test", 6)]
    assert set(per_kind) == set(kinds) and set(per_kind) < set(scores["chance"])
    assert abs(sum(per_kind[k] * kinds.count(k) for k in per_kind) / 6 - overall["exact_match"]["value"]) < 1e-9
    # each kind's interval is the bootstrap of that kind's questions alone (seed 0, as the eval's)
    rows = [json.loads(line) for line in (eval_run / "predictions.jsonl").read_text().splitlines()]
    for kind, (low, high) in scores["per_kind_interval"][label].items():
        alone = [r["scores"]["exact_match"] for r, k in zip(rows, kinds) if k == kind]
        assert (low, high) == bootstrap_ci(alone, 20, seed=0)[1:] and low <= per_kind[kind] <= high
    text_only = cli("eval", str(made["encdec"]), "task=shapes_vqa", "limit=2", runs=runs)
    assert text_only.exit_code == 2 and "has no vision tower" in " ".join(text_only.output.split())


def test_a_siglip_tower_loads_from_a_directory(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from slmctl.model import build_model
    from slmctl.model.vision import VisionConfig

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    SiglipVisionModel(config).save_pretrained(tmp_path / "siglip")
    vision = VisionConfig(tower="siglip", path=str(tmp_path / "siglip"), anyres=False, compress="none")
    vlm = VisionEncoderDecoderLM(build_model("tiny", seed=0), vision, image_token_id=3).eval()
    assert vlm.image_tokens([Image.new("RGB", (32, 32))])[0].shape == (16, 64)  # no class token to drop
    from slmctl.model.vlm import save_vision_model

    save_vision_model(vlm, tmp_path / "saved")
    loaded = load_model(tmp_path / "saved")
    image = Image.new("RGB", (32, 32), (9, 99, 199))
    assert torch.equal(loaded.image_tokens([image])[0], vlm.image_tokens([image])[0])
    # checksums.json covers the files written after the text model's: the vision weights, config and tower
    checksums = json.loads((tmp_path / "saved" / "checksums.json").read_text())
    assert {"vision.safetensors", "vision.json", "vision_tower/config.json", "model.safetensors"} <= set(checksums)
    weights = tmp_path / "saved" / "vision.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="vision.safetensors: sha256 differs"):
        load_model(tmp_path / "saved")


def test_a_vision_model_exports_to_onnx_and_generates_what_torch_generates(text_runs):
    from slmctl.data.shapes import ShapeScenes
    from slmctl.runtime.onnx import OnnxLM

    runs, made = text_runs
    result = cli("add-vision", str(made["encdec"]), *TINY_VISION, *SHAPES, "stage2.steps=1", "--name", "for-export", runs=runs)
    assert result.exit_code == 0, result.output
    run = newest_run(runs, "add-vision", "for-export")
    exported = cli("export", "onnx", str(run), "validation.prompt_lens=[4,9]", "validation.steps=8", runs=runs)
    assert exported.exit_code == 0, exported.output
    export_run = newest_run(runs, "export")
    report = json.loads((export_run / "validation.json").read_text())
    assert report["passed"] and report["vision_max_abs_diff"] <= 1e-4
    assert (export_run / "export" / "vision.onnx").is_file()
    onnx_model, vlm = OnnxLM(export_run / "export"), load_model(run / "model").eval()
    scenes = ShapeScenes(seed=5)
    images = [[scenes.example("test", 0)["image"]], [scenes.example("test", 1)["image"], scenes.example("test", 2)["image"]]]
    ids = torch.tensor([[3, 40, 41, 0], [42, 3, 43, 3]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.equal(onnx_model.generate(ids, mask, images=images, max_new_tokens=6),
                       vlm.generate(ids, mask, images=images, max_new_tokens=6))

    bench = cli("bench", str(export_run), str(run), "--input-lens", "8", "--output-lens", "3",
                "--repeat", "1", "--image-size", "96x48", "--format", "json", runs=runs)
    assert bench.exit_code == 0, bench.output
    records = json.loads(bench.stdout[bench.stdout.index("["):bench.stdout.rindex("]") + 1])
    assert [r["runtime"] for r in records] == ["onnx", "torch"] and records[0]["image_size"] == [96, 48]
    assert records[0]["tokens_per_image"] == records[1]["tokens_per_image"] <= 16 and records[1]["vision_ms"] > 0


def test_killed_in_stage_two_and_resumed_continues_to_the_same_weights(text_runs):
    """Killed at step 5 of stage 2 (checkpoints every 2): the resumed process does not redo
    stage 1, runs stage 2's last 2 steps from its step-4 checkpoint, logs both, and ends with
    the uninterrupted run's weights, bit for bit."""
    from safetensors.torch import load_file

    from slmctl.train import add_vision as stage

    runs, made = text_runs
    overrides = [f"source={made['encdec']}", *TINY_VISION, *SHAPES, "stage2.steps=6", "checkpoint_every=2",
                 "validation_every=3"]
    cfg = compose("add-vision", overrides)
    whole = train_run(runs, "add-vision", overrides, name="whole")
    killed = Run.create(runs, "add-vision", "killed", cfg, argv=["test"])
    with pytest.raises(SystemExit):
        stage.run(cfg, killed, callbacks=[Crash(5, fit=2)])
    counted = CountSteps()
    resumed = Run.open(killed.path)
    resumed.resume()
    stage.run(compose("add-vision", [*overrides, f"resume={killed.path}"]), resumed, callbacks=[counted])
    assert counted.steps == 6 - 4
    assert resumed_from(killed.path) == ["resumed from step 3 (checkpoint checkpoints/stage1/step-00000003.ckpt); 0 steps to go",
                                         "resumed from step 4 (checkpoint checkpoints/stage2/step-00000004.ckpt); 2 steps to go"]
    for name in ("model.safetensors", "vision.safetensors"):
        a, b = load_file(whole.model_dir / name), load_file(killed.model_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_contrastive_pretraining_trains_the_tower_on_captions_before_the_two_stages(text_runs, tmp_path):
    from safetensors.torch import load_file

    runs, made = text_runs
    result = cli("add-vision", str(made["encdec"]), *TINY_VISION, *SHAPES, "vision.pretrain=contrastive", "stage0.steps=4",
                 "stage2.steps=0", runs=runs)
    assert result.exit_code == 0, result.output
    run = newest_run(runs, "add-vision")
    stages = json.loads((run / "stages.json").read_text())
    assert [s["stage"] for s in stages] == [0, 1, 2] and stages[0]["trained"] == ["tower"]
    assert 0 <= stages[0]["retrieval_before"] <= 1 and 0 <= stages[0]["retrieval_after"] <= 1
    assert stages[0]["final_loss"] > 0
    pretrained = load_file(str(run / "checkpoints" / "stage0" / "tower.safetensors"))
    plain = cli("add-vision", str(made["encdec"]), *TINY_VISION, *SHAPES, "stage2.steps=0", runs=runs)
    assert plain.exit_code == 0, plain.output
    final = {name: load_model(newest_run(runs, "add-vision") / "model").tower.state_dict()[name] for name in pretrained}
    with_pretraining = load_model(run / "model").tower.state_dict()
    # stage 1 freezes the tower: the model keeps exactly the pretrained tower, which is not the fresh one
    assert all(torch.equal(with_pretraining[name], pretrained[name]) for name in pretrained)
    assert any(not torch.equal(final[name], pretrained[name]) for name in pretrained)
    log = (run / "log.txt").read_text()
    assert "stage 0: contrastive pretraining of the tower" in log and "retrieval accuracy after" in log
    jsonl = ShapeScenes(seed=0).write_jsonl(tmp_path / "scenes", "train", 8)  # image-text rows: no captions
    failed = cli("add-vision", str(made["encdec"]), *TINY_VISION, "vision.pretrain=contrastive", "data=images",
                 f"data.train={jsonl}", runs=runs)
    assert failed.exit_code == 2 and "needs captions" in " ".join(failed.output.split())


@pytest.mark.parametrize("kind, measured", [("counts", COUNTED), ("layout", (*COUNTED, "named"))])
def test_counting_pretraining_trains_the_tower_to_count_shapes_before_the_two_stages(text_runs, kind, measured):
    from safetensors.torch import load_file

    runs, made = text_runs
    result = cli("add-vision", str(made["encdec"]), *TINY_VISION, *SHAPES, f"vision.pretrain={kind}", "stage0.steps=6",
                 "stage0.lr=3e-3", "stage2.steps=0", runs=runs)
    assert result.exit_code == 0, result.output
    run = newest_run(runs, "add-vision")
    [stage0, *_] = json.loads((run / "stages.json").read_text())
    assert stage0["stage"] == 0 and stage0["objective"].startswith(kind) and stage0["trained"] == ["tower"]
    # shapes, each kind, each colour of each kind (layout: and the covered positions whose shape it names)
    assert list(stage0["count_accuracy_after"]) == list(measured)
    assert stage0["count_accuracy_after"] != stage0["count_accuracy_before"] and stage0["final_loss"] > 0
    pretrained = load_file(str(run / "checkpoints" / "stage0" / "tower.safetensors"))
    kept = load_model(run / "model").tower.state_dict()
    assert all(torch.equal(kept[name], pretrained[name]) for name in pretrained)  # stage 1 froze the counted tower
    assert f"stage 0: {kind} pretraining of the tower" in (run / "log.txt").read_text()


def test_a_later_run_starts_from_an_earlier_runs_pretrained_tower(text_runs, tmp_path):
    from safetensors.torch import load_file

    runs, made = text_runs
    assert cli("add-vision", str(made["encdec"]), *TINY_VISION, *SHAPES, "vision.pretrain=counts", "stage0.steps=4",
               "stage2.steps=0", runs=runs).exit_code == 0
    pretrained = newest_run(runs, "add-vision")
    result = cli("add-vision", str(made["encdec"]), *TINY_VISION, *SHAPES, f"vision.path={pretrained}", "stage2.steps=0", runs=runs)
    assert result.exit_code == 0, result.output
    run = newest_run(runs, "add-vision")
    assert [s["stage"] for s in json.loads((run / "stages.json").read_text())] == [1, 2]  # no stage 0 of its own
    tower = load_file(str(pretrained / "checkpoints" / "stage0" / "tower.safetensors"))
    kept = load_model(run / "model").tower.state_dict()
    assert all(torch.equal(kept[name], tower[name]) for name in tower)  # stage 1 froze the reused tower
    [tower_input] = [i for i in json.loads((run / "inputs.json").read_text()) if i["role"] == "vision tower"]
    assert tower_input["kind"] == "run" and tower_input["ref"] == str(pretrained)  # the lineage names the run
    # refused in one line: no tower there, a tower of other sizes, a file that is not safetensors
    (tmp_path / "junk.safetensors").write_text("not weights")
    for path, message in ((made["encdec"], "no pretrained tower there"), (pretrained, "does not fit"),
                          (tmp_path / "junk.safetensors", "not a readable safetensors file")):
        width = ["vision.width=16"] if message == "does not fit" else []
        failed = cli("add-vision", str(made["encdec"]), *TINY_VISION, *width, *SHAPES, f"vision.path={path}", runs=runs)
        assert failed.exit_code == 2 and message in " ".join(failed.output.split()), failed.output


def test_a_resumed_run_reloads_the_pretrained_tower_instead_of_pretraining_again(text_runs):
    from safetensors.torch import load_file

    from slmctl.train import add_vision as stage

    runs, made = text_runs
    overrides = [f"source={made['encdec']}", *TINY_VISION, *SHAPES, "vision.pretrain=contrastive", "stage0.steps=3",
                 "stage2.steps=4", "checkpoint_every=2", "validation_every=2"]
    cfg = compose("add-vision", overrides)
    whole = train_run(runs, "add-vision", overrides, name="whole0")
    killed = Run.create(runs, "add-vision", "killed0", cfg, argv=["test"])
    with pytest.raises(SystemExit):
        stage.run(cfg, killed, callbacks=[Crash(3, fit=2)])
    resumed = Run.open(killed.path)
    resumed.resume()
    stage.run(compose("add-vision", [*overrides, f"resume={killed.path}"]), resumed)
    stages = json.loads((killed.path / "stages.json").read_text())
    assert stages[0]["stage"] == 0 and stages[0]["reloaded"] is True
    for name in ("model.safetensors", "vision.safetensors"):
        a, b = load_file(whole.model_dir / name), load_file(killed.model_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_quickstarts_stage_0_schedule_trains_the_tower_on_a_tiny_budget(text_runs):
    """The quickstart recipe's stage 0 (its objective, scenes and learning rate, read from the recipe)
    on a tiny tower and 40 steps: its validation loss falls and its count probe of each shape kind rises."""
    import yaml

    from conftest import REPO

    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    [vision] = [step for step in recipe["steps"] if step["name"] == "vision"]
    schedule = [o for o in vision["overrides"] if o.startswith(("vision.pretrain=", "data.max_shapes=", "stage0.lr="))]
    assert "vision.pretrain=layout" in schedule and "data.max_shapes=1" in schedule
    runs, made = text_runs
    result = cli("add-vision", str(made["encdec"]), *TINY_VISION, *schedule, "stage0.steps=40", "data.train_examples=64",
                 "data.validation_examples=16", "stage1.steps=0", "stage2.steps=0", runs=runs)
    assert result.exit_code == 0, result.output
    [stage0, *_] = json.loads((newest_run(runs, "add-vision") / "stages.json").read_text())
    assert stage0["validation_loss_after"] < 0.7 * stage0["validation_loss_before"]
    kinds = ("circles", "squares", "triangles")  # how many of each shape: what the demo's shape and count questions need

    def probe(accuracy):
        return sum(accuracy[k] for k in kinds) / len(kinds)

    assert probe(stage0["count_accuracy_after"]) > probe(stage0["count_accuracy_before"]) + 0.2
    assert stage0["seconds"] > 0 and stage0["scenes"] == 64 and stage0["max_shapes"] == 1
