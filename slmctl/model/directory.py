"""Loading any model a directory or file holds: a plain model directory, a LoRA adapter over the
model it names, a vision-language model, or a reference-format checkpoint (`.pt`).

This module is the one that knows every kind; each kind's module (slmctl.model.store, .lora,
.vlm, .reference) knows only its own files. slmctl.refs turns runs, presets and the rest a user
may name into a path for `load_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slmctl.errors import CheckpointError
from slmctl.integrity import verify_checksums
from slmctl.model.base import LanguageModel
from slmctl.model.store import load_plain_model


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **config_overrides) -> LanguageModel:
    """Load a model directory or a reference-format `.pt` checkpoint (slmctl.refs turns runs,
    presets and the rest a user may name into one of these).

    `config_overrides` replace model.json fields (e.g. dropout), or for a reference
    checkpoint fill in what its tensors cannot tell (n_heads, n_kv_heads, token ids).
    """
    from slmctl.model.lora import is_adapter_dir
    from slmctl.model.reference import import_reference_checkpoint
    from slmctl.model.vlm import attach_saved_vision, is_vision_dir

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such model: {path}")
    if path.is_file():
        model = import_reference_checkpoint(path, **config_overrides)
    elif is_adapter_dir(path):  # peft.merge=false: a LoRA adapter over the model it names
        verify_checksums(path)
        model = load_adapter_model(path)
    else:
        verify_checksums(path)
        model = load_plain_model(path, **config_overrides)
        if is_vision_dir(path):  # a vision-language model (slmctl add-vision)
            model = attach_saved_vision(model, path)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)


def load_adapter_model(directory: str | Path, merge: bool = True):
    """The base model a LoRA adapter names, with the adapter applied: merged into the weights (for
    inference, export and more training) or as the PeftModel (merge=False)."""
    from slmctl.model.lora import adapter_base, apply_adapter

    directory = Path(directory)
    return apply_adapter(load_model(adapter_base(directory)), directory, merge=merge)
