"""`slmctl add-vision`: a vision tower (`vision=`) into a text model's encoder, in stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from slmctl.config.choices import Compressor, LoggerKind, Projector, Tower, TowerPretrain
from slmctl.config.training import AdamWSchema


@dataclass
class VisionSchema:
    tower: Tower = Tower.vit  # vit: our own, trained from scratch | clip | siglip (pretrained: path)
    path: Optional[str] = None  # clip / siglip: the model; vit: an add-vision run whose stage-0 tower to start from
    image_size: int = 64
    patch_size: int = 8
    width: int = 128  # vit only
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    feature_layer: int = -2
    anyres: bool = True
    grids: list = field(default_factory=lambda: [[1, 1], [1, 2], [2, 1], [2, 2], [1, 3], [3, 1]])
    compress: Compressor = Compressor.avgpool
    compress_factor: int = 2
    max_tokens_per_image: int = 64
    projector: Projector = Projector.mlp2x_gelu
    pixel_mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    pixel_std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    train_tower: bool = False  # pretrained towers stay frozen unless asked
    # before stages 1-2, pretrain our own ViT (stage0.*): contrastive = on image-caption pairs (SigLIP loss),
    # counts = to count each kind (and colour of each kind) of shape at every position of its features,
    # layout = counts + what covers each position (slmctl/model/counting.py)
    pretrain: TowerPretrain = TowerPretrain.none


@dataclass
class VisionStageSchema:
    steps: int = MISSING
    lr: float = MISSING
    tower_lr: Optional[float] = None


@dataclass
class AddVisionSchema:
    source: Optional[str] = None  # the text model: an encoder-decoder model dir or run (set from the command line)
    seed: int = 0
    resume: Optional[str] = None  # RUN or "latest": continue that (unfinished) run where it stopped
    batch_size: int = 16
    max_source_len: int = 256  # encoder tokens after the image tokens are spliced in
    max_target_len: int = 16
    # vision.pretrain=contrastive|counts: the tower alone, before stage 1 (slmctl/train/tower_pretrain.py)
    stage0: VisionStageSchema = field(default_factory=lambda: VisionStageSchema(steps=300, lr=1e-3))
    # align: projector (+ compressor) trained; tower and language model frozen
    stage1: VisionStageSchema = field(default_factory=lambda: VisionStageSchema(steps=150, lr=1e-3))
    # tune: projector + language model (+ the tower when vision.train_tower)
    stage2: VisionStageSchema = field(default_factory=lambda: VisionStageSchema(steps=300, lr=3e-4, tower_lr=3e-4))
    optim: AdamWSchema = field(default_factory=lambda: AdamWSchema(weight_decay=0.0, warmup_steps=20))
    validation_every: int = 100  # steps between validation passes (each stage)
    checkpoint_every: int = 100  # steps between resumable checkpoints (checkpoints/stage<N>/step-*)
    logger: List[LoggerKind] = field(default_factory=list)  # as pretrain's
    vision: VisionSchema = field(default_factory=VisionSchema)
    data: Any = None
    trainer: Any = None
