"""LoRA through PEFT (`peft=lora`): low-rank adapters on slmctl's own Linear layers; saved merged or as an adapter.

`add_lora` injects PEFT's LoRA layers into the model in place and freezes everything else, so
the model keeps its class and the training code is unchanged (only the adapters reach the
optimizer: no gradients or AdamW state for the frozen weights). At the end `save_trained`
writes `model/` either merged into full weights (the default: export, bench and eval take it as
any model) or, with `peft.merge=false`, as a PEFT adapter (adapter_config.json +
adapter_model.safetensors) beside model.json and the tokenizer, over the init model it names.
Parameter names are slmctl's, which `slmctl export hf` keeps, so transformers + peft load the
adapter onto the exported base with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

from slmctl.errors import CheckpointError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file names
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# target -> (block attribute names, projection names); encoder and decoder-only blocks call their
# self-attention `attn`, encoder-decoder decoder blocks `self_attn`
PROJECTIONS = {"attn": (("attn", "self_attn"), ("qkv", "out")), "cross_attn": (("cross_attn",), ("q", "kv", "out")),
               "mlp": (("mlp",), ("fc1", "fc2"))}


def target_pattern(targets: list[str], is_encoder_decoder: bool) -> str:
    """PEFT's target_modules as one regular expression over slmctl's module names."""
    alternatives = []
    for target in targets:
        group, _, projection = str(target).partition(".")
        if group == "cross_attn" and not is_encoder_decoder:
            raise ConfigError("peft.targets: a decoder-only model has no cross-attention (drop cross_attn)")
        owners, projections = PROJECTIONS[group]
        names = (projection,) if projection else projections
        alternatives.append(rf".*\.(?:{'|'.join(owners)})\.(?:{'|'.join(names)})")
    return "|".join(alternatives)


def add_lora(model, settings, run=None, quiet: bool = False):
    """Inject LoRA into `model` (in place) as `settings` (the `peft` config node) says; returns the
    PeftModel around it (for saving and merging). Logs trainable vs total parameters."""
    from peft import LoraConfig, get_peft_model

    from slmctl.model.base import LanguageModel

    if not isinstance(model, LanguageModel):
        raise ConfigError("peft=lora trains slmctl's encoder-decoder and decoder-only models, not model=hf-causal")
    config = LoraConfig(r=int(settings.r), lora_alpha=float(settings.alpha), lora_dropout=float(settings.dropout),
                        target_modules=target_pattern(list(settings.targets), model.config.is_encoder_decoder),
                        bias="none")
    lora = get_peft_model(model, config)
    trainable, total = parameter_counts(model)
    if run is not None and not quiet:
        run.log(f"LoRA r={settings.r} alpha={settings.alpha:g} on {', '.join(map(str, settings.targets))}: "
                f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return lora


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; with LoRA, total counts the frozen weights and the adapters."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def save_trained(model, lora, directory: Path, tokenizer, base: Path | None, merge: bool):
    """Write `model/`: full weights (merged when LoRA trained them), or the adapter over `base`.
    Returns the model as saved (merged LoRA: the plain model again)."""
    from slmctl.model.store import save_model

    if lora is not None and merge:
        model = lora.merge_and_unload()
    if lora is None or merge:
        save_model(model.eval(), directory, tokenizer)
        return model
    save_adapter(lora, directory, tokenizer, base)
    return model


def save_adapter(lora, directory: Path, tokenizer, base: Path) -> None:
    """PEFT's adapter files + model.json, generation.json and the tokenizer, sealed with checksums.json.
    The adapter names its base by path (`base_model_name_or_path`), as PEFT does."""
    from slmctl.atomic import set_new_file_mode
    from slmctl.integrity import seal
    from slmctl.model.store import save_tokenizer, write_description

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = lora.get_base_model()
    lora.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    staging = directory / ".adapter"
    lora.save_pretrained(str(staging), save_embedding_layers=False)  # adapter_config.json, adapter_model.safetensors, PEFT's README.md
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        set_new_file_mode(staging / name)
        (staging / name).replace(directory / name)
    for leftover in staging.iterdir():
        leftover.unlink()
    staging.rmdir()
    write_description(model.config, directory)
    save_tokenizer(tokenizer, directory)
    seal(directory)


def is_adapter_dir(directory: Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file() and not (Path(directory) / "model.safetensors").is_file()


def adapter_base(directory: Path) -> Path:
    """The model directory an adapter was trained over (PEFT's `base_model_name_or_path`)."""
    try:
        adapter = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG} is unreadable: {e}") from None
    base = adapter.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{directory} is a LoRA adapter over {base!r}, which is gone: restore that model "
                              f"(the adapter holds only the low-rank updates)")
    return Path(base)


def apply_adapter(model, directory: Path, merge: bool = True):
    """`model` (the adapter's base, loaded) with the adapter of `directory` applied: merged into the
    weights or as the PeftModel (merge=False)."""
    from peft import PeftModel

    from slmctl.model.store import read_model_config

    if model.config != read_model_config(directory):
        raise CheckpointError(f"{directory}: the adapter's base {adapter_base(directory)} is not the model it was "
                              f"trained on (model.json differs)")
    lora = PeftModel.from_pretrained(model, str(directory))
    return lora.merge_and_unload() if merge else lora


def check_lora_init(settings, init: str | None, option: str) -> None:
    """LoRA adapts an existing model: it needs one to start from."""
    if settings is not None and not init:
        raise ConfigError(f"peft=lora fine-tunes an existing model: give {option}=MODEL (a run or model directory); "
                          f"training from random weights trains every weight")

