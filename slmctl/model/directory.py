"""Model directories: `model.safetensors` + `model.json` (+ `generation.json`, tokenizer files,
and `checksums.json` last).

Files are written to a temporary name and renamed, so a killed process never leaves
a half-written file that looks whole. `checksums.json` (sha256 and size of every other file)
lets a directory copied out of its run be checked on its own: loading refuses a changed file
unless SLMCTL_SKIP_CHECKSUMS=1. Loading accepts a model directory or a
reference-format checkpoint file (`.pt`); slmctl.refs resolves runs and the rest to these.
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

from slmctl.atomic import atomic_write_bytes, atomic_write_text, set_new_file_mode  # noqa: F401 (re-exported)
from slmctl.errors import UserError, first_line
from slmctl.files import MODEL_CONFIG_FILE
from slmctl.model.base import LanguageModel
from slmctl.model.config import ModelConfig, get_preset, vocab_size_for
from slmctl.model.generation import GenerationConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = MODEL_CONFIG_FILE  # model.json
GENERATION_FILE = "generation.json"
CHECKSUMS_FILE = "checksums.json"  # written last: {relative path: {"sha256", "size"}} of every other file
SKIP_CHECKSUMS = "SLMCTL_SKIP_CHECKSUMS"  # =1: load a directory whose files were changed on purpose
TIED_KEYS = ("lm_head.weight",)  # never stored: the LM head is the embedding


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the problem."""


def build_model(config: str | ModelConfig = "330m", tokenizer=None, seed: int | None = None, **overrides) -> LanguageModel:
    """A freshly initialised model from a preset name or a `ModelConfig`.

    With a `tokenizer`, the vocabulary follows it (padded to a multiple of 128) and the
    pad/bos/eos ids are taken from it. `overrides` replace config fields.
    """
    from slmctl.model.deconly import DecoderOnlyLM
    from slmctl.model.encdec import EncoderDecoderLM

    cfg = get_preset(config) if isinstance(config, str) else config
    if tokenizer is not None:
        overrides = {**tokenizer_fields(tokenizer), **overrides}
    if overrides:
        cfg = cfg.replace(**overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return EncoderDecoderLM(cfg) if cfg.is_encoder_decoder else DecoderOnlyLM(cfg)


def tokenizer_fields(tokenizer) -> dict:
    """vocab_size and special-token ids from a `tokenizers.Tokenizer` or a Hugging Face tokenizer."""
    if hasattr(tokenizer, "get_vocab_size"):
        size, lookup = tokenizer.get_vocab_size(with_added_tokens=True), tokenizer.token_to_id
    else:
        size, lookup = len(tokenizer), tokenizer.convert_tokens_to_ids
    fields = {"vocab_size": vocab_size_for(size)}
    names = {"pad_token_id": ("<pad>", "[PAD]", "<unk>"), "bos_token_id": ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>"),
             "eos_token_id": ("</s>", "<eos>", "[EOS]", "<|endoftext|>", "<|end_of_text|>")}
    for field, candidates in names.items():
        attr = getattr(tokenizer, field, None)
        if isinstance(attr, int):
            fields[field] = attr
            continue
        for token in candidates:
            token_id = lookup(token)
            if isinstance(token_id, int) and token_id >= 0 and (field == "pad_token_id" or token != "<unk>"):
                fields[field] = token_id
                break
    return fields


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


def seal(directory: str | Path) -> None:
    """Write checksums.json for every other file in the model directory, so that a copy of the
    directory made outside its run can still be checked. Call it after the last file is written."""
    from slmctl.runs import sha256_file

    directory = Path(directory)
    checksums = {relative: {"sha256": sha256_file(directory / relative), "size": (directory / relative).stat().st_size}
                 for relative in sealed_files(directory)}
    atomic_write_text(directory / CHECKSUMS_FILE, json.dumps(checksums, indent=2) + "\n")


def sealed_files(directory: Path) -> list[str]:
    """Forward-slash paths, relative to `directory`, of every file checksums.json covers: all but
    itself and hidden files (a temporary left by a killed writer)."""
    files = []
    for folder, subfolders, names in os.walk(directory):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            relative = (Path(folder) / name).relative_to(directory).as_posix()
            if relative != CHECKSUMS_FILE and not name.startswith("."):
                files.append(relative)
    return sorted(files)


def verify_checksums(directory: str | Path, skip_weights: bool = False) -> None:
    """Refuse a model directory whose files differ from its checksums.json (a flipped byte, a
    truncated copy, a replaced tokenizer). Directories without one (saved by older versions,
    Hugging Face ones) are not checked, nor any with SLMCTL_SKIP_CHECKSUMS=1. `skip_weights`
    leaves the *.safetensors files to `load_model` (readers of the tokenizer need not hash them)."""
    directory = Path(directory)
    checksums_path = directory / CHECKSUMS_FILE
    if not checksums_path.is_file() or os.environ.get(SKIP_CHECKSUMS, "") not in ("", "0"):
        return
    fix = f"restore the directory from its run, or set {SKIP_CHECKSUMS}=1 to load it as it is"
    try:
        checksums = json.loads(checksums_path.read_text(encoding="utf-8"))
        entries = [(str(relative), {"sha256": str(entry["sha256"]), "size": int(entry["size"])})
                   for relative, entry in checksums.items()]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{checksums_path} is unreadable ({first_line(e)}); {fix}") from None
    from slmctl.runs import file_problem

    for relative, expected in entries:
        path = directory / relative
        if skip_weights and relative.endswith(".safetensors"):
            continue
        if not path.resolve().is_relative_to(directory.resolve()):
            raise CheckpointError(f"{checksums_path} names {relative!r}, which is outside the model directory; {fix}")
        problem = file_problem(path, expected)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}, since the model was saved (checked against {checksums_path}); {fix}")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **config_overrides) -> LanguageModel:
    """Load a model directory or a reference-format `.pt` checkpoint (slmctl.refs turns runs,
    presets and the rest a user may name into one of these).

    `config_overrides` replace model.json fields (e.g. dropout), or for a reference
    checkpoint fill in what its tensors cannot tell (n_heads, n_kv_heads, token ids).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such model: {path}")
    if path.is_file():
        from slmctl.model.reference import import_reference_checkpoint

        model = import_reference_checkpoint(path, **config_overrides)
    else:
        model_dir = path
        verify_checksums(model_dir)
        from slmctl.model.lora import is_adapter_dir, load_adapter_model

        if is_adapter_dir(model_dir):  # peft.merge=false: a LoRA adapter over the model it names
            model = load_adapter_model(model_dir)
            return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
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
        if (model_dir / "vision.json").is_file():  # a vision-language model (slmctl add-vision)
            from slmctl.model.vlm import attach_saved_vision

            model = attach_saved_vision(model, model_dir)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)


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
