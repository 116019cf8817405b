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

    counting = CountingTower(tower, max_count=4)
    loss = counting(pixels, counts)                 # [N, 3, S, S], [N, len(COUNTED)] integer counts
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmctl.data.shapes import COLORS, SHAPES

KINDS_COUNTED = ("shapes", "circles", "squares", "triangles")
COUNTED = KINDS_COUNTED + tuple(f"{color} {kind}s" for color in COLORS for kind in SHAPES)  # slmctl.data.shapes.counts' order


def pooled_features(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 2 * width]: the tower's feature map, mean- and max-pooled over positions (what probes read)."""
    features = tower(pixels).flatten(1, 2)
    return torch.cat([features.mean(1), features.amax(1)], dim=1)


class CountingTower(nn.Module):
    """The vision tower and a linear head giving, at every position, per counted thing, logits over
    0..max_count."""

    def __init__(self, tower: nn.Module, max_count: int = 4, targets: int = len(COUNTED)):
        super().__init__()
        self.tower, self.targets, self.classes = tower, targets, max_count + 1
        self.head = nn.Linear(tower.width, targets * self.classes)

    def position_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, positions, targets, max_count + 1]"""
        features = self.tower(pixels).flatten(1, 2)
        return self.head(features).view(len(pixels), features.shape[1], self.targets, self.classes)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, targets, max_count + 1]: the positions' logits averaged."""
        return self.position_logits(pixels).mean(1)

    def forward(self, pixels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        logits = self.position_logits(pixels)
        targets = counts[:, None].expand(-1, logits.shape[1], -1)
        return F.cross_entropy(logits.flatten(0, 2), targets.flatten())

    @torch.no_grad()
    def accuracy(self, pixels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[targets] the fraction of scenes whose count is predicted exactly, per counted thing."""
        return (self.logits(pixels).argmax(-1) == counts).float().mean(0)
