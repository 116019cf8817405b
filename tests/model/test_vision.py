"""Vision pieces: any-resolution tiling, token compression, placeholder splicing, towers, shape scenes."""

import pytest
import torch
from PIL import Image

from slmctl.data.shapes import ShapeScenes, chance
from slmctl.model import build_model
from slmctl.model.anyres import assemble, best_grid, tile_image
from slmctl.model.compress import TokenCompressor, cap
from slmctl.model.vision import VisionConfig
from slmctl.model.vlm import VisionEncoderDecoderLM

GRIDS = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1))


@pytest.mark.parametrize("size, grid", [((640, 200), (3, 1)), ((200, 90), (2, 1)), ((200, 640), (1, 3)),
                                        ((90, 200), (1, 2)), ((400, 220), (2, 2)), ((300, 300), (2, 2)), ((60, 60), (1, 1))])
def test_the_grid_fits_the_aspect_ratio(size, grid):
    assert best_grid(size, GRIDS, 112) == grid


def test_tiles_and_reassembly_give_the_image_shaped_feature_map():
    image = Image.new("RGB", (200, 90), (255, 0, 0))
    grid = best_grid(image.size, GRIDS, 112)
    tiles, global_view = tile_image(image, grid, 112)
    assert tiles.shape == (2, 3, 112, 112) and global_view.shape == (1, 3, 112, 112)
    assert float(tiles[0, 0].max()) == 1.0 and float(tiles[0, 1].max()) == 0.0  # red content, black padding
    assert float(tiles[0, :, :5].sum()) == 0.0  # the padded band on top (224x101 content on a 224x112 canvas)
    features = torch.arange(2 * 14 * 14 * 3, dtype=torch.float32).reshape(2, 14, 14, 3)
    full = assemble(features, grid, image.size)
    assert full.shape == (13, 28, 3)  # 2 tiles side by side, padding rows removed (90/200 of 28 ~ 13)
    assert torch.equal(assemble(features, grid, (224, 112))[:, :14], features[0])  # tile 0 is the left half


@pytest.mark.parametrize("kind", ["avgpool", "ldpv2"])
def test_compression_reduces_tokens_by_the_factor_squared_and_respects_the_cap(kind):
    compressor = TokenCompressor(kind, 2, channels=8)
    features = torch.randn(16, 12, 8)
    pooled = compressor(features)
    assert pooled.shape == (8, 6, 8) and pooled.shape[0] * pooled.shape[1] * 4 == 16 * 12
    assert torch.allclose(pooled[0, 0], features[:2, :2].mean(dim=(0, 1)), atol=1e-6)  # ldpv2 starts as the average
    assert TokenCompressor(kind, 2, channels=8)(torch.randn(5, 7, 8)).shape[:2] == (3, 4)  # border repeated
    capped = cap(pooled, 20)
    assert capped.shape[0] * capped.shape[1] <= 20 and capped.shape[0] > capped.shape[1]
    assert compressor(features[None].repeat(3, 1, 1, 1)).shape == (3, 8, 6, 8)  # a batch of crops
    assert TokenCompressor("none", 2, channels=8)(features).shape == features.shape


def tiny_vlm(**vision):
    text = build_model("tiny", seed=0).eval()
    cfg = VisionConfig(image_size=32, patch_size=8, width=16, layers=2, heads=2, **vision)
    return VisionEncoderDecoderLM(text, cfg, image_token_id=3).eval()


def test_image_tokens_replace_each_placeholder_in_order():
    vlm = tiny_vlm(anyres=False, compress="none")
    a, b = torch.randn(5, 64), torch.randn(3, 64)  # d_model of tiny is 64
    ids = torch.tensor([[10, 3, 11, 12, 3, 13], [20, 21, 3, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    c = torch.randn(4, 64)
    embeds, new_mask = vlm.splice(ids, mask, [[a, b], [c]])
    E = vlm.text.embed.weight
    assert embeds.shape == (2, 4 + 5 + 3, 64) and new_mask[0].all() and new_mask[1].sum() == 2 + 4
    assert torch.equal(embeds[0, 0], E[10]) and torch.equal(embeds[0, 1:6], a) and torch.equal(embeds[0, 6], E[11])
    assert torch.equal(embeds[0, 7], E[12]) and torch.equal(embeds[0, 8:11], b) and torch.equal(embeds[0, 11], E[13])
    assert torch.equal(embeds[1, :2], E[[20, 21]]) and torch.equal(embeds[1, 2:6], c) and not embeds[1, 6:].any()
    with pytest.raises(ValueError, match="prompt 1 has 1 <image> placeholder"):
        vlm.splice(ids, mask, [[a, b], []])


def test_generation_with_images_and_token_counts():
    vlm = tiny_vlm(anyres=True, compress="avgpool", compress_factor=2, max_tokens_per_image=40)
    wide, square = Image.new("RGB", (120, 40), (0, 0, 255)), Image.new("RGB", (40, 40), (0, 255, 0))
    tokens = vlm.image_tokens([wide, square])
    # 40x40 keeps most resolution on the 2x2 grid (64x64): global 4x4 map -> 2x2, high-res 8x8 map -> 4x4
    assert tokens[1].shape == (2 * 2 + 4 * 4, 64)
    assert tokens[0].shape == (2 * 2 + 2 * 6, 64)  # 120x40 on the 3x1 grid: a 4x12 map -> 2x6
    capped = tiny_vlm(anyres=True, compress="avgpool", compress_factor=2, max_tokens_per_image=10)
    assert capped.image_tokens([wide])[0].shape[0] <= 10
    ids = torch.tensor([[3, 10, 11], [12, 3, 3]])
    new = vlm.generate(ids, images=[[wide], [square, wide]], max_new_tokens=5)
    assert new.shape == (2, 5)
    alone = vlm.generate(ids[1:], images=[[square, wide]], max_new_tokens=5)
    assert torch.equal(alone, new[1:])


def test_a_hugging_face_clip_tower_loads_from_a_directory(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    vlm = tiny_vlm(tower="clip", path=str(tmp_path / "clip"), anyres=False, compress="none")
    assert vlm.vision_config.feature_width == 32 and vlm.tower.image_size == 32
    tokens = vlm.image_tokens([Image.new("RGB", (50, 30))])
    assert tokens[0].shape == (16, 64)  # 4x4 patches, class token dropped, projected to d_model


def test_shape_scenes_are_seeded_and_their_answers_match_the_scene():
    scenes = ShapeScenes(seed=0)
    first, again = scenes.example("test", 3), ShapeScenes(seed=0).example("test", 3)
    assert first["prompt"] == again["prompt"] and first["image"].tobytes() == again["image"].tobytes()
    assert first["prompt"].startswith("<image>\n")
    sizes, kinds = set(), set()
    for i in range(60):
        size, _, shapes = scenes.scene("train", i)
        kind, question, answer = scenes.question("train", i, shapes)
        sizes.add(size[0] / size[1] > 1.2 and "wide" or size[1] / size[0] > 1.2 and "tall" or "square")
        kinds.add(kind)
        if kind == "count":
            asked = question.split("How many ")[1].split("s are")[0]
            assert answer == str(sum(s.kind == asked for s in shapes))
        elif kind == "colour":
            asked = question.split("the ")[1].rstrip("?")
            assert [s.color for s in shapes if s.kind == asked] == [answer]
        elif kind == "shape":
            asked = question.split("the ")[1].split(" one")[0]
            assert [s.kind for s in shapes if s.color == asked] == [answer]
    assert sizes == {"wide", "tall", "square"} and kinds == {"colour", "shape", "count", "left"}
    assert scenes.example("train", 0)["id"] != scenes.example("test", 0)["id"]
    baseline = chance(scenes.examples("validation", 200))
    assert 0.1 < baseline["overall"] < 0.6 and set(baseline) == {"colour", "shape", "count", "left", "overall"}


def test_count_questions_ask_about_present_and_absent_shapes_alike():
    """With one shape per scene, "0" must not be the cheap answer: a model that never looks at
    the shape gets half the count questions right, not two thirds."""
    scenes = ShapeScenes(seed=0, max_shapes=1)
    answers = [q["answer"] for q in scenes.questions("train", 600) if q["kind"] == "count"]
    assert set(answers) == {"0", "1"} and 0.4 < answers.count("0") / len(answers) < 0.6


def test_fewer_shapes_are_drawn_bigger():
    lone = [s.radius / min(size) for size, _, shapes in (ShapeScenes(seed=0, max_shapes=1).scene("train", i) for i in range(40))
            for s in shapes]
    crowded = [s.radius / min(size) for size, _, shapes in (ShapeScenes(seed=0, max_shapes=4).scene("train", i) for i in range(80))
               for s in shapes if len(shapes) == 4]
    assert 0.14 <= min(lone) and max(lone) <= 0.32 and 0.07 <= min(crowded) and max(crowded) <= 0.16


def test_image_jsonl_errors_name_the_file_and_bad_images_can_be_skipped(tmp_path):
    from slmctl.data.images import load_jsonl
    from slmctl.data.sources import DataError

    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    rows = ['{"image": "ok.png", "prompt": "<image>\\nWhat?", "answer": "a"}',
            '{"image": "broken.png", "prompt": "<image>\\nWhat?", "answer": "b"}']
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: image .*broken.png cannot be read"):
        load_jsonl(tmp_path / "data.jsonl")
    examples, skipped = load_jsonl(tmp_path / "data.jsonl", skip_bad=True)
    assert skipped == 1 and len(examples) == 1 and examples[0].images[0].size == (20, 10)
    (tmp_path / "bad.jsonl").write_text(rows[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "escape.jsonl").write_text('{"image": "../x.png", "prompt": "<image>", "answer": "a"}\n')
    with pytest.raises(DataError, match="leaves the data directory"):
        load_jsonl(tmp_path / "escape.jsonl", skip_bad=True)
