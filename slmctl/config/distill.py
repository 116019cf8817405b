"""`slmctl distill`: a decoder-only teacher (`teacher=`) into an encoder-decoder student."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from slmctl.config.choices import CrossTokenizer, FloatDtype, KDLoss, KDTargets, TeacherDtype, TeacherKind
from slmctl.config.model import StudentSchema
from slmctl.config.training import TrainingSchema


@dataclass
class TeacherSchema:
    kind: TeacherKind = TeacherKind.hf  # hf: a hub id or save_pretrained directory; run: a decoder-only run of ours
    path: str = MISSING
    tokenizer: Optional[str] = None  # hf only: where its tokenizer is, if not beside the weights
    dtype: TeacherDtype = TeacherDtype.auto  # auto: the checkpoint's own dtype (our runs save float32)
    trust_remote_code: bool = False  # never run code from the hub unless asked (logged when on)
    shard: bool = False  # several training processes: each holds 1/N of the teacher's weights (FSDP2)


@dataclass
class KDSchema:
    alpha: float = 0.5  # loss = alpha * kd + (1 - alpha) * ce(gold)
    loss: KDLoss = KDLoss.forward_kl  # forward_kl = KL(teacher||student) | reverse_kl | jsd (generalized, weight beta)
    beta: float = 0.5  # jsd only: M = beta * teacher + (1 - beta) * student
    temperature: float = 1.0  # both softened by T; the kd term is scaled by T^2
    # gold: the data's targets | teacher: the teacher writes them (sequence-level KD)
    # | student: the student samples them (on-policy) | mix: student with on_policy_prob, else gold
    targets: KDTargets = KDTargets.gold
    on_policy_prob: float = 0.5
    student_temperature: float = 1.0  # sampling the student's targets
    student_top_k: int = 0  # 0 = no top-k filter
    teacher_temperature: float = 0.0  # teacher-written targets: 0 = greedy
    cross_tokenizer: CrossTokenizer = CrossTokenizer.error  # different tokenizers: error | uld (Universal Logit Distillation)
    cache: bool = False  # gold targets: precompute the teacher's top-k once into teacher_cache/
    cache_topk: int = 64
    cache_dtype: FloatDtype = FloatDtype.float16  # log-probabilities on disk
    cache_batch_size: int = 32  # teacher batch size while caching


@dataclass
class DistillSchema(TrainingSchema):
    control: bool = False  # also train a control student on gold CE only (same init, data, steps) and report both
    kd: KDSchema = field(default_factory=KDSchema)
    teacher: TeacherSchema = field(default_factory=TeacherSchema)
    student: StudentSchema = field(default_factory=StudentSchema)


KD_RANGES = {"kd.alpha": (0.0, 1.0), "kd.on_policy_prob": (0.0, 1.0)}
