"""Supervised tower pretraining on shape scenes: count what the scene holds (`vision.pretrain=counts`).

A tower pretrained on captions learned colour and nothing a linear probe could count shapes with
(docs/vision.md: captions differ in colour first, so colour alone matched them). Here the tower has
to see shapes: it learns to count the scene's shapes, each kind, and each colour of each kind
("red circles": which colour goes with which shape), each count a class 0..`max_count`.

The counts are asked of EVERY position of the tower's feature map (one linear head shared by all
positions, the mean cross-entropy over positions and counts), not of a pooled summary: the language
model reads the image as separate tokens, and a pooled summary it would have to learn to form
itself. Trained this way the language model answered count and shape questions well above chance
where a pooled head (same tower, same steps) left it at chance (docs/vision.md).

With `layout=True` (`vision.pretrain=layout`) every position also names what covers it (a second
linear head: background or one of the 18 coloured shapes, `slmctl.data.shapes.layout`): a colour
question then needs one image token to carry its shape's colour and kind, not six counts all right.

    counting = CountingTower(tower, max_count=4)
    loss = counting(pixels, counts)                 # [N, 3, S, S], [N, len(COUNTED)] integer counts
    mapped = CountingTower(tower, max_count=4, layout=True)
    loss = mapped(pixels, counts, layout)           # + layout [N, g, g]: 0 background, 1 + NAMED index
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmctl.data.shapes import COLORS, NAMED, SHAPES

KINDS_COUNTED = ("shapes", "circles", "squares", "triangles")
COUNTED = KINDS_COUNTED + tuple(f"{color} {kind}s" for color in COLORS for kind in SHAPES)  # slmctl.data.shapes.counts' order


def pooled_features(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 2 * width]: the tower's feature map, mean- and max-pooled over positions (what probes read)."""
    features = tower(pixels).flatten(1, 2)
    return torch.cat([features.mean(1), features.amax(1)], dim=1)


class CountingTower(nn.Module):
    """The vision tower and a linear head giving, at every position, per counted thing, logits over
    0..max_count (and with `layout`, a second head: logits over what covers the position)."""

    def __init__(self, tower: nn.Module, max_count: int = 4, targets: int = len(COUNTED), layout: bool = False):
        super().__init__()
        self.tower, self.targets, self.classes = tower, targets, max_count + 1
        self.head = nn.Linear(tower.width, targets * self.classes)
        self.here = nn.Linear(tower.width, 1 + len(NAMED)) if layout else None

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, positions, width]"""
        return self.tower(pixels).flatten(1, 2)

    def position_logits(self, pixels: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """[N, positions, targets, max_count + 1]"""
        features = self.features(pixels) if features is None else features
        return self.head(features).view(len(features), features.shape[1], self.targets, self.classes)

    def layout_logits(self, pixels: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """[N, positions, 1 + len(NAMED)]: what covers each position (positions row-major)."""
        return self.here(self.features(pixels) if features is None else features)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, targets, max_count + 1]: the positions' logits averaged."""
        return self.position_logits(pixels).mean(1)

    def forward(self, pixels: torch.Tensor, counts: torch.Tensor, layout: torch.Tensor | None = None) -> torch.Tensor:
        features = self.features(pixels)
        logits = self.position_logits(pixels, features)
        targets = counts[:, None].expand(-1, logits.shape[1], -1)
        loss = F.cross_entropy(logits.flatten(0, 2), targets.flatten())
        if layout is not None:
            loss = loss + F.cross_entropy(self.layout_logits(pixels, features).flatten(0, 1), layout.flatten())
        return loss

    @torch.no_grad()
    def accuracy(self, pixels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[targets] the fraction of scenes whose count is predicted exactly, per counted thing."""
        return (self.logits(pixels).argmax(-1) == counts).float().mean(0)

    @torch.no_grad()
    def layout_accuracy(self, pixels: torch.Tensor, layout: torch.Tensor) -> tuple[int, int]:
        """(right, total) over the positions a shape covers: is its colour and kind named?"""
        covered = layout.flatten(1) > 0
        named = self.layout_logits(pixels).argmax(-1) == layout.flatten(1)
        return int((named & covered).sum()), int(covered.sum())
