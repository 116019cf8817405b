"""Hydra composition of `conf/` over typed schemas, and one-line errors.

Every config value is declared once, as a default of a schema dataclass below. The
schemas are registered in Hydra's ConfigStore (`schema/<stage>`, `schema/<group>[/<kind>]`)
and each YAML file under `conf/` names its schema as the base of its defaults list, so
the YAML holds only what differs from the schema: a stage's menu of group choices, a
group option's own values.

`compose(stage, overrides)` composes `conf/<stage>.yaml` with `key=value` overrides
(Hydra's compose API: no Hydra run directory, no logging changes). An unknown key, an
unknown group option, a wrong type, a value outside a field's choices or a missing
required value raises `ConfigError` with one line naming it and the valid choices.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from slmctl.errors import UserError, first_line
from slmctl.model.config import ModelConfig

CONF_DIR = Path(os.environ.get("SLMCTL_CONF", Path(__file__).resolve().parent.parent / "conf"))
# directories of conf/ that are not GROUP=OPTION choices, and why
NOT_GROUPS = {"hardware": "roofline profiles read by `slmctl bench --estimate NAME`, not a config group"}


class ConfigError(UserError, ValueError):
    """A bad composition or value; the message is one line naming the problem and the fix."""


class Choice(str, Enum):
    """A member of a field's choices: a string (compares, hashes, prints and serialises as its value)."""

    def __str__(self) -> str:
        return self.value


def choices(name: str, *values: str) -> type[Choice]:
    """The choices of a field, as an enum whose members are named by their values (so
    `kd.loss=jsd` and `model.arch=hf-causal` parse, and a bad value is refused with the
    choices named)."""
    return Choice(name, [(value, value) for value in values], module=__name__)


# ---------------------------------------------------------------------------
# Choices (the values a field may take)

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
ActivationType = choices("ActivationType", "uint8", "uint16", "int8", "int16")
WeightType = choices("WeightType", "uint8", "int8")
Tower = choices("Tower", "vit", "clip", "siglip")
TowerPretrain = choices("TowerPretrain", "none", "contrastive", "counts", "layout")
Compressor = choices("Compressor", "none", "avgpool", "ldpv2")
Projector = choices("Projector", "linear", "mlp2x_gelu")

# pretrain's objective when none is named: the one each architecture trains with
PRETRAIN_OBJECTIVE = {Arch.encdec: "prefix_lm", Arch.deconly: "causal_lm", Arch["hf-causal"]: "causal_lm"}


# ---------------------------------------------------------------------------
# Group schemas (one dataclass per group, or per kind of a group's options)


@dataclass
class HFCausalSchema:
    """model=hf-causal: a transformers AutoModelForCausalLM built from this config (a tiny Llama)."""
    model_type: str = "llama"
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True


def _model_schema() -> type:
    """`preset` and `arch`, plus every ModelConfig field as an optional override (null keeps the preset's)."""
    overridable = [(f.name, Optional[f.type if not isinstance(f.type, str) else _TYPES[f.type]], None)
                   for f in dataclasses.fields(ModelConfig) if f.name not in ("name", "arch")]
    return dataclasses.make_dataclass("ModelSchema", [
        ("preset", Optional[str], None),  # the size: a name in slmctl.model.config.PRESETS (null for hf-causal)
        ("arch", Arch, Arch.encdec),  # encdec | deconly (the preset's size matched as a decoder-only baseline) | hf-causal
        *overridable,
        ("hf", Optional[HFCausalSchema], None),  # arch=hf-causal only
    ], namespace={"__module__": __name__})


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
ModelSchema = _model_schema()
# a distillation student: a model (model@student), or `init` = an existing model / run to continue from
StudentSchema = dataclasses.make_dataclass("StudentSchema", [("init", Optional[str], None)], bases=(ModelSchema,),
                                           namespace={"__module__": __name__})


@dataclass
class ColumnsSchema:
    text: str = "text"
    source: str = "source"
    target: str = "target"


@dataclass
class SyntheticDataSchema:
    kind: str = "synthetic"
    seed: int = 0
    n_people: int = 5000  # a world too large to memorise: models must read the context
    train_examples: int = 20000  # text paragraphs (LM objectives) or QA examples (seq2seq)
    validation_examples: int = 200
    min_facts: int = 8  # facts per QA context: controls the input length
    max_facts: int = 16


@dataclass
class FilesDataSchema:
    kind: str = "files"
    train: str = MISSING  # path or glob, e.g. data/train.jsonl
    validation: Optional[str] = None  # path; null = hold out validation_fraction of train
    validation_fraction: float = 0.02
    columns: ColumnsSchema = field(default_factory=ColumnsSchema)
    on_bad_row: BadRowPolicy = BadRowPolicy.skip  # prepare: skip (counted, the first few named file:line) or error


@dataclass
class PreparedDataSchema:
    kind: str = "prepared"
    path: str = MISSING  # a `slmctl prepare` run (prepare/latest) or its data/ directory
    num_workers: int = 2  # DataLoader worker processes reading the memory-mapped token store
    validation_rows: int = 256  # validation rows (packed windows or documents) taken from the validation split


@dataclass
class ShapesDataSchema:
    kind: str = "shapes"
    seed: int = 0
    train_examples: int = 4000
    validation_examples: int = 100
    max_shapes: int = 4  # shapes per scene: 1 to this


@dataclass
class ImagesDataSchema:
    kind: str = "images"
    train: str = MISSING
    validation: Optional[str] = None  # null: the last validation_fraction of train
    validation_fraction: float = 0.05
    skip_bad: bool = False  # true: skip (and count) rows whose image cannot be read, instead of failing
    allow_outside_root: bool = False  # image paths may not leave the jsonl file's directory unless true


@dataclass
class HubDataSchema:
    kind: str = "hub"
    id: str = MISSING  # e.g. wikitext
    subset: Optional[str] = None  # e.g. wikitext-2-raw-v1
    train_split: str = "train"
    validation_split: Optional[str] = "validation"  # null: prepare holds out validation_fraction of the documents
    validation_fraction: float = 0.02
    columns: ColumnsSchema = field(default_factory=ColumnsSchema)
    on_bad_row: BadRowPolicy = BadRowPolicy.skip


@dataclass
class BpeTokenizerSchema:
    kind: str = "bpe"
    vocab_size: int = 4096
    min_frequency: int = 2
    n_sentinels: int = 32  # <extra_id_N> tokens for span corruption
    max_training_texts: int = 50000


@dataclass
class HFTokenizerSchema:
    kind: str = "hf"
    path: str = MISSING
    n_sentinels: int = 32  # added if the tokenizer has none


@dataclass
class RunTokenizerSchema:
    kind: str = "run"
    path: str = MISSING


@dataclass
class TeacherTokenizerSchema:
    kind: str = "teacher"
    n_sentinels: int = 32


@dataclass
class TeacherSchema:
    kind: TeacherKind = TeacherKind.hf  # hf: a hub id or save_pretrained directory; run: a decoder-only run of ours
    path: str = MISSING
    tokenizer: Optional[str] = None  # hf only: where its tokenizer is, if not beside the weights
    dtype: TeacherDtype = TeacherDtype.auto  # auto: the checkpoint's own dtype (our runs save float32)
    trust_remote_code: bool = False  # never run code from the hub unless asked (logged when on)
    shard: bool = False  # several training processes: each holds 1/N of the teacher's weights (FSDP2)


@dataclass
class PrefixLMSchema:
    name: str = "prefix_lm"
    min_prefix_frac: float = 0.2
    max_prefix_frac: float = 0.8
    packing: bool = True


@dataclass
class SpanCorruptionSchema:
    name: str = "span_corruption"
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    packing: bool = True


@dataclass
class Seq2SeqSchema:
    name: str = "seq2seq"
    packing: bool = False


@dataclass
class CausalLMSchema:
    name: str = "causal_lm"
    packing: bool = True


@dataclass
class TaskSchema:
    name: str = MISSING
    kind: TaskKind = TaskKind.columns
    hub_id: Optional[str] = None
    subset: Optional[str] = None
    split: str = "validation"
    data_files: Optional[str] = None  # local json/jsonl/parquet/csv with the task's columns (instead of the hub)
    prompt: str = "{source}"  # template over the row's columns
    reference: str = "target"  # the reference column (columns kind)
    id: Optional[str] = "id"  # the id column; row numbers when null or absent
    metrics: list = field(default_factory=lambda: ["rougeLsum"])
    max_new_tokens: int = 64
    # synthetic kind: the embedded world's held-out questions
    seed: int = 0
    n_people: int = 5000
    n: int = 200
    min_facts: int = 8
    max_facts: int = 16
    max_shapes: int = 4  # shapes kind: shapes per scene, 1 to this (match the add-vision run's data.max_shapes)


@dataclass
class JudgeSchema:
    kind: JudgeKind = JudgeKind.none
    path: Optional[str] = None  # local: a causal LM directory or hub id
    endpoint: Optional[str] = None  # endpoint: an OpenAI-compatible base URL, e.g. http://localhost:8000/v1
    model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    max_new_tokens: int = 64
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None  # judge scores are cached here (default ~/.cache/slmctl): reruns are free


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


# ---------------------------------------------------------------------------
# Stage schemas (the base of each conf/<stage>.yaml)


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
    # (no `compile`: torch.compile of the training step measured no faster on CPU, docs/speed.md)


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


@dataclass
class PretrainSchema(TrainingSchema):
    init: Optional[str] = None  # start from this model / run instead of random weights
    model: ModelSchema = field(default_factory=ModelSchema)
    objective: Any = None  # null: the model's arch chooses (PRETRAIN_OBJECTIVE)


@dataclass
class PrepareSchema:
    """slmctl prepare: a corpus read once (streamed), tokenised and written as a token store."""
    seed: int = 0  # the train/validation split of documents, the tokenizer's sample order
    layout: Layout = Layout.auto  # documents (text column) | pairs (source/target) | auto: what the first row has
    shard_tokens: int = 67108864  # tokens per shard file (2**26; 128 MB at uint16)
    batch_rows: int = 1024  # rows a tokenizing worker takes at a time
    workers: Optional[int] = None  # tokenizing worker processes (null: one per core)
    max_rows: Optional[int] = None  # stop after this many rows (a sample of a larger corpus)
    data: Any = None
    tokenizer: Any = None
    teacher: Any = None  # tokenizer=teacher: the teacher whose tokenizer the data is prepared with


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


@dataclass
class GenerationSchema:
    max_new_tokens: Optional[int] = None  # null: the task's
    num_beams: int = 1  # greedy by default
    length_penalty: float = 1.0


@dataclass
class EvalSchema:
    models: list = field(default_factory=list)  # set from the command line: slmctl eval MODEL [MODEL ...]
    tasks: list = field(default_factory=list)  # several tasks in one run, each with its defaults; empty: the `task` group's choice
    predictions: Optional[str] = None  # a jsonl of {id, prediction} to score instead of models (--predictions)
    resume: Optional[str] = None  # RUN or "latest": continue that (unfinished) run where it stopped
    limit: Optional[int] = None  # only the first N examples (quick checks)
    batch_size: int = 16
    max_source_len: int = 1024  # prompt tokens kept (encoder-decoder: the first; decoder-only: the last)
    bootstrap: int = 1000  # resamples for the 95% confidence intervals
    # paired comparisons on the same examples, as [model, baseline] positions in `models` ([[2,3]]: the third against
    # the fourth); empty: with two or more models, each against the last
    pairs: list = field(default_factory=list)
    seed: int = 0
    device: str = "cpu"  # set by --device
    ep: Optional[str] = None  # exports: ONNX Runtime execution provider (--ep; null: the device's)
    allow_fallback: bool = False  # --device npu: run even when nodes would fall back to the CPU provider
    generation: GenerationSchema = field(default_factory=GenerationSchema)
    task: TaskSchema = field(default_factory=TaskSchema)
    judge: JudgeSchema = field(default_factory=JudgeSchema)


@dataclass
class BenchSchema:
    models: list = field(default_factory=list)  # presets (random weights: 330m, deconly-330m, ...) or model directories / runs
    input_lens: list = field(default_factory=lambda: [512])
    output_lens: list = field(default_factory=lambda: [64])
    batch: list = field(default_factory=lambda: [1])
    repeat: int = 3  # timed runs per configuration (median / p90 / stdev reported); 0 with estimate
    warmup: int = 1
    dtype: FloatDtype = FloatDtype.float32
    runtime: Runtime = Runtime.auto  # auto: ONNX Runtime for exports (slmctl export onnx), torch for the rest
    device: str = "cpu"  # set by --device
    ep: Optional[str] = None  # exports: ONNX Runtime execution provider (--ep; null: the device's)
    allow_fallback: bool = False  # --device npu: run even when nodes would fall back to the CPU provider
    prepacking: bool = True  # ONNX Runtime: packed copies of the weights for its GEMMs (false: less memory; docs/export.md)
    threads: Optional[int] = None  # torch threads (null: torch's default)
    format: Optional[RecordFormat] = None  # also print the records to stdout
    # a conf/hardware profile (this-cpu, a100, h100, ...): add roofline predictions; with repeat=0 a prediction only
    estimate: Optional[str] = None
    image_size: list = field(default_factory=lambda: [336, 336])  # vision models: the image (width, height) each prompt carries
    seed: int = 0
    resume: Optional[str] = None  # RUN or "latest": continue that (unfinished) run where it stopped
    # true: measure each model in a fresh child process (no allocator, thread-pool or cache state shared between models)
    isolate: bool = False
    # --train MODEL: time training steps (forward + backward + AdamW) instead of generation (slmctl.bench.training)
    train: bool = False
    source_len: int = 256  # train: encoder tokens per row (decoder-only: the sequence length)
    target_len: int = 64  # train: decoder tokens per row
    t5: bool = False  # train (--compare): also train transformers' T5 of matching dimensions, with ratios against it
    # train: the trainer options a training run would set (trainer.activation_checkpointing=true)
    trainer: TrainerOptionsSchema = field(default_factory=TrainerOptionsSchema)


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


@dataclass
class StaticShapeSchema:
    enabled: bool = False
    batch: int = 1
    prompt_len: int = 512  # prompts are right-padded to this length
    capacity: int = 128  # new tokens the cache holds


@dataclass
class ValidationSchema:
    prompt_lens: list = field(default_factory=lambda: [8, 33, 100])
    steps: int = 32  # greedy tokens compared per prompt
    batch: int = 2  # the last row is padded
    tolerance: float = 1e-4  # max |logit difference| (fp32)
    seed: Optional[int] = None  # null: fresh each export (recorded in validation.json)


@dataclass
class Int8Schema:
    per_channel: bool = True


@dataclass
class Fp16Schema:
    """The fp16 variant's overflow check and validation (slmctl.export.fp16)."""
    # nodes whose activations or weights reach fp16's max (65504) / margin: keep them in fp32, or fail the export
    policy: Fp16Policy = Fp16Policy.keep
    margin: float = 2.0
    calibration_prompts: int = 8  # prompts greedily generated through the fp32 graphs to measure every tensor's range
    calibration_steps: int = 16
    tolerance: float = 0.01  # max |fp16 - fp32 logit| over the largest |fp32 logit|, on the calibration prompts


@dataclass
class Int4Schema:
    """Weight-only block-wise int4 (ONNX Runtime's MatMulNBits)."""
    block_size: int = 32  # weights per scale along the input dimension (16, 32, 64, 128, ...)
    symmetric: bool = True  # false: a zero point per block too
    # MatMulNBits compute type: 1 fp32, 2 fp16, 3 bf16, 4 int8 (activations quantized per block in the kernel); null:
    # ONNX Runtime's default. 4: 1.54x the decode speed of the default at 330m on this CPU (docs/export.md)
    accuracy_level: Optional[int] = 4
    embeddings: bool = True  # the embedding tables too (GatherBlockQuantized); false: they stay fp32


@dataclass
class QdqSchema:
    """QNN HTP: activation_type=uint16 weight_type=uint8."""
    activation_type: ActivationType = ActivationType.uint8
    weight_type: WeightType = WeightType.int8
    per_channel: bool = True
    calibration_prompts: int = 16
    calibration_steps: int = 8


@dataclass
class QuantReportSchema:
    prompts: int = 32  # greedy token agreement over this many task prompts
    steps: int = 32
    eval_limit: int = 50  # task metric on this many examples (needs the model's tokenizer)
    input_len: int = 128  # speed: random prompt of this length, output_len new tokens, median of repeat runs
    output_len: int = 32
    repeat: int = 3


@dataclass
class ExportSchema:
    to: ExportFormat = ExportFormat.onnx  # the target format (the subcommand: slmctl export onnx|hf)
    source: Optional[str] = None  # the model: a model dir, a run or a preset; null: the newest distill/pretrain run
    # int8 (dynamic, weight MatMul/Gemm), int4 (weight-only MatMulNBits) and/or qdq (static QDQ, calibrated): --quantize int8
    quantize: List[Quantization] = field(default_factory=list)
    dtype: ExportDtype = ExportDtype.fp32  # fp16: also an fp16 variant (GPU / NPU providers), overflow-checked (--dtype fp16)
    optimize: Optimization = Optimization.none  # ort: also an ONNX Runtime-only variant with fused contrib ops (--optimize ort)
    fp16: Fp16Schema = field(default_factory=Fp16Schema)
    external_data: ExternalData = ExternalData.auto  # auto: weights in <graph>.onnx.data (memory-mapped) past 256 MB
    # --static: fixed shapes and a preallocated cache, for NPU runtimes (QNN HTP, OpenVINO NPU)
    static: StaticShapeSchema = field(default_factory=StaticShapeSchema)
    # PyTorch vs ONNX Runtime on fresh random prompts; a breach fails the run (exit 1)
    validation: ValidationSchema = field(default_factory=ValidationSchema)
    int8: Int8Schema = field(default_factory=Int8Schema)
    int4: Int4Schema = field(default_factory=Int4Schema)
    qdq: QdqSchema = field(default_factory=QdqSchema)
    report: QuantReportSchema = field(default_factory=QuantReportSchema)  # quantized vs fp32, measured in the same process
    threads: Optional[int] = None  # ONNX Runtime intra-op threads (null: its default)
    device: str = "cpu"  # set by --device
    ep: Optional[str] = None  # the execution provider validation runs the graphs on (null: the CPU's)
    seed: int = 0  # weights of a preset, prompts of the report
    task: TaskSchema = field(default_factory=TaskSchema)  # prompts for calibration and the quantized-vs-fp32 report


@dataclass
class ServeSchema:
    source: Optional[str] = None  # the model: a run, model directory, export[:variant] or vision model (the command line's MODEL)
    runtime: Runtime = Runtime.auto  # auto: ONNX Runtime for exports, torch for the rest
    device: str = "cpu"  # set by --device
    ep: Optional[str] = None  # exports: ONNX Runtime execution provider (--ep)
    allow_fallback: bool = False
    threads: Optional[int] = None  # torch / ONNX Runtime threads (null: their default)
    host: str = "127.0.0.1"  # loopback by default; 0.0.0.0 to listen on every interface
    port: int = 8000  # 0: any free port (server.json in the run says which)
    model_name: Optional[str] = None  # the id clients send as "model" (null: the model's run or directory name)
    max_batch: int = 16  # sequences decoded together (continuous batching slots)
    max_queue: int = 64  # requests waiting for a slot before new ones get HTTP 429
    max_tokens_cap: int = 256  # the largest max_tokens a request may ask for
    max_prompt_tokens: Optional[int] = None  # the longest prompt accepted (null: the model's max_seq_len)
    api_key_env: Optional[str] = None  # the environment variable holding the API key (the key itself is never stored)
    log_prompts: bool = False  # requests.jsonl records prompt text too
    image_root: Optional[str] = None  # vision models: local image paths must lie under it (data: URLs always work)
    grace_s: float = 30.0  # on SIGTERM / Ctrl-C: how long in-flight requests may take to finish


KD_RANGES = {"kd.alpha": (0.0, 1.0), "kd.on_policy_prob": (0.0, 1.0)}

# ConfigStore entries: each conf/ YAML names its schema as `/schema/<name>@_here_` in its defaults
STAGE_SCHEMAS = {"prepare": PrepareSchema, "pretrain": PretrainSchema, "distill": DistillSchema, "eval": EvalSchema, "bench": BenchSchema,
                 "export": ExportSchema, "add-vision": AddVisionSchema, "serve": ServeSchema}
GROUP_SCHEMAS: dict[str, tuple[str, dict[str, type]]] = {
    # group -> (discriminating key, {value: schema}); the ConfigStore name is schema/<group>[/<value>]
    "model": ("", {"": ModelSchema}),
    "teacher": ("", {"": TeacherSchema}),
    "task": ("", {"": TaskSchema}),
    "judge": ("", {"": JudgeSchema}),
    "vision": ("", {"": VisionSchema}),
    "data": ("kind", {"synthetic": SyntheticDataSchema, "files": FilesDataSchema, "hub": HubDataSchema,
                      "prepared": PreparedDataSchema, "shapes": ShapesDataSchema, "images": ImagesDataSchema}),
    "tokenizer": ("kind", {"bpe": BpeTokenizerSchema, "hf": HFTokenizerSchema, "run": RunTokenizerSchema,
                           "teacher": TeacherTokenizerSchema}),
    "peft": ("kind", {"lora": LoraSchema}),
    "objective": ("name", {"prefix_lm": PrefixLMSchema, "span_corruption": SpanCorruptionSchema,
                           "seq2seq": Seq2SeqSchema, "causal_lm": CausalLMSchema}),
}
# a group's options reused at another place of a stage's config: `student=330m` is model@student=330m
PACKAGE_REUSE = {"distill": {"student": "model@student"}}


def schema_entries() -> dict[str, type]:
    """{ConfigStore name: schema}: schema/<stage> and schema/<group>[/<kind>]."""
    entries = {f"schema/{stage}": schema for stage, schema in STAGE_SCHEMAS.items()}
    for group, (_, options) in GROUP_SCHEMAS.items():
        entries |= {f"schema/{group}/{kind}".rstrip("/"): schema for kind, schema in options.items()}
    return entries


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in schema_entries().items():
        group, _, option = name.rpartition("/")
        store.store(group=group, name=option, node=schema)


# each has run(cfg, run)
STAGE_MODULES = {"prepare": "slmctl.data.prepare",
                 "pretrain": "slmctl.train.pretrain", "distill": "slmctl.train.distill", "eval": "slmctl.eval.evaluate",
                 "bench": "slmctl.bench.stage", "export": "slmctl.export.stage",
                 "add-vision": "slmctl.train.add_vision", "serve": "slmctl.serve.stage"}


def stage_module(stage: str):
    """The module whose `run(cfg, run)` carries out `stage`."""
    import importlib

    return importlib.import_module(STAGE_MODULES[stage])


# ---------------------------------------------------------------------------
# Listing


def stages() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def groups() -> dict[str, list[str]]:
    """Config groups (GROUP=OPTION) and their options, e.g. {"model": ["1b", "330m", ...]};
    the directories in NOT_GROUPS are skipped, and a reused group (distill's `student=`) lists
    the options of the group it reuses."""
    found = {d.name: sorted(p.stem for p in d.glob("*.yaml"))
             for d in sorted(CONF_DIR.iterdir()) if d.is_dir() and d.name not in NOT_GROUPS}
    for reuses in PACKAGE_REUSE.values():
        for name, source in reuses.items():
            found[name] = found[source.split("@")[0]]
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------
# Composition


def compose(stage: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The validated, resolved config of `stage` with Hydra `overrides` applied."""
    if stage not in stages():
        raise ConfigError(f"unknown stage {stage!r} (choose from: {', '.join(stages())})")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}: expected key=value (e.g. model=tiny or trainer.max_steps=50)")
    overrides = [_list_override(_trainer_override(_reused_group_override(item, stage))) for item in overrides]
    if stage == "pretrain" and not any(o.lstrip("+~").startswith("objective=") for o in overrides):
        # no objective named: the model's architecture chooses (objective.* overrides apply to that choice)
        arch = _hydra_compose(stage, [o for o in overrides if not o.lstrip("+~").startswith("objective.")]).model.arch
        overrides = [*overrides, f"objective={PRETRAIN_OBJECTIVE[arch]}"]
    return validate(_hydra_compose(stage, overrides), stage)


def _list_override(item: str) -> str:
    """`logger=tensorboard` -> `logger=[tensorboard]` (one tracker without the list brackets)."""
    key, value = item.split("=", 1)
    return f"{key}=[{value}]" if key == "logger" and not value.startswith("[") else item


def _reused_group_override(item: str, stage: str) -> str:
    """`student=330m` -> `model@student=330m` (distill reuses the model group as its student)."""
    key, value = item.split("=", 1)
    reused = PACKAGE_REUSE.get(stage, {}).get(key)
    return f"{reused}={value}" if reused else item


def _hydra_compose(stage: str, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="slmctl"):
            return hydra_compose(config_name=stage, overrides=list(overrides))
    except HydraException as e:
        message = _explain_hydra_error(e, stage)
        bad_key = re.search(r"unknown config key '([^']+)'", message)
        if bad_key:  # name the keys that do exist there
            key = bad_key.group(1)
            rest = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            try:
                with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="slmctl"):
                    node = hydra_compose(config_name=stage, overrides=rest)
                parts = key.split(".")
                depth = 0  # the first part of the key that does not exist
                while depth < len(parts) - 1 and isinstance(OmegaConf.select(node, ".".join(parts[:depth + 1])), DictConfig):
                    depth += 1
                key, parent = ".".join(parts[:depth + 1]), ".".join(parts[:depth])
                node = OmegaConf.select(node, parent) if parent else node
                if isinstance(node, DictConfig):
                    message = f"unknown config key {key!r} (valid keys{' of ' + parent if parent else ''}: {', '.join(node)})"
            except (HydraException, OmegaConfBaseException):
                pass
        raise ConfigError(message) from None
    except OmegaConfBaseException as e:
        raise ConfigError(_explain_value_error(getattr(e, "full_key", None) or "config", e)) from None


def saved_config(stage: str, saved: dict, **changes) -> DictConfig:
    """A run's saved config.yaml (complete and resolved), checked against today's schemas, with
    `changes` on top: what a resumed run (or another rank of one) continues with. Not merged
    onto the stage's defaults, whose group options may be other kinds (data=files vs synthetic)."""
    return validate(OmegaConf.merge(OmegaConf.create(saved), changes), stage)


def validate(cfg: DictConfig, stage: str) -> DictConfig:
    """Check `cfg` against the stage and group schemas; returns it typed and resolved."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(first_line(e, "invalid config")) from None
    checked = {}
    for group, (key, options) in GROUP_SCHEMAS.items():
        if cfg.get(group) is None:  # absent, or an optional group left empty (prepare's teacher)
            continue
        node = cfg[group]
        kind = node.get(key) if key else ""
        if kind not in options:
            raise ConfigError(f"{group}.{key}={kind!r} is not one of: {', '.join(options)}")
        checked[group] = _merge(options[kind], node, group)
    if "trainer" in cfg:
        checked["trainer"] = _check_trainer(cfg.trainer, lightning=stage != "bench")
    top = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k not in checked})
    result = _merge(STAGE_SCHEMAS[stage], top, None)
    with_groups = OmegaConf.merge(result, checked)
    missing = sorted(OmegaConf.missing_keys(with_groups))
    if missing:
        raise ConfigError(f"{missing[0]} is required: set {missing[0]}=VALUE")
    _check_values(with_groups)
    return with_groups


def _merge(schema: type, node, prefix: str | None) -> DictConfig:
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        full = f"{prefix}.{key}" if prefix and key else (key or prefix or "config")
        message = first_line(getattr(e, "msg", None) or str(e), "invalid config")
        if "not in struct" in message or "Key '" in message and "not" in message:
            valid = ", ".join(f.name for f in dataclasses.fields(schema))
            raise ConfigError(f"unknown config key {full!r} (valid keys{' of ' + prefix if prefix else ''}: {valid})") from None
        raise ConfigError(_explain_value_error(full, e)) from None


def trainer_arguments() -> list[str]:
    """The lightning.Trainer arguments a config may set (not logger/callbacks/plugins: slmctl owns those)."""
    from lightning.pytorch import Trainer

    return [p for p in inspect.signature(Trainer.__init__).parameters if p not in ("self", "logger", "callbacks", "plugins")]


def trainer_options() -> list[str]:
    """slmctl's own trainer keys (TrainerOptionsSchema), e.g. activation_checkpointing."""
    return [f.name for f in dataclasses.fields(TrainerOptionsSchema)]


def _unknown_trainer_key(name: str) -> ConfigError:
    return ConfigError(f"unknown trainer argument {name!r} (trainer.* takes lightning.Trainer arguments: "
                       f"{', '.join(trainer_arguments())}; and slmctl's: {', '.join(trainer_options())})")


def _trainer_override(item: str) -> str:
    """`trainer.X=v` may set any Trainer argument, also one the trainer config does not list
    (rewritten to Hydra's add-or-override `++trainer.X=v`), and slmctl's own trainer options."""
    key = item.split("=", 1)[0]
    if not key.startswith("trainer.") or key.count(".") != 1:
        return item
    name = key.split(".", 1)[1]
    if name not in trainer_arguments() and name not in trainer_options():
        raise _unknown_trainer_key(name)
    return "++" + item


def _check_trainer(node, lightning: bool = True) -> DictConfig:
    """Lightning's arguments as given, slmctl's options typed with their defaults filled in (bench:
    the options only, as `bench --train` runs no Lightning trainer)."""
    own = trainer_options()
    unknown = sorted(set(node) - (set(trainer_arguments()) if lightning else set()) - set(own))
    if unknown:
        if not lightning:
            raise ConfigError(f"unknown trainer option {unknown[0]!r} (bench --train takes: {', '.join(own)})")
        raise _unknown_trainer_key(unknown[0])
    options = _merge(TrainerOptionsSchema, {k: node[k] for k in node if k in own}, "trainer")
    return OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(node, resolve=True)), options)


def _check_values(cfg: DictConfig) -> None:
    positive = ["batch_size", "shard_tokens", "batch_rows", "workers", "max_rows", "data.validation_rows", "max_source_len",
                "max_target_len", "checkpoint_every", "optim.lr", "kd.temperature",
                "kd.student_temperature", "kd.cache_topk", "kd.cache_batch_size", "limit", "bootstrap",
                "generation.num_beams", "task.max_new_tokens", "threads", "source_len", "target_len",
                "max_batch", "max_queue", "max_tokens_cap", "max_prompt_tokens", "grace_s"]
    for key in positive:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    for key, (low, high) in KD_RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"{key} must be in [{low}, {high}], got {value}")
    port = OmegaConf.select(cfg, "port")
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"port must be in [0, 65535], got {port}")
    if OmegaConf.select(cfg, "to") is not None:  # export
        block = OmegaConf.select(cfg, "int4.block_size")
        if block is not None and (block < 16 or block & (block - 1)):
            raise ConfigError(f"int4.block_size must be a power of two >= 16, got {block}")
        for key in ("static.batch", "static.prompt_len", "static.capacity", "validation.steps", "validation.batch",
                    "validation.tolerance", "qdq.calibration_prompts", "report.prompts", "report.steps", "fp16.margin",
                    "fp16.calibration_prompts", "fp16.calibration_steps", "fp16.tolerance"):
            if OmegaConf.select(cfg, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {OmegaConf.select(cfg, key)}")
    if OmegaConf.select(cfg, "peft.kind") == "lora":
        if cfg.peft.r <= 0 or cfg.peft.alpha <= 0:
            raise ConfigError(f"peft.r and peft.alpha must be > 0, got r={cfg.peft.r}, alpha={cfg.peft.alpha}")
        if not 0 <= cfg.peft.dropout < 1:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {cfg.peft.dropout}")
        if not cfg.peft.targets:
            raise ConfigError("peft.targets is empty: name at least one of attn, cross_attn, mlp (or one projection)")
    beta = OmegaConf.select(cfg, "kd.beta")
    if beta is not None and OmegaConf.select(cfg, "kd.loss") == "jsd" and not 0 < beta < 1:
        raise ConfigError(f"kd.beta must be in (0, 1) for kd.loss=jsd, got {beta}")


def _explain_hydra_error(error: Exception, stage: str) -> str:
    message = str(error)
    found = re.search(r"Could not find '([^'/]+)/([^']+)'", message)
    if found:
        group, option = found.groups()
        options = groups().get(group, [])
        return f"unknown {group} option {option!r} (choose from: {', '.join(options)})"
    found = re.search(r"Could not override '([^']+)'", message)
    if found:
        key = found.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else None
        return f"unknown config key {key!r}" + (f" (see `slmctl validate {stage} --show` for the keys of {parent})" if parent else
                                                 f" (see `slmctl validate {stage} --show`)")
    found = re.search(r"Key '([^']+)' is not in struct", message)
    if found:
        return f"unknown config key {found.group(1)!r} (see `slmctl validate {stage} --show`)"
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):  # a bad value
        return _explain_value_error(cause.full_key, cause)
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return first_line(" ".join(lines), "invalid config")


def _explain_value_error(key: str, error: Exception) -> str:
    """`kd.loss='kl' is not one of: forward_kl, ...` for a value outside an enum field's
    choices; `batch_size: Value 'abc' ... could not be converted to Integer` for the rest."""
    message = first_line(getattr(error, "msg", None) or str(error), "invalid config")
    found = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", message)
    if found:
        value, valid = found.groups()
        key = re.sub(r"\[\d+\]$", "", key)  # quantize[0] -> quantize
        return f"{key}={value!r} is not one of: {valid}"
    return f"{key}: {message}"


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)

