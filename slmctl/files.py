"""The names of the model artifacts stages leave behind, spelled once.

No imports: run bookkeeping (runs.py) and model references (refs.py) read these names
without pulling in torch.
"""

MODEL_DIR = "model"  # a run's model directory
EXPORT_DIR = "export"  # an export run's ONNX directory
MODEL_CONFIG_FILE = "model.json"  # ours: the architecture of a model directory
HF_CONFIG_FILE = "config.json"  # a Hugging Face model saved with save_pretrained
EXPORT_SPEC_FILE = "slmctl_onnx.json"  # an ONNX export's description of its graphs
