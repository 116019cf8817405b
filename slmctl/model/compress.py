"""Image-token compression: fewer, richer tokens per image before the projector.

    none      every patch token
    avgpool   2-D average pooling by `factor` per side (2 -> 4x fewer tokens)
    ldpv2     MobileVLM V2's LDPv2 idea: a learned pooling (a depthwise conv with kernel and
              stride `factor`, initialised to the average) followed by a positional block
              (a 3x3 depthwise conv added to its input, initialised to zero: an identity at first)

Compression runs per crop (the global view and every tile), on maps [N, H, W, C]; a map whose
side is not a multiple of `factor` is padded by repeating its border, so every output token
averages real features. `cap` then pools an assembled map down to a token budget.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmctl.model.anyres import cap_shape

COMPRESSIONS = ("none", "avgpool", "ldpv2")


class TokenCompressor(nn.Module):
    def __init__(self, kind: str, factor: int, channels: int, max_tokens: int | None = None):
        super().__init__()
        if kind not in COMPRESSIONS:
            raise ValueError(f"vision.compress must be one of {', '.join(COMPRESSIONS)}, got {kind!r}")
        if factor < 1:
            raise ValueError(f"vision.compress_factor must be >= 1, got {factor}")
        self.kind, self.factor, self.max_tokens = kind, factor, max_tokens
        if kind == "ldpv2":
            self.pool = nn.Conv2d(channels, channels, factor, stride=factor, groups=channels)
            nn.init.constant_(self.pool.weight, 1.0 / factor**2)
            nn.init.zeros_(self.pool.bias)
            self.position = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
            nn.init.zeros_(self.position.weight)
            nn.init.zeros_(self.position.bias)

    def forward(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """[N, H, W, C] (or one map [H, W, C]) -> [N, H', W', C]."""
        single = feature_maps.dim() == 3
        x = (feature_maps[None] if single else feature_maps).permute(0, 3, 1, 2)  # [N, C, H, W]
        if self.kind != "none" and self.factor > 1:
            f = self.factor
            pad_h, pad_w = (-x.shape[2]) % f, (-x.shape[3]) % f
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
            if self.kind == "avgpool":
                x = F.avg_pool2d(x, f)
            else:
                x = self.pool(x)
        if self.kind == "ldpv2":
            x = x + self.position(x)
        x = x.permute(0, 2, 3, 1)
        return x[0] if single else x


def cap(feature_map: torch.Tensor, budget: int) -> torch.Tensor:
    """[H, W, C] average-pooled down to at most `budget` tokens (aspect ratio kept); unchanged if it fits."""
    H, W, _ = feature_map.shape
    if H * W <= budget:
        return feature_map
    x = F.adaptive_avg_pool2d(feature_map.permute(2, 0, 1)[None], cap_shape(H, W, budget))
    return x[0].permute(1, 2, 0)
