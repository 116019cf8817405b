"""slmctl add-vision: a text encoder-decoder learns to read images, stage by stage."""

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from slmctl.cli import app
from slmctl.config import compose
from slmctl.model import load_model
from slmctl.model.vlm import VisionEncoderDecoderLM
from slmctl.runs import Run

TINY_VISION = ["vision.image_size=32", "vision.patch_size=8", "vision.width=32", "vision.layers=2", "vision.heads=2",
               "vision.max_tokens_per_image=16", "batch_size=4", "validation_every=2", "stage1.steps=3", "stage2.steps=3",
               "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
SHAPES = ["data.train_examples=24", "data.validation_examples=6"]


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """A tiny trained encoder-decoder and a tiny decoder-only model (pretrain runs)."""
    from slmctl.train import pretrain

    runs = tmp_path_factory.mktemp("runs")
    made = {}
    for name, model in (("encdec", "tiny"), ("deconly", "deconly-tiny")):
        cfg = compose("pretrain", ["objective=seq2seq", f"model={model}", "tokenizer.vocab_size=400", "data.n_people=200",
                                   "data.train_examples=100", "data.validation_examples=8", "data.min_facts=1",
                                   "data.max_facts=2", "batch_size=8", "max_source_len=64", "max_target_len=8",
                                   "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false"])
        run = Run.create(runs, "pretrain", name, cfg, argv=["test"])
        pretrain.run(cfg, run)
        made[name] = run.path
    return runs, made


def add_vision(runs, *args):
    result = CliRunner().invoke(app, ["add-vision", *args, "--runs-dir", str(runs)])
    stage_dir = runs / "add-vision"
    found = sorted(p for p in stage_dir.glob("*-*") if p.is_dir() and p.name != "latest") if stage_dir.exists() else []
    return result, (found[-1] if found else None)


def test_two_stages_train_the_right_parts_and_write_a_loadable_vision_model(text_runs, tmp_path):
    runs, made = text_runs
    result, run = add_vision(runs, str(made["encdec"]), *TINY_VISION, *SHAPES)
    assert result.exit_code == 0, result.output
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
    generated = CliRunner().invoke(app, ["generate", str(run), "prompt=<image>\nWhat color is the circle?",
                                         "--image", str(_save(image, tmp_path / "x.png")), "--max-new-tokens", "4"])
    assert generated.exit_code == 0, generated.output


def _save(image, path):
    image.save(path)
    return path


def test_stage_one_leaves_the_tower_and_the_language_model_untouched(text_runs):
    runs, made = text_runs
    result, run = add_vision(runs, str(made["encdec"]), *TINY_VISION, *SHAPES, "stage2.steps=0", "--name", "align")
    assert result.exit_code == 0, result.output
    trained, original = load_model(run / "model"), load_model(made["encdec"])
    for (name, a), b in zip(trained.text.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    fresh = VisionEncoderDecoderLM(original, trained.vision_config, trained.image_token_id)
    assert all(torch.equal(a, b) for a, b in zip(trained.tower.state_dict().values(), fresh.tower.state_dict().values()))
    assert not torch.equal(trained.projector.net[0].weight, fresh.projector.net[0].weight)


def test_bad_inputs_are_one_line_errors(text_runs, tmp_path):
    runs, made = text_runs
    result, _ = add_vision(runs, str(made["deconly"]), *TINY_VISION, *SHAPES)
    assert result.exit_code == 2 and "decoder-only model; add-vision feeds images to an encoder" in " ".join(result.output.split())
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    rows = [{"image": "ok.png", "prompt": "<image>\nWhat?", "answer": "x"}] * 6 + [{"image": "bad.png", "prompt": "<image>", "answer": "y"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result, _ = add_vision(runs, str(made["encdec"]), *TINY_VISION, "data=images", f"data.train={tmp_path / 'train.jsonl'}")
    assert result.exit_code == 2 and "train.jsonl:7: image" in " ".join(result.output.split()) and "Traceback" not in result.output
    result, run = add_vision(runs, str(made["encdec"]), *TINY_VISION, "data=images", f"data.train={tmp_path / 'train.jsonl'}",
                             "data.skip_bad=true", "data.validation_fraction=0.3")
    assert result.exit_code == 0, result.output
    assert "1 rows skipped for unreadable images" in (run / "log.txt").read_text()
