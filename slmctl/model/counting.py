"""Supervised tower pretraining on shape scenes: count each kind of shape (`vision.pretrain=counts`).

A tower pretrained on captions learned colour and nothing a linear probe could count shapes with
(docs/vision.md: captions differ in colour first, so colour alone matched them). Here the tower has
to see shapes: from its pooled global-view features (mean and max over positions, as the probes
read them), one linear classifier per count (all shapes, circles, squares, triangles; each 0 to
`max_count`), trained with the mean cross-entropy of the four.

    counting = CountingTower(tower, max_count=4)
    loss = counting(pixels, counts)                 # [N, 3, S, S], [N, 4] integer counts
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

COUNTED = ("shapes", "circles", "squares", "triangles")  # the order of slmctl.data.shapes.counts


def pooled_features(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 2 * width]: the tower's feature map, mean- and max-pooled over positions."""
    features = tower(pixels).flatten(1, 2)
    return torch.cat([features.mean(1), features.amax(1)], dim=1)


class CountingTower(nn.Module):
    """The vision tower and a linear head giving, per counted kind, logits over 0..max_count."""

    def __init__(self, tower: nn.Module, max_count: int = 4, targets: int = len(COUNTED)):
        super().__init__()
        self.tower, self.targets, self.classes = tower, targets, max_count + 1
        self.head = nn.Linear(2 * tower.width, targets * self.classes)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, targets, max_count + 1]"""
        return self.head(pooled_features(self.tower, pixels)).view(len(pixels), self.targets, self.classes)

    def forward(self, pixels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(pixels).flatten(0, 1), counts.flatten())

    @torch.no_grad()
    def accuracy(self, pixels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[targets] the fraction of scenes whose count is predicted exactly, per counted kind."""
        return (self.logits(pixels).argmax(-1) == counts).float().mean(0)
