"""The prepare stage: a corpus read once, tokenised on all cores, written as a token store.

    slmctl prepare data=files data.train='corpus/*.jsonl.zst'          # BPE trained on a sample
    slmctl prepare data=hub data.id=wikitext data.subset=wikitext-103-raw-v1 tokenizer=run tokenizer.path=...

`run(cfg, run)` streams rows (slmctl.data.corpus: constant memory, bad rows counted), trains
the tokenizer on the first `tokenizer.max_training_texts` rows unless one is given, then
tokenises batches of `batch_rows` rows in one worker process per core (slmctl.data.encoding;
the pool's feeder thread parses the next batches meanwhile), and appends the ids in order to the train and
validation shards (slmctl.data.store). Documents go to validation by a seeded
draw per document (`data.validation_fraction`) unless a validation file or hub split is given.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from slmctl.config import ConfigError
from slmctl.data.corpus import BadRows, Row, RowReader, resolve_files
from slmctl.data.encoding import encode_in_workers
from slmctl.data.sources import DataError
from slmctl.data.store import META_FILE, SplitWriter, TokenStore, token_dtype, write_meta
from slmctl.data.tokenizer import TextTokenizer, load_hf_tokenizer, train_bpe
from slmctl.refs import record_source, resolve

DATA_DIR = "data"  # the token store inside a prepare run
TOKENIZER_DIR = "tokenizer"  # inside DATA_DIR: the store is self-contained


class StrictBadRows(BadRows):
    """data.on_bad_row=error: the first bad row ends the stage with a one-line error."""

    def add(self, where: str, why: str) -> None:
        raise DataError(f"{where}: {why} (data.on_bad_row=skip counts and skips such rows)")


def run(cfg, run):
    data = cfg.data
    if data.kind not in ("files", "hub"):
        raise ConfigError(f"prepare reads data=files or data=hub, not data={data.kind}")
    started = time.perf_counter()
    bad = StrictBadRows() if data.on_bad_row == "error" else BadRows()
    sources = _sources(cfg, run)

    tokenizer = _tokenizer(cfg, run, sources)
    directory = run.path / DATA_DIR
    if run.is_writer:
        tokenizer.save(directory / TOKENIZER_DIR)
    dtype = token_dtype(len(tokenizer))
    run.log(f"tokenizer: {len(tokenizer)} tokens; token ids stored as {dtype.name}")

    reader = RowReader(data.columns, str(cfg.layout), bad)
    writers: dict[str, SplitWriter] = {}
    counts = {"rows": 0, "characters": 0}
    holdout = data.validation_fraction if "validation" not in sources else 0.0
    tokenizing = time.perf_counter()
    workers = cfg.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    tasks = _tasks(_batches(sources, reader, data, holdout, cfg.seed, cfg.batch_rows, cfg.max_rows), reader)
    for split, rows, characters, encoded in encode_in_workers(tasks, str(directory / TOKENIZER_DIR), dtype, workers):
        if split not in writers:
            eos = tokenizer.eos_id if reader.layout == "documents" else None
            writers[split] = SplitWriter(directory, split, reader.layout, dtype, eos, cfg.shard_tokens)
        counts["rows"] += rows
        counts["characters"] += characters
        writers[split].add(*encoded)
    tokenizing = time.perf_counter() - tokenizing
    splits = {name: writer.summary() for name, writer in writers.items()}
    if not splits.get("train", {}).get("documents"):
        where = f" ({bad.count} bad rows, first: {bad.first[0]})" if bad.first else ""
        raise DataError(f"no usable rows in {_describe(data)}{where}")
    if not splits.get("validation", {}).get("documents"):
        raise DataError(f"no validation documents: {_describe(data)} has too few rows for "
                        f"data.validation_fraction={data.validation_fraction} (raise it, or give data.validation)")
    seconds = time.perf_counter() - started
    bad_rows = {"count": bad.count, "first": bad.first}
    write_meta(directory, reader.layout, dtype, tokenizer.eos_id if reader.layout == "documents" else None,
               len(tokenizer), splits, {"bad_rows": bad_rows, "source": _describe(data)})
    if bad.count:
        run.log(f"skipped {bad.count} bad rows; first: {'; '.join(bad.first)}")
    tokens = sum(v for s in splits.values() for k, v in s.items() if k.endswith("_tokens"))
    summary = {"layout": reader.layout, "rows": counts["rows"], "bad_rows": bad.count,
               **{f"{split}_{key}": value for split, info in splits.items() for key, value in info.items()
                  if key != "shard_files"},
               "tokens": tokens, "seconds": round(seconds, 2), "tokenize_seconds": round(tokenizing, 2),
               "tokens_per_s": round(tokens / max(tokenizing, 1e-9)),
               "characters_per_s": round(counts["characters"] / max(tokenizing, 1e-9)), "data": f"{DATA_DIR}/{META_FILE}"}
    run.succeed(summary)
    return run


# -- where rows come from ------------------------------------------------------------------------


def _sources(cfg, run) -> dict[str, object]:
    """{"train": what to read, "validation": what to read (only when given)}; lineage recorded."""
    data = cfg.data
    if data.kind == "files":
        found = {"train": resolve_files(data.train)}
        if data.validation is not None:
            found["validation"] = resolve_files(data.validation)
        for pattern in filter(None, (data.train, data.validation)):
            for file in resolve_files(pattern):
                record_source(run, file, role="corpus")
        return found
    record_source(run, data.id, role="corpus")
    found = {"train": ("hub", data.train_split)}
    if data.validation_split is not None:
        found["validation"] = ("hub", data.validation_split)
    return found


def _rows(source, reader: RowReader, data) -> Iterator[Row]:
    if isinstance(source, tuple):  # ("hub", split)
        return reader.hub(data.id, data.subset, source[1])
    return reader.files(source)


def _describe(data) -> str:
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


# -- the tokenizer ------------------------------------------------------------------------------


def _tokenizer(cfg, run, sources: dict) -> TextTokenizer:
    kind = cfg.tokenizer.kind
    if kind == "bpe":
        texts = []
        for row in _rows(sources["train"], RowReader(cfg.data.columns, str(cfg.layout), BadRows()), cfg.data):
            texts.append(row.text if row.text is not None else f"{row.source}\n{row.target}")
            if len(texts) >= cfg.tokenizer.max_training_texts:
                break
        if not texts:
            raise DataError(f"no usable rows in {_describe(cfg.data)} to train a tokenizer on")
        run.log(f"training a {cfg.tokenizer.vocab_size}-token BPE tokenizer on the first {len(texts)} rows")
        return train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, cfg.tokenizer.n_sentinels)
    if kind == "run":
        return _run_tokenizer(cfg.tokenizer.path, run)
    if kind == "hf":
        record_source(run, cfg.tokenizer.path, role="tokenizer")
        return load_hf_tokenizer(cfg.tokenizer.path, cfg.tokenizer.n_sentinels)
    teacher = cfg.get("teacher")
    if teacher is None:
        raise ConfigError("tokenizer=teacher needs a teacher: add teacher=llama teacher.path=DIR (or teacher=run)")
    allow = ("model_dir",) if teacher.kind == "run" else ("model_dir", "hf_dir", "hub")
    ref = resolve(teacher.path, run.runs_dir, allow=allow, purpose="teacher.path")
    ref.record_input(run, role="teacher")
    if ref.kind == "model_dir":  # ours: already has sentinels and an image token
        return TextTokenizer.load(ref.path)
    return load_hf_tokenizer(teacher.tokenizer or ref.where, cfg.tokenizer.n_sentinels, teacher.trust_remote_code)


def _run_tokenizer(text: str, run) -> TextTokenizer:
    """tokenizer=run: a tokenizer directory, a prepare run (its data's tokenizer) or a model (run or directory)."""
    from slmctl.data.tokenizer import SPECIAL_FILE
    from slmctl.runs import RunError, resolve_run

    path = Path(text).expanduser()
    if not (path / SPECIAL_FILE).is_file():
        try:
            store = prepared_directory(resolve_run(text, run.runs_dir))
            path = store / TOKENIZER_DIR if (store / META_FILE).is_file() else path
        except RunError:
            pass
    if (path / SPECIAL_FILE).is_file():
        record_source(run, text, role="tokenizer", path=path)
        return TextTokenizer.load(path)
    source = resolve(text, run.runs_dir, allow=("model_dir", "hf_dir"), purpose="tokenizer=run")
    source.record_input(run, role="tokenizer")
    return TextTokenizer.load(source.path)


def prepared_directory(path: Path) -> Path:
    """The token store a prepare run (or its data/ directory) holds."""
    path = Path(path)
    return path / DATA_DIR if (path / DATA_DIR / META_FILE).is_file() else path


def open_prepared(path: str, run) -> TokenStore:
    """The token store `data.path` names (a prepare run or its data/ directory), checked against
    its run's MANIFEST and recorded as an input of `run`. A resumed run reopens the store it
    recorded, even when `path` (say prepare/latest) now names a newer one."""
    from slmctl.runs import RunError, resolve_run, verify_artifact

    recorded = [i["path"] for i in run.inputs() if i.get("role") == "data" and i.get("ref") == str(path)]
    directory = Path(recorded[0]) if recorded else Path(path).expanduser()
    if not directory.is_dir():
        try:
            directory = resolve_run(path, run.runs_dir)
        except RunError as e:
            raise ConfigError(f"data.path={path}: no prepared data there ({e})") from None
    directory = prepared_directory(directory)
    store = TokenStore.open(directory)
    verify_artifact(directory)
    record_source(run, path, role="data", path=directory)
    return store


def prepared_tokenizer(store: TokenStore, run) -> TextTokenizer:
    """The tokenizer the data was prepared with (saved into the run, so a resume reuses it)."""
    saved = run.path / TOKENIZER_DIR  # the training run's own copy
    if saved.is_dir():
        return TextTokenizer.load(saved)
    tokenizer = TextTokenizer.load(store.path / TOKENIZER_DIR)
    if run.is_writer:
        tokenizer.save(saved)
    return tokenizer
