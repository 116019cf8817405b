"""Preparing a corpus: rows read once (streamed), tokenised on all cores, written as a token store.

`tokenize_to_store` streams rows (slmctl.data.corpus: constant memory, bad rows counted),
tokenises batches of `batch_rows` rows in one worker process per core (slmctl.data.encoding; the
pool's feeder thread parses the next batches meanwhile), and appends the ids in order to the
train and validation shards (slmctl.data.store). Documents go to validation by a seeded draw per
document (`validation_fraction`) unless a validation file or hub split is given. The stage around
it (`slmctl prepare`: choosing the tokenizer, lineage, the run) is slmctl.train.prepare.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from slmctl.data.corpus import BadRows, Row, RowReader
from slmctl.data.encoding import encode_in_workers
from slmctl.data.sources import DataError
from slmctl.data.store import META_FILE, SplitWriter, token_dtype, write_meta
from slmctl.data.tokenizer import TextTokenizer

DATA_DIR = "data"  # the token store inside a prepare run
TOKENIZER_DIR = "tokenizer"  # inside DATA_DIR: the store is self-contained


class StrictBadRows(BadRows):
    """data.on_bad_row=error: the first bad row ends the stage with a one-line error."""

    def add(self, where: str, why: str) -> None:
        raise DataError(f"{where}: {why} (data.on_bad_row=skip counts and skips such rows)")


def tokenize_to_store(sources: dict, cfg, tokenizer: TextTokenizer, directory: Path, log=print) -> dict:
    """Tokenise every row of `sources` ({"train": ..., "validation": ... when given}) into the
    token store at `directory` (its tokenizer already saved there, in TOKENIZER_DIR); returns
    the stage's summary. `cfg` is prepare's config (data, layout, seed, batch_rows, max_rows,
    shard_tokens, workers)."""
    data = cfg.data
    started = time.perf_counter()
    bad = StrictBadRows() if data.on_bad_row == "error" else BadRows()
    dtype = token_dtype(len(tokenizer))
    log(f"tokenizer: {len(tokenizer)} tokens; token ids stored as {dtype.name}")
    reader = RowReader(data.columns, str(cfg.layout), bad)
    writers: dict[str, SplitWriter] = {}
    counts = {"rows": 0, "characters": 0}
    holdout = data.validation_fraction if "validation" not in sources else 0.0
    workers = cfg.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    tasks = _tasks(_batches(sources, reader, data, holdout, cfg.seed, cfg.batch_rows, cfg.max_rows), reader)
    for split, rows, characters, encoded in encode_in_workers(tasks, str(directory / TOKENIZER_DIR), dtype, workers):
        if split not in writers:
            eos = tokenizer.eos_id if reader.layout == "documents" else None
            writers[split] = SplitWriter(directory, split, reader.layout, dtype, eos, cfg.shard_tokens)
        counts["rows"] += rows
        counts["characters"] += characters
        writers[split].add(*encoded)
    tokenizing = time.perf_counter() - started
    splits = {name: writer.summary() for name, writer in writers.items()}
    if not splits.get("train", {}).get("documents"):
        where = f" ({bad.count} bad rows, first: {bad.first[0]})" if bad.first else ""
        raise DataError(f"no usable rows in {describe(data)}{where}")
    if not splits.get("validation", {}).get("documents"):
        raise DataError(f"no validation documents: {describe(data)} has too few rows for "
                        f"data.validation_fraction={data.validation_fraction} (raise it, or give data.validation)")
    bad_rows = {"count": bad.count, "first": bad.first}
    write_meta(directory, reader.layout, dtype, tokenizer.eos_id if reader.layout == "documents" else None,
               len(tokenizer), splits, {"bad_rows": bad_rows, "source": describe(data)})
    if bad.count:
        log(f"skipped {bad.count} bad rows; first: {'; '.join(bad.first)}")
    tokens = sum(v for s in splits.values() for k, v in s.items() if k.endswith("_tokens"))
    return {"layout": reader.layout, "rows": counts["rows"], "bad_rows": bad.count,
            **{f"{split}_{key}": value for split, info in splits.items() for key, value in info.items()
               if key != "shard_files"},
            "tokens": tokens, "tokenize_seconds": round(tokenizing, 2),
            "tokens_per_s": round(tokens / max(tokenizing, 1e-9)),
            "characters_per_s": round(counts["characters"] / max(tokenizing, 1e-9)), "data": f"{DATA_DIR}/{META_FILE}"}


def sample_texts(sources: dict, cfg, limit: int) -> list[str]:
    """The first `limit` texts of the train source (a document, or source and target of a pair):
    what a BPE tokenizer is trained on."""
    texts = []
    for row in _rows(sources["train"], RowReader(cfg.data.columns, str(cfg.layout), BadRows()), cfg.data):
        texts.append(row.text if row.text is not None else f"{row.source}\n{row.target}")
        if len(texts) >= limit:
            break
    if not texts:
        raise DataError(f"no usable rows in {describe(cfg.data)} to train a tokenizer on")
    return texts


def prepared_directory(path: Path) -> Path:
    """The token store a prepare run (or its data/ directory) holds."""
    path = Path(path)
    return path / DATA_DIR if (path / DATA_DIR / META_FILE).is_file() else path


# -- rows in batches ------------------------------------------------------------------------------


def _rows(source, reader: RowReader, data) -> Iterator[Row]:
    if isinstance(source, tuple):  # ("hub", split)
        return reader.hub(data.id, data.subset, source[1])
    return reader.files(source)


def describe(data) -> str:
    return data.train if data.kind == "files" else f"{data.id}[{data.train_split}]"


def _batches(sources: dict, reader: RowReader, data, holdout: float, seed: int, batch_rows: int,
             max_rows: int | None) -> Iterator[tuple[str, list[Row]]]:
    """(split, rows) batches. With `holdout`, the train source's rows are dealt to train and
    validation by a draw seeded per batch (the same split every time for the same corpus)."""
    held_out: list[Row] = []
    for number, batch in enumerate(_batched(_rows(sources["train"], reader, data), batch_rows, max_rows)):
        if holdout:
            held = np.random.default_rng([seed, number]).random(len(batch)) < holdout
            held_out.extend(row for row, h in zip(batch, held) if h)
            batch = [row for row, h in zip(batch, held) if not h]
            if len(held_out) >= batch_rows:
                yield "validation", held_out
                held_out = []
        if batch:
            yield "train", batch
    if held_out:
        yield "validation", held_out
    if "validation" in sources:
        yield from (("validation", batch) for batch in
                    _batched(_rows(sources["validation"], reader, data), batch_rows, None))


def _tasks(batches: Iterator[tuple[str, list[Row]]], reader: RowReader) -> Iterator[tuple[str, int, int, list]]:
    """(split, rows, characters, columns of texts) per batch, for the tokenizing workers."""
    for split, batch in batches:
        if reader.layout == "documents":
            columns = [[row.text for row in batch]]
        else:
            columns = [[row.source for row in batch], [row.target for row in batch]]
        yield split, len(batch), sum(len(text) for column in columns for text in column), columns


def _batched(rows: Iterator[Row], size: int, limit: int | None) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for number, row in enumerate(rows, start=1):
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
        if limit is not None and number >= limit:
            break
    if batch:
        yield batch
