"""Does a vision model's tower encode what shape questions ask? Linear probes on shape scenes.

    python -m slmctl.eval.tower_probe runs/add-vision/<run> [--train 2000 --test 500]

When a vision model answers colour questions but not shape or count ones (docs/vision.md), either
its tower does not encode shapes and counts, or the language model does not read them. This tells
the two apart: for each scene, the tower's global-view feature map (what the compressor reads) is
pooled (mean and max over positions) and a linear probe (multinomial logistic regression) is
trained on train-split scenes to predict the number of shapes and each kind's count, then scored on
test-split scenes, beside the same probe on a freshly initialised tower of the same configuration
(what the architecture gives without training) and the most frequent answer's rate. Prints one
table; `--json` writes it.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from slmctl.data.shapes import ShapeCounts
from slmctl.model.counting import COUNTED, KINDS_COUNTED, pooled_features


@torch.no_grad()
def scene_features(tower, scenes: ShapeCounts, batch: int = 64) -> tuple[torch.Tensor, list[dict]]:
    """([n, 2 * width] mean- and max-pooled global-view features, targets per scene)."""
    from slmctl.model.anyres import tile_image

    features, labels = [], []
    tower.eval()
    for start in range(0, len(scenes), batch):
        rows = [scenes[i] for i in range(start, min(start + batch, len(scenes)))]
        pixels = torch.cat([tile_image(image, (1, 1), tower.image_size)[1] for image, _ in rows])
        features.append(pooled_features(tower, pixels.to(next(tower.parameters()).dtype)).float())
        labels += [dict(zip(COUNTED, counted)) for _, counted in rows]
    return torch.cat(features), labels


def probe_accuracy(train_x, train_y, test_x, test_y, steps: int = 300, weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Test accuracy of a multinomial logistic regression fitted on standardised train features."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    probe = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return float((probe(test_x).argmax(1) == test_y).float().mean())


def probe_towers(towers: dict, max_shapes: int = 4, n_train: int = 2000, n_test: int = 500, seed: int = 0) -> dict:
    """{target: {tower label: test accuracy, "majority": most frequent answer's rate}}."""
    table: dict[str, dict] = {}
    for label, tower in towers.items():
        train_x, train_labels = scene_features(tower, ShapeCounts(seed, "train", n_train, max_shapes))
        test_x, test_labels = scene_features(tower, ShapeCounts(seed, "test", n_test, max_shapes))
        for target in KINDS_COUNTED:  # what count questions ask
            train_y = torch.tensor([row[target] for row in train_labels])
            test_y = torch.tensor([row[target] for row in test_labels])
            table.setdefault(target, {})[label] = probe_accuracy(train_x, train_y, test_x, test_y)
            table[target]["majority"] = Counter(test_y.tolist()).most_common(1)[0][1] / len(test_y)
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m slmctl.eval.tower_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a vision model (an add-vision run or its model directory)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--max-shapes", type=int, default=4)
    parser.add_argument("--train", type=int, default=2000, help="train-split scenes the probes learn from")
    parser.add_argument("--test", type=int, default=500, help="test-split scenes they are scored on")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from slmctl.errors import ConfigError
    from slmctl.model.vision import build_tower
    from slmctl.model.vlm import VisionEncoderDecoderLM
    from slmctl.refs import resolve

    model = resolve(args.model, args.runs_dir, purpose="the tower probe").load_torch()
    if not isinstance(model, VisionEncoderDecoderLM):
        raise ConfigError(f"{args.model} has no vision tower (make one with `slmctl add-vision`)")
    torch.manual_seed(0)
    fresh = build_tower(model.vision_config, pretrained=False)
    table = probe_towers({"trained tower": model.tower, "fresh tower": fresh}, args.max_shapes, args.train, args.test)
    shown = Table(title=f"linear probes of pooled global-view features: test accuracy ({args.test} scenes)")
    for column in ("target", "trained tower", "fresh tower", "majority"):
        shown.add_column(column)
    for target, row in table.items():
        shown.add_row(target, *(f"{row[c]:.3f}" for c in ("trained tower", "fresh tower", "majority")))
    Console().print(shown)
    if args.json:
        from slmctl.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"model": str(args.model), "probes": table}, indent=1))
    return table


if __name__ == "__main__":
    main()
