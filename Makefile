# The two set-up commands of the README: `make demo` and `make test`.
# torch is installed first and pinned: 2.13.0 is the CPU build; anything else may
# pull a multi-GB CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH := torch==2.13.0

.PHONY: install demo test test-slow lint speed

install:
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev]'

demo: install
	$(PYTHON) -m slmctl recipe run recipes/quickstart.yaml --runs-dir runs/quickstart

test: install
	$(PYTHON) -m pytest -q

# Heavier checks CI does not run: 330M numerics.
test-slow: install
	$(PYTHON) -m pytest -q -m slow

# The model speed comparison of docs/speed.md (330m, fp32, 2 threads, 512 -> 128 tokens).
speed: install
	$(PYTHON) -m slmctl.bench.t5_baseline --preset 330m --prompt-len 512 --new-tokens 128 --threads 2 --onnx

lint:
	$(PIP) install --quiet ruff
	$(PYTHON) -m ruff check slmctl tests
