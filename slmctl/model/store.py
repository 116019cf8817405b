"""The plain model directory: `model.safetensors` + `model.json` (+ `generation.json`, tokenizer
files, and `checksums.json` last).

Files are written to a temporary name and renamed, so a killed process never leaves a
half-written file that looks whole; `seal` (slmctl.integrity) covers every file with its sha256.
Adapters (slmctl.model.lora), vision parts (slmctl.model.vlm) and reference checkpoints
(slmctl.model.reference) build on these; slmctl.model.directory loads any of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slmctl.atomic import atomic_write_text, set_new_file_mode
from slmctl.errors import CheckpointError
from slmctl.files import MODEL_CONFIG_FILE
from slmctl.integrity import seal
from slmctl.model.base import LanguageModel
from slmctl.model.build import build_model
from slmctl.model.config import ModelConfig
from slmctl.model.generation import GenerationConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = MODEL_CONFIG_FILE  # model.json
GENERATION_FILE = "generation.json"
TIED_KEYS = ("lm_head.weight",)  # never stored: the LM head is the embedding


def save_model(model: LanguageModel, directory: str | Path, tokenizer=None,
               generation_config: GenerationConfig | None = None) -> Path:
    """Write the model directory, sealed with checksums.json; returns its path. Weights are
    stored contiguous, in the model's dtype, with the tied LM head left out. A caller that adds
    files afterwards must call `seal(directory)` again when it is done."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in TIED_KEYS}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "slmctl": "1"})
        set_new_file_mode(tmp)  # mkstemp and safetensors leave 0600, which would survive the rename
        os.replace(tmp, directory / WEIGHTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_description(model.config, directory, generation_config)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    seal(directory)
    return directory


def write_description(config: ModelConfig, directory: Path, generation_config: GenerationConfig | None = None) -> None:
    """model.json and generation.json (decoding defaults: greedy, the model's eos and pad)."""
    config.save_json(directory / CONFIG_FILE)
    gen = generation_config or GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    atomic_write_text(directory / GENERATION_FILE, json.dumps(dataclasses.asdict(gen), indent=2) + "\n")


def save_tokenizer(tokenizer, directory: Path) -> None:
    from slmctl.data.tokenizer import TextTokenizer

    if isinstance(tokenizer, TextTokenizer):  # its files plus our record of the special tokens
        tokenizer.save(directory)
    elif hasattr(tokenizer, "save_pretrained"):  # a Hugging Face tokenizer: all its files
        tokenizer.save_pretrained(str(directory))
    else:  # a `tokenizers.Tokenizer`
        atomic_write_text(directory / "tokenizer.json", tokenizer.to_str())


def load_plain_model(model_dir: Path, **config_overrides) -> LanguageModel:
    """The text model of a model directory (its checksums already verified by the caller):
    model.json (with `config_overrides`), then the weights, built on the meta device and
    loaded strictly."""
    cfg = read_model_config(model_dir)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    check_tokenizer_fits(model_dir, cfg.vocab_size)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{model_dir} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is unreadable (truncated or corrupt?): {e}") from None
    with torch.device("meta"):
        model = build_model(cfg)
    load_state(model, state, source=str(weights))
    return model


def read_model_config(model_dir: Path) -> ModelConfig:
    """The architecture of a model directory: its model.json, or the config.json of a `slmctl
    export hf` directory (the same fields, among transformers' own)."""
    from slmctl.files import HF_CONFIG_FILE, is_slmctl_transformers_dir

    if (model_dir / CONFIG_FILE).is_file():
        config_file, fields = model_dir / CONFIG_FILE, None
    elif is_slmctl_transformers_dir(model_dir):
        config_file = model_dir / HF_CONFIG_FILE
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        fields = {k: v for k, v in json.loads(config_file.read_text(encoding="utf-8")).items() if k in names}
    else:
        raise CheckpointError(f"{model_dir} is not a model directory: no {CONFIG_FILE} in it")
    try:
        return ModelConfig.load_json(config_file) if fields is None else ModelConfig.from_dict(fields)
    except (ValueError, TypeError) as e:  # json errors are ValueErrors
        raise CheckpointError(f"{config_file}: {e}") from None


def check_tokenizer_fits(model_dir: Path, vocab_size: int) -> None:
    """A tokenizer saved beside the weights must not produce ids past the embedding table:
    such a pair was put together from two different models."""
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    except Exception as e:  # tokenizers raises its own exception type
        raise CheckpointError(f"{tokenizer_file} is unreadable: {e}") from None
    if size > vocab_size:
        raise CheckpointError(f"{model_dir}: the tokenizer has {size} tokens but the model's vocabulary has {vocab_size}; "
                              f"the tokenizer is not this model's")


def load_state(model: LanguageModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load `state` into `model` (which may live on the meta device), with one
    line naming every missing, unexpected or mis-shaped tensor."""
    expected = {k: v for k, v in model.state_dict().items() if k not in TIED_KEYS}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                       if k in state and state[k].shape != v.shape)
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}" + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    if misshaped:
        problems.append(f"wrong shape {', '.join(misshaped[:5])}")
    if problems:
        raise CheckpointError(f"{source} does not fit a {model.config.name} model: " + "; ".join(problems))
    model.load_state_dict(state, strict=False, assign=True)
