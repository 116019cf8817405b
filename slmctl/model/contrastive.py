"""Contrastive image-caption pretraining of a vision tower (SigLIP's sigmoid loss).

A tower trained from scratch through the language model learns colours (one pixel says it)
but not shapes or counts (docs/vision.md); pretraining it first to tell which caption belongs
to which image, as CLIP and SigLIP do, gives it features for those before the language model
ever reads them. Beside the tower: a linear head over its mean-pooled patch features, a small
transformer text encoder (word order matters: "a red circle, a blue square" is not "a blue
circle, a red square"), and SigLIP's learned temperature and bias.

    towers = ContrastiveTowers(tower, vocab_size=1024)
    loss = towers(pixels, caption_ids, caption_mask)       # [N, 3, S, S], [N, L], [N, L]
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP (Zhai et al. 2023): every (image i, caption j) pair of the batch is its own binary
    match / no-match problem, -sum log sigmoid(z_ij (t x_i.y_j + b)) / N with z = +1 on the
    diagonal and -1 elsewhere; `image`, `text` [N, D] are L2-normalised."""
    logits = image @ text.T * log_scale.exp() + bias
    signs = 2 * torch.eye(len(image), device=image.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(image)


class ContrastiveTowers(nn.Module):
    """The vision tower + image head, a text encoder + head, SigLIP's temperature and bias."""

    def __init__(self, tower: nn.Module, vocab_size: int, dim: int = 128, max_len: int = 64, pad_id: int = 0):
        super().__init__()
        self.tower, self.pad_id = tower, pad_id
        self.image_head = nn.Linear(tower.width, dim)
        self.embed = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.zeros(1, max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.text_encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.text_head = nn.Linear(dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # SigLIP's initial temperature and bias
        self.bias = nn.Parameter(torch.tensor(-10.0))

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.tower(pixels)  # [N, g, g, width]
        return F.normalize(self.image_head(features.flatten(1, 2).mean(dim=1)), dim=-1)

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.positions[:, : ids.shape[1]]
        x = self.text_encoder(x, src_key_padding_mask=~mask.bool())
        pooled = (x * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_head(pooled), dim=-1)

    def similarity(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N images, N captions] logits."""
        return self.embed_images(pixels) @ self.embed_texts(ids, mask).T * self.log_scale.exp() + self.bias

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return sigmoid_loss(self.embed_images(pixels), self.embed_texts(ids, mask), self.log_scale, self.bias)
