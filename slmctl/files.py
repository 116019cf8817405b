"""The names of the model artifacts stages leave behind, spelled once.

Nothing from slmctl or torch: run bookkeeping (runs.py) and model references (refs.py) read these names
without pulling in torch.
"""

import json
from pathlib import Path

MODEL_DIR = "model"  # a run's model directory
EXPORT_DIR = "export"  # an export run's ONNX or transformers directory
MODEL_CONFIG_FILE = "model.json"  # ours: the architecture of a model directory
HF_CONFIG_FILE = "config.json"  # a Hugging Face model saved with save_pretrained
HF_MODEL_TYPE = "slmctl"  # config.json's model_type in a `slmctl export hf` directory (our model, in transformers' form)
EXPORT_SPEC_FILE = "slmctl_onnx.json"  # an ONNX export's description of its graphs


def is_slmctl_transformers_dir(path) -> bool:
    """Does `path` hold a `slmctl export hf` directory (config.json with model_type "slmctl")?"""
    config = Path(path) / HF_CONFIG_FILE
    try:
        return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == HF_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False
