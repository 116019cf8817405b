"""Hydra composition of `conf/`, a typed schema for the composed config, and one-line errors.

`compose(stage, overrides)` composes `conf/<stage>.yaml` with `key=value` overrides
(Hydra's compose API: no Hydra run directory, no logging changes), then checks every
group against its schema: an unknown key, an unknown group option, a wrong type or a
missing required value raises `ConfigError` with one line naming it and the valid choices.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from slmctl.errors import UserError, first_line
from slmctl.model.config import ModelConfig

CONF_DIR = Path(os.environ.get("SLMCTL_CONF", Path(__file__).resolve().parent.parent / "conf"))
HIDDEN_GROUPS = {"common"}  # building blocks of other groups, not choices


class ConfigError(UserError, ValueError):
    """A bad composition or value; the message is one line naming the problem and the fix."""


# ---------------------------------------------------------------------------
# Schemas (one dataclass per group option kind)


@dataclass
class OptimSchema:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1


@dataclass
class HFCausalSchema:
    model_type: str = "llama"
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True


def _model_schema() -> type:
    """`preset` plus every ModelConfig field as an optional override."""
    overridable = [(f.name, Optional[f.type if not isinstance(f.type, str) else _TYPES[f.type]], None)
                   for f in dataclasses.fields(ModelConfig) if f.name not in ("name", "arch")]
    return dataclasses.make_dataclass(
        "ModelSchema", [("preset", str, "small"), *overridable, ("hf", Optional[HFCausalSchema], None)])


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
ModelSchema = _model_schema()
# a distillation student: a model preset, or `init` = an existing model / run to continue from
StudentSchema = dataclasses.make_dataclass("StudentSchema", [("init", Optional[str], None)], bases=(ModelSchema,))


@dataclass
class ColumnsSchema:
    text: str = "text"
    source: str = "source"
    target: str = "target"


@dataclass
class SyntheticDataSchema:
    kind: str = "synthetic"
    seed: int = 0
    n_people: int = 5000
    train_examples: int = 20000
    validation_examples: int = 200
    min_facts: int = 8
    max_facts: int = 16


@dataclass
class FilesDataSchema:
    kind: str = "files"
    train: str = "???"
    validation: Optional[str] = None
    validation_fraction: float = 0.02
    columns: ColumnsSchema = field(default_factory=ColumnsSchema)


@dataclass
class ShapesDataSchema:
    kind: str = "shapes"
    seed: int = 0
    train_examples: int = 4000
    validation_examples: int = 100
    max_shapes: int = 4


@dataclass
class ImagesDataSchema:
    kind: str = "images"
    train: str = "???"
    validation: Optional[str] = None
    validation_fraction: float = 0.05
    skip_bad: bool = False
    allow_outside_root: bool = False


@dataclass
class HubDataSchema:
    kind: str = "hub"
    id: str = "???"
    subset: Optional[str] = None
    train_split: str = "train"
    validation_split: Optional[str] = "validation"
    columns: ColumnsSchema = field(default_factory=ColumnsSchema)


@dataclass
class BpeTokenizerSchema:
    kind: str = "bpe"
    vocab_size: int = 4096
    min_frequency: int = 2
    n_sentinels: int = 32
    max_training_texts: int = 50000


@dataclass
class HFTokenizerSchema:
    kind: str = "hf"
    path: str = "???"
    n_sentinels: int = 32


@dataclass
class RunTokenizerSchema:
    kind: str = "run"
    path: str = "???"


@dataclass
class TeacherTokenizerSchema:
    kind: str = "teacher"
    n_sentinels: int = 32


@dataclass
class TeacherSchema:
    kind: str = "hf"  # hf: a hub id or save_pretrained directory; run: a decoder-only run of ours
    path: str = "???"
    tokenizer: Optional[str] = None  # hf only: where its tokenizer is, if not beside the weights
    dtype: str = "auto"
    trust_remote_code: bool = False
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
class PretrainSchema:
    seed: int = 0
    init: Optional[str] = None
    resume: Optional[str] = None
    batch_size: int = 16
    max_source_len: int = 256
    max_target_len: int = 64
    checkpoint_every: int = 100
    optim: OptimSchema = field(default_factory=OptimSchema)
    model: Any = None
    data: Any = None
    tokenizer: Any = None
    objective: Any = None
    trainer: Any = None


@dataclass
class KDSchema:
    alpha: float = 0.5
    loss: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    targets: str = "gold"
    on_policy_prob: float = 0.5
    student_temperature: float = 1.0
    student_top_k: int = 0
    teacher_temperature: float = 0.0
    cross_tokenizer: str = "error"
    cache: bool = False
    cache_topk: int = 64
    cache_dtype: str = "float16"
    cache_batch_size: int = 32


@dataclass
class DistillSchema:
    seed: int = 0
    resume: Optional[str] = None
    control: bool = False
    batch_size: int = 16
    max_source_len: int = 256
    max_target_len: int = 64
    checkpoint_every: int = 100
    kd: KDSchema = field(default_factory=KDSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    teacher: Any = None
    student: Any = None
    data: Any = None
    tokenizer: Any = None
    trainer: Any = None


@dataclass
class TaskSchema:
    name: str = "???"
    kind: str = "columns"  # columns | squad | synthetic | shapes | images
    hub_id: Optional[str] = None
    subset: Optional[str] = None
    split: str = "validation"
    data_files: Optional[str] = None  # local json/jsonl/parquet/csv with the task's columns
    prompt: str = "{source}"  # template over the row's columns
    reference: str = "target"  # the reference column (columns kind)
    id: Optional[str] = "id"  # the id column; row numbers when absent
    metrics: list = field(default_factory=lambda: ["rougeLsum"])
    max_new_tokens: int = 64
    # synthetic kind: the embedded world's held-out questions
    seed: int = 0
    n_people: int = 5000
    n: int = 200
    min_facts: int = 8
    max_facts: int = 16
    max_shapes: int = 4  # shapes kind: shapes per scene, 1 to this


@dataclass
class JudgeSchema:
    kind: str = "none"  # none | local | endpoint
    path: Optional[str] = None  # local: a causal LM directory or hub id
    endpoint: Optional[str] = None  # endpoint: an OpenAI-compatible base URL, e.g. http://localhost:8000/v1
    model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    max_new_tokens: int = 64
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None  # default ~/.cache/slmctl


@dataclass
class GenerationSchema:
    max_new_tokens: Optional[int] = None  # null: the task's
    num_beams: int = 1
    length_penalty: float = 1.0


@dataclass
class EvalSchema:
    models: list = field(default_factory=list)
    tasks: list = field(default_factory=list)  # several task names; empty: the `task` group's choice
    predictions: Optional[str] = None
    resume: Optional[str] = None
    limit: Optional[int] = None
    batch_size: int = 16
    max_source_len: int = 1024
    bootstrap: int = 1000
    seed: int = 0
    device: str = "cpu"
    generation: GenerationSchema = field(default_factory=GenerationSchema)
    task: Any = None
    judge: Any = None


@dataclass
class BenchSchema:
    models: list = field(default_factory=list)
    input_lens: list = field(default_factory=lambda: [512])
    output_lens: list = field(default_factory=lambda: [64])
    batch: list = field(default_factory=lambda: [1])
    repeat: int = 3
    warmup: int = 1
    dtype: str = "float32"
    runtime: str = "auto"
    device: str = "cpu"
    threads: Optional[int] = None
    format: Optional[str] = None
    estimate: Optional[str] = None  # a conf/hardware profile: add roofline predictions
    image_size: list = field(default_factory=lambda: [336, 336])  # vision models: the image each prompt carries
    seed: int = 0
    resume: Optional[str] = None
    isolate: bool = False  # each model measured in its own child process


@dataclass
class VisionSchema:
    tower: str = "vit"  # vit | clip | siglip
    path: Optional[str] = None
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    feature_layer: int = -2
    anyres: bool = True
    grids: list = field(default_factory=lambda: [[1, 1], [1, 2], [2, 1], [2, 2], [1, 3], [3, 1]])
    compress: str = "avgpool"
    compress_factor: int = 2
    max_tokens_per_image: int = 64
    projector: str = "mlp2x_gelu"
    pixel_mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    pixel_std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    train_tower: bool = False


@dataclass
class VisionStageSchema:
    steps: int = 100
    lr: float = 1e-3
    tower_lr: Optional[float] = None


@dataclass
class VisionOptimSchema:
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class AddVisionSchema:
    source: Optional[str] = None
    seed: int = 0
    resume: Optional[str] = None
    batch_size: int = 16
    max_source_len: int = 256
    max_target_len: int = 16
    stage1: VisionStageSchema = field(default_factory=VisionStageSchema)
    stage2: VisionStageSchema = field(default_factory=VisionStageSchema)
    optim: VisionOptimSchema = field(default_factory=VisionOptimSchema)
    validation_every: int = 100
    checkpoint_every: int = 100
    vision: Any = None
    data: Any = None
    trainer: Any = None


@dataclass
class StaticShapeSchema:
    enabled: bool = False
    batch: int = 1
    prompt_len: int = 512
    capacity: int = 128


@dataclass
class ValidationSchema:
    prompt_lens: list = field(default_factory=lambda: [8, 33, 100])
    steps: int = 32
    batch: int = 2
    tolerance: float = 1e-4
    seed: Optional[int] = None


@dataclass
class Int8Schema:
    per_channel: bool = True


@dataclass
class QdqSchema:
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    calibration_prompts: int = 16
    calibration_steps: int = 8


@dataclass
class QuantReportSchema:
    prompts: int = 32
    steps: int = 32
    eval_limit: int = 50
    input_len: int = 128
    output_len: int = 32
    repeat: int = 3


@dataclass
class ExportSchema:
    to: str = "onnx"
    source: Optional[str] = None  # the model: a model dir, a run or a preset
    quantize: list = field(default_factory=list)
    external_data: str = "auto"
    static: StaticShapeSchema = field(default_factory=StaticShapeSchema)
    validation: ValidationSchema = field(default_factory=ValidationSchema)
    int8: Int8Schema = field(default_factory=Int8Schema)
    qdq: QdqSchema = field(default_factory=QdqSchema)
    report: QuantReportSchema = field(default_factory=QuantReportSchema)
    threads: Optional[int] = None
    device: str = "cpu"
    seed: int = 0
    task: Any = None


KD_CHOICES = {"kd.loss": ("forward_kl", "reverse_kl", "jsd"), "kd.targets": ("gold", "teacher", "student", "mix"),
              "kd.cross_tokenizer": ("error", "uld"), "kd.cache_dtype": ("float16", "bfloat16", "float32"),
              "teacher.dtype": ("auto", "float32", "bfloat16", "float16"),
              "task.kind": ("columns", "squad", "synthetic", "shapes", "images"),
              "dtype": ("float32", "bfloat16", "float16"), "runtime": ("auto", "torch", "onnx"), "format": ("json", "csv", "md"),
              "to": ("onnx",), "vision.tower": ("vit", "clip", "siglip"), "vision.compress": ("none", "avgpool", "ldpv2"),
              "vision.projector": ("linear", "mlp2x_gelu"), "external_data": ("auto", "always", "never"),
              "qdq.activation_type": ("uint8", "uint16", "int8", "int16"), "qdq.weight_type": ("uint8", "int8")}
KD_RANGES = {"kd.alpha": (0.0, 1.0), "kd.on_policy_prob": (0.0, 1.0)}


GROUP_SCHEMAS: dict[str, tuple[str, dict[str, type]]] = {
    # group -> (discriminating key, {value: schema})
    "model": ("", {"": ModelSchema}),
    "student": ("", {"": StudentSchema}),
    "teacher": ("kind", {"hf": TeacherSchema, "run": TeacherSchema}),
    "task": ("", {"": TaskSchema}),
    "judge": ("kind", {"none": JudgeSchema, "local": JudgeSchema, "endpoint": JudgeSchema}),
    "data": ("kind", {"synthetic": SyntheticDataSchema, "files": FilesDataSchema, "hub": HubDataSchema,
                      "shapes": ShapesDataSchema, "images": ImagesDataSchema}),
    "vision": ("", {"": VisionSchema}),
    "tokenizer": ("kind", {"bpe": BpeTokenizerSchema, "hf": HFTokenizerSchema, "run": RunTokenizerSchema,
                           "teacher": TeacherTokenizerSchema}),
    "objective": ("name", {"prefix_lm": PrefixLMSchema, "span_corruption": SpanCorruptionSchema,
                           "seq2seq": Seq2SeqSchema, "causal_lm": CausalLMSchema}),
}
STAGE_SCHEMAS = {"pretrain": PretrainSchema, "distill": DistillSchema, "eval": EvalSchema, "bench": BenchSchema,
                 "export": ExportSchema, "add-vision": AddVisionSchema}
# each has run(cfg, run)
STAGE_MODULES = {"pretrain": "slmctl.train.pretrain", "distill": "slmctl.train.distill", "eval": "slmctl.eval.evaluate",
                 "bench": "slmctl.bench.stage", "export": "slmctl.export.stage",
                 "add-vision": "slmctl.train.add_vision"}


def stage_module(stage: str):
    """The module whose `run(cfg, run)` carries out `stage`."""
    import importlib

    return importlib.import_module(STAGE_MODULES[stage])


# ---------------------------------------------------------------------------
# Listing


def stages() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def groups() -> dict[str, list[str]]:
    """Config groups and their options, e.g. {"model": ["1b", "330m", ...]}."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(CONF_DIR.iterdir()) if d.is_dir() and d.name not in HIDDEN_GROUPS}


# ---------------------------------------------------------------------------
# Composition


def compose(stage: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The validated, resolved config of `stage` with Hydra `overrides` applied."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    if stage not in stages():
        raise ConfigError(f"unknown stage {stage!r} (choose from: {', '.join(stages())})")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}: expected key=value (e.g. model=tiny or trainer.max_steps=50)")
    overrides = [_trainer_override(item) for item in overrides]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="slmctl"):
            cfg = hydra_compose(config_name=stage, overrides=list(overrides))
    except HydraException as e:
        message = _explain_hydra_error(str(e), stage)
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
        raise ConfigError(first_line(str(e)), "invalid config") from None
    return validate(cfg, stage)


def validate(cfg: DictConfig, stage: str) -> DictConfig:
    """Check `cfg` against the stage and group schemas; returns it typed and resolved."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(first_line(str(e)), "invalid config") from None
    checked = {}
    for group, (key, options) in GROUP_SCHEMAS.items():
        if group not in cfg:
            continue
        node = cfg[group]
        kind = node.get(key) if key else ""
        if kind not in options:
            raise ConfigError(f"{group}.{key}={kind!r} is not one of: {', '.join(options)}")
        checked[group] = _merge(options[kind], node, group)
    if "trainer" in cfg:
        checked["trainer"] = _check_trainer(cfg.trainer)
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
        raise ConfigError(f"{full}: {message}") from None


def trainer_arguments() -> list[str]:
    """The lightning.Trainer arguments a config may set (not logger/callbacks/plugins: slmctl owns those)."""
    from lightning.pytorch import Trainer

    return [p for p in inspect.signature(Trainer.__init__).parameters if p not in ("self", "logger", "callbacks", "plugins")]


def _trainer_override(item: str) -> str:
    """`trainer.X=v` may set any Trainer argument, also one the trainer config does not list
    (rewritten to Hydra's add-or-override `++trainer.X=v`)."""
    key = item.split("=", 1)[0]
    if not key.startswith("trainer.") or key.count(".") != 1:
        return item
    name = key.split(".", 1)[1]
    if name not in trainer_arguments():
        raise ConfigError(f"unknown trainer argument {name!r} (trainer.* takes lightning.Trainer arguments: "
                          f"{', '.join(trainer_arguments())})")
    return "++" + item


def _check_trainer(node) -> DictConfig:
    unknown = sorted(set(node) - set(trainer_arguments()))
    if unknown:
        raise ConfigError(f"unknown trainer argument {unknown[0]!r} (trainer.* takes lightning.Trainer arguments: "
                          f"{', '.join(trainer_arguments())})")
    return node


def _check_values(cfg: DictConfig) -> None:
    positive = ["batch_size", "max_source_len", "max_target_len", "checkpoint_every", "optim.lr", "kd.temperature",
                "kd.student_temperature", "kd.cache_topk", "kd.cache_batch_size", "limit", "bootstrap",
                "generation.num_beams", "task.max_new_tokens", "threads"]
    for key in positive:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    for key, choices in KD_CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")
    for key, (low, high) in KD_RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"{key} must be in [{low}, {high}], got {value}")
    quantize = OmegaConf.select(cfg, "quantize")
    if OmegaConf.select(cfg, "to") is not None and quantize is not None:
        for method in quantize:
            if method not in ("int8", "qdq"):
                raise ConfigError(f"quantize={method!r} is not one of: int8, qdq")
        for key in ("static.batch", "static.prompt_len", "static.capacity", "validation.steps", "validation.batch",
                    "validation.tolerance", "qdq.calibration_prompts", "report.prompts", "report.steps"):
            if OmegaConf.select(cfg, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {OmegaConf.select(cfg, key)}")
    beta = OmegaConf.select(cfg, "kd.beta")
    if beta is not None and OmegaConf.select(cfg, "kd.loss") == "jsd" and not 0 < beta < 1:
        raise ConfigError(f"kd.beta must be in (0, 1) for kd.loss=jsd, got {beta}")


def _explain_hydra_error(message: str, stage: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
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
    return first_line(" ".join(lines), "invalid config")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def model_config_from(cfg: DictConfig, **fallbacks) -> ModelConfig:
    """The ModelConfig a `model` group node describes (preset + non-null overrides), with
    `fallbacks` (e.g. the tokenizer's vocab size and token ids) used where the node is null."""
    from slmctl.model.config import get_preset, matched_decoder_only

    node = OmegaConf.to_container(cfg, resolve=True)
    changes = {k: v for k, v in fallbacks.items() if node.get(k) is None}
    changes |= {k: v for k, v in node.items() if k not in ("preset", "hf", "init") and v is not None}
    try:
        preset = node["preset"]
        if preset.startswith("deconly-") and "n_decoder_layers" not in changes:
            # Re-match the baseline to its encoder-decoder with the same changes (e.g. the
            # tokenizer's vocabulary), so the comparison stays at equal parameter count.
            encdec = get_preset(preset.removeprefix("deconly-")).replace(**changes)
            return matched_decoder_only(encdec).replace(**{k: v for k, v in changes.items() if k != "n_encoder_layers"})
        return get_preset(preset).replace(**changes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
