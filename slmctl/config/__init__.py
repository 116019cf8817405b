"""Typed config schemas under `conf/`, and their Hydra composition.

Every config value is declared once, as a default of a schema dataclass: the shared pieces in
`choices.py` (the values a field may take), `model.py`, `data.py` (sources, tokenizers,
objectives), `training.py` (optimizer, trainer, LoRA) and `task.py` (tasks, decoding, judge);
each stage's own schema in a module named after it (`prepare.py`, `pretrain.py`, `distill.py`,
`add_vision.py`, `eval.py`, `bench.py`, `export.py`, `serve.py`). `registry.py` says what exists
(stages, groups, their schemas and modules); `compose.py` composes, validates and explains.
"""
