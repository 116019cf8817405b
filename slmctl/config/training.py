"""What every training stage shares: the optimizer and its schedule, slmctl's own trainer
options, the training loop's settings, and LoRA (`peft=lora`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from slmctl.config.choices import LoggerKind, LoraTarget


@dataclass
class AdamWSchema:
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step


@dataclass
class OptimSchema(AdamWSchema):
    lr: float = 1e-3


@dataclass
class TrainerOptionsSchema:
    """slmctl's own keys of the `trainer` config, beside lightning.Trainer's arguments (which the
    group leaves open-ended); slmctl.train.fit applies them and never passes them to Lightning."""
    # recompute each transformer block's activations in the backward pass: less memory, ~1/3 more compute
    activation_checkpointing: bool = False


@dataclass
class TrainingSchema:
    """What pretrain and distill share."""
    seed: int = 0
    resume: Optional[str] = None  # RUN or "latest": continue that (unfinished) run where it stopped
    batch_size: int = 16
    max_source_len: int = 256  # encoder tokens (or the whole sequence for decoder-only models)
    max_target_len: int = 64  # decoder tokens
    checkpoint_every: int = 100  # steps between resumable checkpoints (checkpoints/step-*)
    # experiment trackers beside metrics.jsonl, written inside the run: logger=tensorboard or logger=[tensorboard,mlflow]
    logger: List[LoggerKind] = field(default_factory=list)
    optim: OptimSchema = field(default_factory=OptimSchema)
    peft: Any = None  # null: every weight trains; peft=lora: low-rank adapters through PEFT (needs init= / student.init=)
    data: Any = None
    tokenizer: Any = None
    trainer: Any = None


@dataclass
class LoraSchema:
    """peft=lora: W x + (alpha / r) B A x on the target Linear layers, the rest frozen (PEFT's LoRA)."""
    kind: str = "lora"
    r: int = 8  # adapter rank
    alpha: float = 16.0  # scaling numerator: the update is (alpha / r) B A
    dropout: float = 0.0  # dropout on the adapter's input
    targets: List[LoraTarget] = field(default_factory=lambda: [LoraTarget.attn, LoraTarget.cross_attn, LoraTarget.mlp])
    merge: bool = True  # true: model/ holds full merged weights; false: model/ holds the PEFT adapter (+ the base's path)
