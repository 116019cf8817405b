"""The config layer: typed schemas in Hydra's ConfigStore, YAML that only differs from them,
enum choices, the `arch` field, the student as a reused model group, `ls` groups, and the
pretrain objective that follows the architecture."""

import dataclasses
import typing
from enum import Enum
from pathlib import Path

import pytest
import yaml
from omegaconf import MISSING, OmegaConf

import slmctl
import slmctl.config.choices
from slmctl.config.choices import PRETRAIN_OBJECTIVE
from slmctl.config.compose import compose, to_yaml
from slmctl.config.registry import CONF_DIR, GROUP_SCHEMAS, NOT_GROUPS, STAGE_SCHEMAS, groups, schema_entries, stages
from slmctl.errors import ConfigError
from slmctl.model.config import PRESETS, get_preset, matched_decoder_only, model_config_from

CONF = CONF_DIR
NO_SCHEMA = {"trainer": "lightning.Trainer arguments, open-ended", "hardware": "bench --estimate profiles"}


# -- every value declared once ------------------------------------------------------


@pytest.mark.parametrize("stage", ["pretrain", "distill", "eval", "bench", "export", "add-vision", "serve"])
def test_every_stage_composes_typed_by_its_schema(stage):
    assert stage in stages()
    cfg = compose(stage)
    assert OmegaConf.get_type(cfg) is STAGE_SCHEMAS[stage]
    assert not OmegaConf.missing_keys(cfg)


def _schema_of(path: Path, raw: dict) -> type:
    """The schema a conf/ YAML file is based on (and so must not repeat)."""
    if path.parent == CONF:
        return STAGE_SCHEMAS[path.stem]
    key, options = GROUP_SCHEMAS[path.parent.name]
    return options[raw.get(key, _base_kind(path, raw)) if key else ""]


def _base_kind(path: Path, raw: dict) -> str:
    """data/files.yaml sets no `kind`: its base `/schema/data/files@_here_` says it."""
    base = [d for d in raw.get("defaults", []) if isinstance(d, str) and d.startswith("/schema/")]
    return base[0].split("@")[0].rsplit("/", 1)[1]


def _repeats(values: dict, defaults: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in values.items():
        if key == "defaults" or key not in defaults:
            continue
        if isinstance(value, dict) and isinstance(defaults[key], dict) and value:
            found += _repeats(value, defaults[key], f"{prefix}{key}.")
        elif value == defaults[key] and value != MISSING:
            found.append(f"{prefix}{key}: {value!r}")
    return found


def _yaml_files():
    return sorted(p for p in CONF.rglob("*.yaml") if p.parent.name not in NO_SCHEMA)


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CONF)))
def test_no_yaml_repeats_a_schema_default(path):
    raw = yaml.safe_load(path.read_text()) or {}
    defaults = OmegaConf.to_container(OmegaConf.structured(_schema_of(path, raw)))
    assert _repeats(raw, defaults) == [], f"{path.relative_to(CONF)} repeats its schema's defaults: drop these lines"


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CONF)))
def test_each_yaml_names_its_schema_as_its_base(path):
    """Stages and group options start from their schema (the model group's options are typed
    by the field they fill: PretrainSchema.model, DistillSchema.student)."""
    raw = yaml.safe_load(path.read_text()) or {}
    if path.parent.name == "model":
        assert "defaults" not in raw
        return
    name = path.stem if path.parent == CONF else f"{path.parent.name}/{_base_kind(path, raw)}"
    entries = schema_entries()
    base = [d for d in raw["defaults"] if isinstance(d, str) and d.startswith("/schema/")]
    assert base and base[0].split("@")[0].removeprefix("/") in entries
    assert entries[base[0].split("@")[0].removeprefix("/")] is _schema_of(path, raw), name


def test_add_vision_stage_defaults_are_the_schemas():
    """The values conf/add-vision.yaml and VisionStageSchema used to disagree on."""
    cfg = compose("add-vision")
    assert (cfg.stage1.steps, cfg.stage1.lr, cfg.stage1.tower_lr) == (150, 1e-3, None)
    assert (cfg.stage2.steps, cfg.stage2.lr, cfg.stage2.tower_lr) == (300, 3e-4, 3e-4)
    assert cfg.optim.weight_decay == 0.0 and "lr" not in cfg.optim


# -- choices are field types ----------------------------------------------------------


def _choice_fields(schema: type, prefix: str = ""):
    """(key, enum) for every enum-typed field of `schema`, nested schemas included."""
    for f in dataclasses.fields(schema):
        kind = typing.get_type_hints(schema)[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]  # Optional[X] / List[X] -> X
        kind = args[0]
        if isinstance(kind, type) and issubclass(kind, Enum):
            yield prefix + f.name, kind
        elif dataclasses.is_dataclass(kind):
            yield from _choice_fields(kind, f"{prefix}{f.name}.")


CHOICE_FIELDS = sorted({(stage, key, kind) for stage, schema in STAGE_SCHEMAS.items()
                        for key, kind in _choice_fields(schema)}, key=lambda x: (x[0], x[1]))


def test_the_choices_are_enum_fields_not_a_table():
    assert not hasattr(slmctl.config.choices, "KD_CHOICES")
    keys = {key for _, key, _ in CHOICE_FIELDS}
    assert {"kd.loss", "kd.targets", "teacher.dtype", "task.kind", "dtype", "quantize", "vision.tower",
            "model.arch", "student.arch"} <= keys


@pytest.mark.parametrize("stage, key, kind", CHOICE_FIELDS, ids=lambda x: x if isinstance(x, str) else "")
def test_a_bad_choice_is_refused_with_the_choices_named(stage, key, kind):
    value = "[bogus]" if key == "quantize" else "bogus"
    with pytest.raises(ConfigError) as error:
        compose(stage, [f"{key}={value}"])
    assert str(error.value) == f"{key}='bogus' is not one of: {', '.join(m.value for m in kind)}"


def test_a_choice_reads_as_its_string():
    cfg = compose("distill", ["kd.loss=jsd"])
    assert cfg.kd.loss == "jsd" and f"{cfg.kd.loss}" == "jsd" and {"jsd": 1}[cfg.kd.loss] == 1
    assert "loss: jsd" in to_yaml(cfg)


@pytest.mark.parametrize("override, message", [
    ("batch_size=abc", "batch_size: Value 'abc' of type 'str' could not be converted to Integer"),
    ("model.d_model=wide", "model.d_model: Value 'wide' of type 'str' could not be converted to Integer"),
    ("optimm.lr=1", "unknown config key 'optimm' (valid keys: "),
    ("+extra=1", "unknown config key 'extra' (valid keys: "),
    ("model.widht=8", "unknown config key 'model.widht' (valid keys of model: preset, arch,"),
    ("data.kind=nope", "data.kind='nope' is not one of: synthetic, files, hub, prepared, shapes, images"),
    ("model=350m", "unknown model option '350m' (choose from: 1b, 330m,"),
    ("tokenizer=hf", "tokenizer.path is required: set tokenizer.path=VALUE"),
])
def test_composition_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as error:
        compose("pretrain", [override])
    assert message in str(error.value) and "\n" not in str(error.value)


# -- arch is a field ------------------------------------------------------------------


def test_no_code_reads_an_architecture_from_a_preset_name():
    package = Path(slmctl.__file__).parent
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert 'startswith("deconly' not in text and "removeprefix(\"deconly" not in text, path


@pytest.mark.parametrize("size", ["tiny", "small", "330m"])
def test_the_arch_field_makes_the_matched_decoder_only_baseline(size):
    by_option = compose("pretrain", [f"model=deconly-{size}"]).model
    by_field = compose("pretrain", [f"model={size}", "model.arch=deconly"]).model
    assert by_option.arch == "deconly" and by_option.preset == size
    assert model_config_from(by_option) == model_config_from(by_field) == PRESETS[f"deconly-{size}"]
    # a changed vocabulary re-matches the baseline to the encoder-decoder with the same change
    wider = model_config_from(by_option, vocab_size=1024)
    assert wider == matched_decoder_only(get_preset(size).replace(vocab_size=1024))
    assert model_config_from(by_option, n_decoder_layers=3).n_decoder_layers == 3


def test_a_preset_of_another_arch_is_refused():
    node = compose("pretrain", ["model.preset=deconly-tiny"]).model
    with pytest.raises(ConfigError, match="model.preset=deconly-tiny is a deconly preset, but model.arch=encdec"):
        model_config_from(node)


# -- the student is the model group, reused --------------------------------------------


def test_student_is_the_model_group_at_student():
    assert groups()["student"] == groups()["model"] and not (CONF / "student").exists()  # listed, not a directory
    for size in ("tiny", "330m", "deconly-small"):
        student = compose("distill", [f"student={size}"]).student
        model = compose("pretrain", [f"model={size}"]).model
        assert OmegaConf.to_container(student) == {**OmegaConf.to_container(model), "init": None}
    assert compose("distill").student.preset == "small"  # distill's menu choice
    cfg = compose("distill", ["student=330m", "student.init=runs/pretrain/latest", "student.d_model=512"])
    assert (cfg.student.preset, cfg.student.init, cfg.student.d_model) == ("330m", "runs/pretrain/latest", 512)
    assert model_config_from(cfg.student) == PRESETS["330m"].replace(d_model=512)
    with pytest.raises(ConfigError, match="unknown model option 'huge'"):
        compose("distill", ["student=huge"])
    with pytest.raises(ConfigError, match="unknown config key 'student.inti'"):
        compose("distill", ["student.inti=x"])


# -- ls -----------------------------------------------------------------------------


def test_ls_lists_only_groups_a_command_line_can_choose():
    found = groups()
    assert "hardware" not in found and "hardware" in NOT_GROUPS and (CONF / "hardware").is_dir()
    stage_of = {"model": "pretrain", "data": "pretrain", "tokenizer": "pretrain", "objective": "pretrain",
                "trainer": "pretrain", "teacher": "distill", "student": "distill", "task": "eval", "judge": "eval",
                "vision": "add-vision", "peft": "pretrain"}
    assert set(found) == set(stage_of)
    for group, options in found.items():
        for option in options:  # each composes, or names the value it needs
            try:
                cfg = compose(stage_of[group], [f"{group}={option}"])
            except ConfigError as e:
                assert "is required: set" in str(e), (group, option, str(e))
                continue
            if group == "model":  # the objective follows the composed model's arch (read without composing twice)
                assert cfg.objective.name == PRETRAIN_OBJECTIVE[cfg.model.arch], option


# -- pretrain's objective follows the architecture -----------------------------------------


@pytest.mark.parametrize("model, objective", [("tiny", "prefix_lm"), ("deconly-tiny", "causal_lm"),
                                              ("hf-causal", "causal_lm")])
def test_the_default_objective_follows_the_arch(model, objective):
    assert compose("pretrain", [f"model={model}"]).objective.name == objective
    # objective.* overrides apply to the arch's default
    assert compose("pretrain", [f"model={model}", "objective.packing=false"]).objective.packing is False


def test_a_named_objective_is_kept():
    assert compose("pretrain", ["model=hf-causal", "objective=prefix_lm"]).objective.name == "prefix_lm"
    assert compose("pretrain", ["model=tiny", "objective=span_corruption"]).objective.name == "span_corruption"
    assert compose("pretrain", ["model=tiny", "model.arch=deconly"]).objective.name == "causal_lm"
