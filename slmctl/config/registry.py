"""What exists: the stages and their schemas and modules, the config groups and their schemas,
and where `conf/` is. Each conf/ YAML names its schema as `/schema/<name>@_here_` in its
defaults list, so the YAML holds only what differs from the schema."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from slmctl.config.add_vision import AddVisionSchema, VisionSchema
from slmctl.config.bench import BenchSchema
from slmctl.config.data import (
    BpeTokenizerSchema,
    CausalLMSchema,
    FilesDataSchema,
    HFTokenizerSchema,
    HubDataSchema,
    ImagesDataSchema,
    PrefixLMSchema,
    PreparedDataSchema,
    RunTokenizerSchema,
    Seq2SeqSchema,
    ShapesDataSchema,
    SpanCorruptionSchema,
    SyntheticDataSchema,
    TeacherTokenizerSchema,
)
from slmctl.config.distill import DistillSchema, TeacherSchema
from slmctl.config.eval import EvalSchema
from slmctl.config.export import ExportSchema
from slmctl.config.model import ModelSchema
from slmctl.config.prepare import PrepareSchema
from slmctl.config.pretrain import PretrainSchema
from slmctl.config.serve import ServeSchema
from slmctl.config.task import JudgeSchema, TaskSchema
from slmctl.config.training import LoraSchema

CONF_DIR = Path(os.environ.get("SLMCTL_CONF", Path(__file__).resolve().parents[2] / "conf"))


# directories of conf/ that are not GROUP=OPTION choices, and why
NOT_GROUPS = {"hardware": "roofline profiles read by `slmctl bench --estimate NAME`, not a config group"}


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


@functools.cache
def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore, once per process (the ConfigStore keeps them, and
    storing converts every dataclass again: 40% of a composition's time when done every time)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in schema_entries().items():
        group, _, option = name.rpartition("/")
        store.store(group=group, name=option, node=schema)


# each has run(cfg, run)
STAGE_MODULES = {"prepare": "slmctl.train.prepare",
                 "pretrain": "slmctl.train.pretrain", "distill": "slmctl.train.distill", "eval": "slmctl.eval.evaluate",
                 "bench": "slmctl.bench.stage", "export": "slmctl.export.stage",
                 "add-vision": "slmctl.train.add_vision", "serve": "slmctl.serve.stage"}


def stage_module(stage: str):
    """The module whose `run(cfg, run)` carries out `stage`."""
    import importlib

    return importlib.import_module(STAGE_MODULES[stage])


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
