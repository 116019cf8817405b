"""Supervised tower pretraining: the counting head learns the scenes' counts from every position of the tower."""

import numpy as np
import pytest
import torch

from slmctl.data.shapes import SHAPES, ShapeCounts, ShapeScenes, counts
from slmctl.model.counting import COUNTED, CountingTower
from slmctl.model.vision import VisionConfig, build_tower


def test_counts_are_the_number_of_shapes_then_each_kind_in_the_order_the_head_predicts():
    scenes = ShapeScenes(seed=0, max_shapes=4)
    shapes = scenes.scene("train", 3)[2]
    assert list(counts(shapes)) == list(COUNTED)
    assert counts(shapes)["shapes"] == len(shapes) == sum(counts(shapes)[f"{kind}s"] for kind in SHAPES)
    assert ShapeCounts(seed=0, split="train", n=5)[3][1] == list(counts(shapes).values())


def test_on_a_tiny_batch_the_loss_falls_and_the_counts_are_learned():
    torch.manual_seed(0)
    tower = build_tower(VisionConfig(tower="vit", image_size=32, patch_size=8, width=32, layers=2, heads=2))
    data = ShapeCounts(seed=0, split="train", n=12)
    pixels = torch.stack([torch.from_numpy(np.asarray(data[i][0].convert("RGB").resize((32, 32)), dtype=np.float32))
                          .permute(2, 0, 1) / 255 for i in range(12)])
    targets = torch.tensor([data[i][1] for i in range(12)])
    counting = CountingTower(tower, max_count=4)
    # the loss asks every position on its own for every count (not their average)
    per_position = counting.position_logits(pixels)
    asked = torch.nn.functional.cross_entropy(per_position.flatten(0, 2),
                                              targets[:, None].expand(-1, per_position.shape[1], -1).flatten())
    assert counting(pixels, targets).item() == pytest.approx(asked.item(), rel=1e-5)
    optimizer = torch.optim.AdamW(counting.parameters(), lr=3e-3)
    first = counting(pixels, targets).item()
    for _ in range(150):
        optimizer.zero_grad()
        loss = counting(pixels, targets)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * first
    assert counting.accuracy(pixels, targets).min() == 1.0  # every count of every scene, on the batch it saw
    # and every position of the feature map on its own: the language model reads positions, not a summary
    assert (counting.position_logits(pixels).argmax(-1) == targets[:, None]).float().mean() > 0.95
