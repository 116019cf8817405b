"""The networks: the paper's encoder-decoder, the matched decoder-only baseline,
cached generation and model directories (save, verify, load).

    from slmctl.model import build_model, load_model, save_model
"""

from slmctl.errors import CheckpointError
from slmctl.model.base import LanguageModel, LMOutput
from slmctl.model.build import build_model
from slmctl.model.config import PRESETS, ModelConfig, count_parameters, get_preset, matched_decoder_only
from slmctl.model.deconly import DecoderOnlyLM
from slmctl.model.directory import load_model
from slmctl.model.encdec import EncoderDecoderLM
from slmctl.model.generation import GenerationConfig
from slmctl.model.store import save_model

__all__ = [
    "PRESETS", "CheckpointError", "DecoderOnlyLM", "EncoderDecoderLM", "GenerationConfig", "LMOutput",
    "LanguageModel", "ModelConfig", "build_model", "count_parameters", "get_preset", "load_model",
    "matched_decoder_only", "save_model",
]
