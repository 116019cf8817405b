"""Hydra composition of `conf/` over the typed schemas, validation, and one-line errors.

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
import re

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from slmctl.config.choices import PRETRAIN_OBJECTIVE, Arch
from slmctl.config.distill import KD_RANGES
from slmctl.config.registry import CONF_DIR, GROUP_SCHEMAS, PACKAGE_REUSE, STAGE_SCHEMAS, groups, register_schemas, stages
from slmctl.config.training import TrainerOptionsSchema
from slmctl.errors import ConfigError, first_line


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
        arch = pretrain_arch(overrides) or \
            _hydra_compose(stage, [o for o in overrides if not o.lstrip("+~").startswith("objective.")]).model.arch
        overrides = [*overrides, f"objective={PRETRAIN_OBJECTIVE[Arch(arch)]}"]
    return validate(_hydra_compose(stage, overrides), stage)


def pretrain_arch(overrides: list[str]) -> str | None:
    """The pretrain model's architecture, read from `model=` / `model.arch=` and conf/model/<option>.yaml
    where that is all it takes; None otherwise (the caller composes: 0.3-0.5 s, a second compose of
    every `slmctl pretrain` before this)."""
    option = arch = None
    for item in overrides:
        key, value = item.split("=", 1)
        if key == "model":
            option = value
        elif key == "model.arch":
            arch = value
        elif key.lstrip("+~") in ("model", "model.arch"):  # added or deleted: Hydra's to resolve
            return None
    if arch is None:
        path = CONF_DIR / "model" / f"{option or _default_option('pretrain', 'model')}.yaml"
        node = yaml.safe_load(path.read_text()) if path.is_file() else None
        if not isinstance(node, dict) or "defaults" in node:
            return None
        arch = node.get("arch", Arch.encdec.value)
    return arch if arch in {a.value for a in Arch} else None


def _default_option(stage: str, group: str) -> str | None:
    """The option `group` takes in conf/<stage>.yaml's defaults list."""
    for entry in yaml.safe_load((CONF_DIR / f"{stage}.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict) and group in entry:
            return entry[group]
    return None


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
    except ValueError as e:  # Hydra's own checks of an override's shape (`peft=0`: a group given a number)
        raise ConfigError(f"{first_line(e, 'invalid override')} ({' '.join(overrides)})") from None


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
    if "trainer" in cfg and "trainer" in STAGE_SCHEMAS[stage].__dataclass_fields__:  # else: an unknown key, below
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
    if lightning:
        _check_trainer_types(node, own)
    options = _merge(TrainerOptionsSchema, {k: node[k] for k in node if k in own}, "trainer")
    return OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(node, resolve=True)), options)


def _check_trainer_types(node, own: list[str]) -> None:
    """Each Lightning argument against lightning.Trainer's own annotation, so that `trainer.max_steps=abc` is a
    one-line error naming the key before any run exists (not a comparison failing deep inside Lightning)."""
    import typing

    from lightning.pytorch import Trainer
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    hints, values = typing.get_type_hints(Trainer.__init__), OmegaConf.to_container(node, resolve=True)
    for name, value in values.items():
        if name in own or name not in hints or (name, value) == ("precision", "auto"):  # auto: slmctl.train.precision
            continue
        try:
            adapter = TypeAdapter(hints[name], config=ConfigDict(arbitrary_types_allowed=True))
        except Exception:  # an annotation pydantic cannot check: Lightning checks it
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as e:
            errors = e.errors()
            why = errors[0]["msg"] if len(errors) == 1 else "none of the values lightning.Trainer accepts there"
            raise ConfigError(f"trainer.{name}={value!r}: {why[0].lower() + why[1:]}") from None


def _check_values(cfg: DictConfig) -> None:
    positive = ["batch_size", "shard_tokens", "batch_rows", "workers", "max_rows", "data.validation_rows", "max_source_len",
                "max_target_len", "checkpoint_every", "optim.lr", "kd.temperature",
                "kd.student_temperature", "kd.cache_topk", "kd.cache_batch_size", "limit", "bootstrap",
                "generation.num_beams", "task.max_new_tokens", "threads", "source_len", "target_len",
                "max_batch", "max_queue", "max_tokens_cap", "max_prompt_tokens", "grace_s", "draft_tokens",
                "generation.draft_tokens", "draft_ngram", "generation.draft_ngram"]
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
