"""The values a config field may take: each set of choices is an enum whose members are named by
their values (so `kd.loss=jsd` and `model.arch=hf-causal` parse, and a bad value is refused with
the choices named)."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A member of a field's choices: a string (compares, hashes, prints and serialises as its value)."""

    def __str__(self) -> str:
        return self.value


def choices(name: str, *values: str) -> type[Choice]:
    """The choices of a field, as an enum whose members are named by their values (so
    `kd.loss=jsd` and `model.arch=hf-causal` parse, and a bad value is refused with the
    choices named)."""
    return Choice(name, [(value, value) for value in values], module=__name__)


Arch = choices("Arch", "encdec", "deconly", "hf-causal")


BadRowPolicy = choices("BadRowPolicy", "skip", "error")


LoggerKind = choices("LoggerKind", "csv", "tensorboard", "wandb", "mlflow")


# where LoRA adapters go: a group (attn: self-attention qkv + out, cross_attn: q, kv, out, mlp: fc1, fc2) or one projection
LoraTarget = choices("LoraTarget", "attn", "cross_attn", "mlp", "attn.qkv", "attn.out", "cross_attn.q", "cross_attn.kv",
                     "cross_attn.out", "mlp.fc1", "mlp.fc2")


Layout = choices("Layout", "auto", "documents", "pairs")


KDLoss = choices("KDLoss", "forward_kl", "reverse_kl", "jsd")


KDTargets = choices("KDTargets", "gold", "teacher", "student", "mix")


CrossTokenizer = choices("CrossTokenizer", "error", "uld")


FloatDtype = choices("FloatDtype", "float32", "bfloat16", "float16")


TeacherKind = choices("TeacherKind", "hf", "run")


TeacherDtype = choices("TeacherDtype", "auto", "float32", "bfloat16", "float16")


# the embedded world's questions: fact (one fact, a short answer) or about (everything about one person, a long one)
SyntheticQuestions = choices("SyntheticQuestions", "fact", "about")


TaskKind = choices("TaskKind", "columns", "squad", "synthetic", "shapes", "images")


JudgeKind = choices("JudgeKind", "none", "local", "endpoint")


Runtime = choices("Runtime", "auto", "torch", "onnx")


RecordFormat = choices("RecordFormat", "json", "csv", "md")


ExportFormat = choices("ExportFormat", "onnx", "hf")


Quantization = choices("Quantization", "int8", "int4", "qdq")


ExternalData = choices("ExternalData", "auto", "always", "never")


ExportDtype = choices("ExportDtype", "fp32", "fp16")


Fp16Policy = choices("Fp16Policy", "keep", "fail")


Optimization = choices("Optimization", "none", "ort")


DecoderCache = choices("DecoderCache", "grow", "in_place")


ActivationType = choices("ActivationType", "uint8", "uint16", "int8", "int16")


WeightType = choices("WeightType", "uint8", "int8")


Tower = choices("Tower", "vit", "clip", "siglip")


TowerPretrain = choices("TowerPretrain", "none", "contrastive", "counts", "layout")


Compressor = choices("Compressor", "none", "avgpool", "ldpv2")


Projector = choices("Projector", "linear", "mlp2x_gelu")


# pretrain's objective when none is named: the one each architecture trains with
PRETRAIN_OBJECTIVE = {Arch.encdec: "prefix_lm", Arch.deconly: "causal_lm", Arch["hf-causal"]: "causal_lm"}
