# The two set-up commands of the README: `make demo` and `make test`.
# torch is installed first and pinned: 2.13.0 is the CPU build; anything else may
# pull a multi-GB CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH := torch==2.13.0

.PHONY: install demo test test-slow test-openvino lint speed soak gpu-wheels gpu-check data-scale lora-compare

install:
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev]'

demo: install
	$(PYTHON) -m slmctl recipe run recipes/quickstart.yaml --runs-dir runs/quickstart

# One worker per core (pytest-xdist), each test file on one worker so its module fixtures are built once;
# each worker's torch takes one thread (tests/conftest.py).
test: install
	$(PYTHON) -m pytest -q -n auto --dist loadfile

# The OpenVINO execution provider (docs/export.md): onnxruntime-openvino ships its own `onnxruntime`
# module, so it lives in its own environment, where it replaces the plain onnxruntime slmctl depends on.
OPENVINO_VENV := .venv-openvino
test-openvino:
	$(PYTHON) -m venv $(OPENVINO_VENV)
	$(OPENVINO_VENV)/bin/pip install --quiet $(TORCH)
	$(OPENVINO_VENV)/bin/pip install --quiet -e '.[dev]'
	$(OPENVINO_VENV)/bin/pip uninstall --yes --quiet onnxruntime
	$(OPENVINO_VENV)/bin/pip install --quiet --force-reinstall --no-deps onnxruntime-openvino
	$(OPENVINO_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/runtime

# Heavier checks CI does not run: 330M numerics.
test-slow: install
	$(PYTHON) -m pytest -q -m slow

# The server under 32 clients for 5 minutes: streamed, plain, abandoned and slow streams, bad requests and
# oversized bodies against a tiny model served in a child process (docs/serve.md; a short one is in make test).
soak: install
	$(PYTHON) -m slmctl.serve.soak --self-serve --clients 32 --duration 300 --json soak.json

# The model speed comparison of docs/speed.md (330m, fp32, 2 threads, 512 -> 128 tokens).
speed: install
	$(PYTHON) -m slmctl.bench.t5_baseline --preset 330m --prompt-len 512 --new-tokens 128 --threads 2 --onnx

lint:
	$(PIP) install --quiet ruff
	$(PYTHON) -m ruff check slmctl tests

# Training on corpora larger than memory (docs/data.md): 200 MB and 2 GB corpora, prepare and stream.
data-scale: install
	$(PYTHON) -m slmctl.bench.data_scale --sizes-mb 200 2000

lora-compare: install
	$(PYTHON) -m slmctl.bench.lora_compare --workdir lora-compare

# The GPU machine has CUDA torch, Lightning and transformers but no network: fetch the rest here
# (into .whl/, git-ignored) and carry it there.
GPU_WHEELS := hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
gpu-wheels:
	$(PIP) download --quiet --no-deps -d .whl $(GPU_WHEELS)

# Every GPU number of docs/data.md and docs/speed.md in one run (about 8 minutes on an H100/H200);
# `python -m slmctl.bench.gpu_check --dry-run` is the same on a CPU with tiny sizes (tests/bench/test_gpu_check.py).
gpu-check:
	$(PIP) install --quiet --no-index --no-deps --find-links .whl $(GPU_WHEELS) || $(PIP) install --quiet $(GPU_WHEELS)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PYTHON) -m slmctl.bench.gpu_check --out gpu-check
