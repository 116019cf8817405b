"""Vision towers: the image side of a vision-language encoder-decoder.

A tower turns a batch of square crops [N, 3, S, S] (S = its resolution) into patch features
[N, g, g, C] (g = S / patch size), taken from a configurable layer (default the second to
last, as the paper and LLaVA do) and without any class token:

    ViT            our own, trained from scratch (`vit-tiny`, `vit-small`: the embedded default)
    HFVisionTower  a pretrained Hugging Face CLIP or SigLIP vision model, by local path or hub id

Both normalise pixels themselves (`pixel_mean`, `pixel_std`), so callers pass [0, 1] RGB.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """The vision side: tower, any-resolution tiling, token compression and projector."""

    tower: str = "vit"  # vit | clip | siglip
    path: str | None = None  # clip / siglip: a local save_pretrained directory or a hub id
    image_size: int = 64  # the tower's crop resolution
    patch_size: int = 8
    width: int = 128  # vit: hidden size (hf towers: read from the checkpoint)
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    feature_layer: int = -2  # hidden state taken as features (-1 = last block, -2 = second to last)
    anyres: bool = True  # tile high-resolution images on a grid chosen for their aspect ratio
    grids: tuple = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1))  # (columns, rows) of tiles allowed
    compress: str = "avgpool"  # none | avgpool | ldpv2
    compress_factor: int = 2  # pooling window per side (2 -> 4x fewer tokens)
    max_tokens_per_image: int = 256  # cap after compression (the high-resolution map is pooled down to fit)
    projector: str = "mlp2x_gelu"  # linear | mlp2x_gelu
    pixel_mean: tuple = CLIP_MEAN
    pixel_std: tuple = CLIP_STD
    feature_width: int | None = None  # filled from the tower
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["grids"] = [list(g) for g in self.grids]
        data["pixel_mean"], data["pixel_std"] = list(self.pixel_mean), list(self.pixel_std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        data = dict(data)
        data["grids"] = tuple(tuple(g) for g in data.get("grids", cls.grids))
        for key in ("pixel_mean", "pixel_std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size


class ViTBlock(nn.Module):
    """Pre-norm: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.out(y.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.mlp_norm(x))))


class ViT(nn.Module):
    """A plain pre-norm ViT: patch embedding, learned positions, transformer blocks."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}")
        self.cfg, self.image_size = cfg, cfg.image_size
        self.patch = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.positions = nn.Parameter(torch.randn(1, cfg.grid_side ** 2, cfg.width) * 0.02)
        if cfg.width % cfg.heads:
            raise ValueError(f"vision.width {cfg.width} must be a multiple of vision.heads {cfg.heads}")
        self.blocks = nn.ModuleList(ViTBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.register_buffer("mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        return self.cfg.width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] in [0, 1] -> features [N, g, g, width] from `feature_layer`."""
        x = self.patch((pixels - self.mean) / self.std).flatten(2).transpose(1, 2) + self.positions
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        features = states[self.cfg.feature_layer]
        g = self.cfg.grid_side
        return features.reshape(features.shape[0], g, g, -1)


class HFVisionTower(nn.Module):
    """A Hugging Face CLIPVisionModel / SiglipVisionModel; features from `feature_layer`,
    patch tokens only (CLIP's class token dropped)."""

    def __init__(self, cfg: VisionConfig, pretrained: bool = True):
        super().__init__()
        from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

        if not cfg.path:
            raise ValueError(f"vision.tower={cfg.tower} needs vision.path (a local directory or a hub id)")
        config = AutoConfig.from_pretrained(cfg.path)
        vision_config = getattr(config, "vision_config", config)
        model_class = SiglipVisionModel if "siglip" in vision_config.model_type else CLIPVisionModel
        # pretrained=False: the architecture only (a saved vision model brings its own weights)
        self.model = model_class.from_pretrained(cfg.path) if pretrained else model_class(vision_config)
        self.has_cls = model_class is CLIPVisionModel
        self.cfg = cfg
        self.image_size = vision_config.image_size
        self.grid = vision_config.image_size // vision_config.patch_size
        self.register_buffer("mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=(pixels - self.mean) / self.std, output_hidden_states=True)
        features = out.hidden_states[self.cfg.feature_layer]
        if self.has_cls:
            features = features[:, 1:]
        return features.reshape(features.shape[0], self.grid, self.grid, -1)


def build_tower(cfg: VisionConfig, pretrained: bool = True) -> nn.Module:
    if cfg.tower == "vit":
        return ViT(cfg)
    if cfg.tower in ("clip", "siglip"):
        return HFVisionTower(cfg, pretrained)
    raise ValueError(f"vision.tower must be vit, clip or siglip, got {cfg.tower!r}")
