"""Where training text comes from: the embedded synthetic world, local files, or the hub.

`load_texts(cfg, split)` gives plain text (for LM objectives); `load_pairs(cfg, split)`
gives (source, target) pairs (for seq2seq). Everything goes through `datasets` except the
synthetic world, which is generated in memory. Bad input is a one-line `DataError` naming
the file.
"""

from __future__ import annotations

import glob
from pathlib import Path

from slmctl.errors import UserError, first_line

SPLITS = ("train", "validation")
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".text": "text"}


class DataError(UserError, ValueError):
    """Unusable training data (one-line message naming the file or dataset)."""


def load_texts(cfg, split: str) -> list[str]:
    """Plain texts of `split`: the synthetic world's paragraphs, or the `text` column (for
    data that only has source/target, source and target joined by a newline)."""
    if cfg.kind == "synthetic":
        try:
            return _world(cfg).texts(split=split, n=_synthetic_count(cfg, split))
        except ValueError as e:
            raise DataError(f"data (synthetic): {e}") from None
    rows, columns, where = _load_rows(cfg, split)
    text_column = cfg.columns.text
    if text_column in columns:
        texts = [str(t) for t in rows[text_column] if t is not None and str(t).strip()]
    elif cfg.columns.source in columns and cfg.columns.target in columns:
        texts = [f"{s}\n{t}" for s, t in zip(rows[cfg.columns.source], rows[cfg.columns.target])]
    else:
        raise DataError(f"{where} has no column {text_column!r} (columns: {', '.join(columns)}); "
                        f"set data.columns.text=NAME")
    if not texts:
        raise DataError(f"{where} has no text in split {split!r}")
    return texts


def load_pairs(cfg, split: str) -> list[tuple[str, str]]:
    """(source, target) pairs of `split`."""
    if cfg.kind == "synthetic":
        try:
            examples = _world(cfg).examples(str(cfg.questions), split, _synthetic_count(cfg, split), cfg.min_facts,
                                            cfg.max_facts)
        except ValueError as e:
            raise DataError(f"data (synthetic): {e}") from None
        return [(e["source"], e["target"]) for e in examples]
    rows, columns, where = _load_rows(cfg, split)
    for role in ("source", "target"):
        if cfg.columns[role] not in columns:
            raise DataError(f"{where} has no column {cfg.columns[role]!r} (columns: {', '.join(columns)}); "
                            f"set data.columns.{role}=NAME")
    pairs = [(str(s), str(t)) for s, t in zip(rows[cfg.columns.source], rows[cfg.columns.target])
             if s is not None and t is not None]
    if not pairs:
        raise DataError(f"{where} has no examples in split {split!r}")
    return pairs


def _world(cfg):
    from slmctl.data.synthetic import SyntheticWorld

    return SyntheticWorld(seed=cfg.seed, n_people=cfg.n_people)


def _synthetic_count(cfg, split: str) -> int:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (choose from: {', '.join(SPLITS)})")
    return cfg.train_examples if split == "train" else cfg.validation_examples


def _load_rows(cfg, split: str):
    """(columns dict of lists, column names, a description of the source) for `split`."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (choose from: {', '.join(SPLITS)})")
    if cfg.kind == "files":
        return _load_files(cfg, split)
    if cfg.kind == "hub":
        return _load_hub(cfg, split)
    raise DataError(f"unknown data.kind {cfg.kind!r}")


def _resolve_files(pattern: str) -> list[str]:
    files = sorted(glob.glob(str(Path(pattern).expanduser())))
    if not files:
        raise DataError(f"no such data file: {pattern}")
    suffixes = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in suffixes or len(suffixes) != 1:
        raise DataError(f"cannot tell the format of {pattern}: use one of {', '.join(FORMATS)} files")
    return files


def quiet_datasets():
    """The `datasets` module, with its progress bars and logged tracebacks off: a bad file is
    reported once, as our one-line error."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def check_jsonl(files: list[str]) -> None:
    """Name the first line of a .jsonl file that is not a JSON object (`file:line`), before
    `datasets` reads it (its own error names neither file nor line)."""
    import json

    jsonl = [file for file in files if Path(file).suffix.lower() == ".jsonl"]
    rows = 0
    for file in jsonl:
        with open(file, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                rows += 1
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{file}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{file}:{number}: a row must be a JSON object, got {type(row).__name__}")
    if jsonl and len(jsonl) == len(files) and not rows:  # `datasets` would fail with a bare StopIteration
        raise DataError(f"{' '.join(jsonl)} is empty: no rows to read")


def _load_files(cfg, split: str):
    datasets = quiet_datasets()

    source = cfg.train if split == "train" or cfg.validation is None else cfg.validation
    files = _resolve_files(source)
    check_jsonl(files)
    builder = FORMATS[Path(files[0]).suffix.lower()]
    try:
        dataset = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"cannot read {source}: {first_line(e)}") from None
    if cfg.validation is None:  # hold out a deterministic slice of train
        if len(dataset) < 2:
            raise DataError(f"{source} has {len(dataset)} row(s): too few to hold out validation data")
        parts = dataset.train_test_split(test_size=cfg.validation_fraction, seed=0, shuffle=True)
        dataset = parts["train"] if split == "train" else parts["test"]
    if len(dataset) == 0:
        raise DataError(f"{source} has no rows")
    return dataset.to_dict(), dataset.column_names, source


def _load_hub(cfg, split: str):
    datasets = quiet_datasets()

    split_name = cfg.train_split if split == "train" else cfg.validation_split
    if split_name is None:
        raise DataError(f"data.validation_split is not set for hub dataset {cfg.id!r}")
    try:
        dataset = datasets.load_dataset(cfg.id, cfg.subset, split=split_name)
    except Exception as e:
        raise DataError(f"cannot load hub dataset {cfg.id!r} split {split_name!r}: {first_line(e)}") from None
    if len(dataset) == 0:
        raise DataError(f"hub dataset {cfg.id!r} split {split_name!r} is empty")
    return dataset.to_dict(), dataset.column_names, f"{cfg.id}[{split_name}]"
