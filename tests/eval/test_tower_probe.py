"""The tower probe tells whether a tower's pooled features encode shape counts: a linear probe
finds a signal that is there, finds none in noise, and runs end to end on a ViT."""

import torch

from slmctl.data.shapes import Shape
from slmctl.data.shapes import counts as targets
from slmctl.eval.tower_probe import probe_accuracy, probe_towers
from slmctl.model.vision import VisionConfig, build_tower


def test_targets_are_the_number_of_shapes_each_kinds_and_each_coloured_kinds_count():
    shapes = [Shape("circle", "red", 1, 1, 1), Shape("circle", "blue", 5, 1, 1), Shape("triangle", "red", 9, 1, 1)]
    counted = targets(shapes)
    assert {k: counted[k] for k in ("shapes", "circles", "squares", "triangles")} == {"shapes": 3, "circles": 2, "squares": 0,
                                                                                     "triangles": 1}
    assert {k: v for k, v in counted.items() if " " in k and v} == {"red circles": 1, "blue circles": 1, "red triangles": 1}
    assert len(counted) == 4 + 6 * 3


def test_a_linear_probe_finds_a_linear_signal_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=generator)
    y = (x @ torch.randn(16, 3, generator=generator)).argmax(1)  # three linearly separable classes
    assert probe_accuracy(x[:400], y[:400], x[400:], y[400:]) > 0.9
    noise = torch.randn(300, 64, generator=generator)  # few scenes, many features: a probe could memorise
    labels = torch.randint(0, 3, (300,), generator=generator)
    majority = torch.bincount(labels[100:]).max().item() / 200
    assert probe_accuracy(noise[:100], labels[:100], noise[100:], labels[100:]) < majority + 0.1  # scored on held-out


def test_probes_of_a_vit_on_shape_scenes_report_every_target_beside_the_majority_rate():
    torch.manual_seed(0)
    tower = build_tower(VisionConfig(tower="vit", image_size=32, patch_size=8, width=16, layers=1, heads=2))
    table = probe_towers({"tiny": tower}, max_shapes=4, n_train=40, n_test=20)
    assert set(table) == {"shapes", "circles", "squares", "triangles"}
    for row in table.values():
        assert 0.0 <= row["tiny"] <= 1.0 and 0.25 <= row["majority"] <= 1.0
