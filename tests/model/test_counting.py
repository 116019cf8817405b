"""Supervised tower pretraining: the counting head learns the scenes' counts from every position of the tower,
and the layout head what covers each position."""

import pytest
import torch
from conftest import fit, scene_pixels

from slmctl.data.shapes import NAMED, SHAPES, Shape, ShapeCounts, ShapeLayouts, ShapeScenes, counts, layout
from slmctl.model.counting import COUNTED, CountingTower
from slmctl.model.vision import VisionConfig, build_tower


def tiny_batch(n: int = 12, grid: int = 4):
    """(pixels [n, 3, 32, 32], counts [n, len(COUNTED)], layouts [n, grid, grid]) of n training scenes."""
    data = ShapeLayouts(seed=0, split="train", n=n, grid=grid)
    rows = [data[i] for i in range(n)]
    return (scene_pixels([image for image, _ in rows]), torch.tensor([c for _, (c, _) in rows]),
            torch.tensor([m for _, (_, m) in rows]))


def test_counts_are_the_number_of_shapes_then_each_kind_in_the_order_the_head_predicts():
    scenes = ShapeScenes(seed=0, max_shapes=4)
    shapes = scenes.scene("train", 3)[2]
    assert list(counts(shapes)) == list(COUNTED)
    assert counts(shapes)["shapes"] == len(shapes) == sum(counts(shapes)[f"{kind}s"] for kind in SHAPES)
    assert ShapeCounts(seed=0, split="train", n=5)[3][1] == list(counts(shapes).values())


def test_on_a_tiny_batch_the_loss_falls_and_the_counts_are_learned():
    torch.manual_seed(0)
    tower = build_tower(VisionConfig(tower="vit", image_size=32, patch_size=8, width=32, layers=2, heads=2))
    pixels, targets, _ = tiny_batch()
    counting = CountingTower(tower, max_count=4)
    # the loss asks every position on its own for every count (not their average)
    per_position = counting.position_logits(pixels)
    asked = torch.nn.functional.cross_entropy(per_position.flatten(0, 2),
                                              targets[:, None].expand(-1, per_position.shape[1], -1).flatten())
    assert counting(pixels, targets).item() == pytest.approx(asked.item(), rel=1e-5)
    first, last = fit(counting, pixels, targets)
    assert last < 0.3 * first
    assert counting.accuracy(pixels, targets).min() == 1.0  # every count of every scene, on the batch it saw
    # and every position of the feature map on its own: the language model reads positions, not a summary
    assert (counting.position_logits(pixels).argmax(-1) == targets[:, None]).float().mean() > 0.95


def test_the_layout_names_the_shape_covering_each_cell_of_the_squashed_scene():
    # a 400 x 200 scene on a 4 x 4 grid: cells are 100 x 50 pixels
    red_circle = Shape("circle", "red", x=150, y=75, radius=40)  # covers the cell (row 1, column 1) and spills over
    blue_square = Shape("square", "blue", x=350, y=25, radius=20)  # inside the top right cell (row 0, column 3)
    cells = layout((400, 200), [red_circle, blue_square], grid=4)
    assert cells[1][1] == 1 + NAMED.index("red circle") and cells[0][3] == 1 + NAMED.index("blue square")
    assert cells[3][0] == cells[3][3] == cells[0][0] == 0 and sum(v > 0 for row in cells for v in row) < 6
    assert layout((400, 200), [], grid=4) == [[0] * 4] * 4
    # the scenes the tower learns from: every shape names at least one cell of the 8 x 8 feature map
    scenes = ShapeScenes(seed=0, max_shapes=4)
    for index in range(40):
        size, _, shapes = scenes.scene("train", index)
        named = {v for row in layout(size, shapes, grid=8) for v in row}
        assert {1 + NAMED.index(s.name) for s in shapes} <= named
    image, (scene_counts, cells) = ShapeLayouts(seed=0, split="train", n=5, grid=8)[3]
    assert scene_counts == list(counts(scenes.scene("train", 3)[2]).values()) and len(cells) == len(cells[0]) == 8


def test_with_a_layout_head_the_tower_learns_what_covers_each_position():
    torch.manual_seed(0)
    tower = build_tower(VisionConfig(tower="vit", image_size=32, patch_size=8, width=32, layers=2, heads=2))
    pixels, targets, cells = tiny_batch()
    mapped = CountingTower(tower, max_count=4, layout=True)
    # the loss is the counts' plus the positions' cross-entropy over what covers them
    counted = CountingTower(tower, max_count=4)
    counted.head = mapped.head
    named = torch.nn.functional.cross_entropy(mapped.layout_logits(pixels).flatten(0, 1), cells.flatten())
    assert mapped(pixels, targets, cells).item() == pytest.approx(counted(pixels, targets).item() + named.item(), rel=1e-5)
    right, covered = mapped.layout_accuracy(pixels, cells)
    assert 0 < covered < cells.numel()
    first, last = fit(mapped, pixels, targets, cells)
    assert last < 0.3 * first
    right_after, _ = mapped.layout_accuracy(pixels, cells)
    assert right_after == covered > right  # every covered position names its coloured shape, on the batch it saw
