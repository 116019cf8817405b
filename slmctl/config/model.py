"""The model group (`model=330m`, distill's `student=`): a preset plus any ModelConfig field as an
override, or a Hugging Face causal LM built from a config (`model=hf-causal`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from slmctl.config.choices import Arch
from slmctl.model.config import ModelConfig


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


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


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


ModelSchema = _model_schema()


# a distillation student: a model (model@student), or `init` = an existing model / run to continue from
StudentSchema = dataclasses.make_dataclass("StudentSchema", [("init", Optional[str], None)], bases=(ModelSchema,),
                                           namespace={"__module__": __name__})
