"""Reading a corpus row by row, in constant memory, with bad rows counted instead of fatal.

`slmctl prepare` reads corpora far larger than memory, so nothing here loads a file whole:

- jsonl and txt (plain or compressed: .gz, .bz2, .xz, .zst) are read line by line here, so a
  bad row is named `file:line`;
- parquet is read in record batches with pyarrow; csv and json (a JSON array) through
  `datasets` in streaming mode (rows are named `file:row N`);
- a hub dataset through `datasets.load_dataset(..., streaming=True)`.

`read_rows(cfg)` yields `Row`s: a text (documents) or a (source, target) pair (pairs), and
the `BadRows` tally beside it keeps the count and the first few places. A txt file is one
document per line (the `datasets` text builder's convention).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from slmctl.data.sources import DataError, quiet_datasets
from slmctl.errors import first_line

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
LINE_FORMATS = ("jsonl", "txt")
FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "txt", ".text": "txt"}
NAMED_BAD_ROWS = 5  # how many bad rows the summary names


@dataclass
class Row:
    where: str  # file:line (or file:row N, or dataset[split]:row N)
    text: str | None = None  # documents
    source: str | None = None  # pairs
    target: str | None = None


@dataclass
class BadRows:
    """Rows skipped: how many, and where the first few were (with why)."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.first) < NAMED_BAD_ROWS:
            self.first.append(f"{where}: {why}")


def file_format(path: str) -> tuple[str, str | None]:
    """(format, compression) from a file name: data.jsonl.zst -> ("jsonl", "zstd")."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise DataError(f"cannot tell the format of {path}: use {', '.join(FORMATS)} files "
                        f"(optionally compressed: {', '.join(COMPRESSIONS)})")
    if compression and fmt not in LINE_FORMATS:
        raise DataError(f"{path}: compressed {fmt} is not supported (compress jsonl or txt, or use parquet's own compression)")
    return fmt, compression


def resolve_files(patterns: str | list[str]) -> list[str]:
    """The files a path, glob or list of them names (sorted, each pattern must match)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matched:
            raise DataError(f"no such data file: {pattern}")
        files.extend(m for m in matched if Path(m).is_file())
    if not files:
        raise DataError(f"no data files in {' '.join(patterns)}")
    for file in files:
        file_format(file)
    return files


def open_text(path: str, compression: str | None) -> io.TextIOBase:
    """A text stream over a (possibly compressed) file; zstd is decompressed by pyarrow."""
    if compression is None:
        return open(path, encoding="utf-8", errors="replace")
    if compression == "gzip":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if compression == "bz2":
        return bz2.open(path, "rt", encoding="utf-8", errors="replace")
    if compression == "xz":
        return lzma.open(path, "rt", encoding="utf-8", errors="replace")
    import pyarrow as pa

    stream = pa.CompressedInputStream(pa.OSFile(path, "rb"), "zstd")
    return io.TextIOWrapper(io.BufferedReader(stream), encoding="utf-8", errors="replace")


class RowReader:
    """Rows of documents (`layout="documents"`: the `text` column) or pairs (`"pairs"`: the
    `source` and `target` columns; `"auto"`: whichever the first row has) from files or a hub
    split; bad rows go to `self.bad`."""

    def __init__(self, columns, layout: str, bad: BadRows | None = None):
        self.columns, self.layout = columns, layout
        self.bad = bad if bad is not None else BadRows()

    def from_record(self, record, where: str) -> Row | None:
        """A Row from one parsed record (a dict), or None after counting it as bad. With layout
        "auto", the first record decides (`detect_layout`)."""
        if not isinstance(record, dict):
            self.bad.add(where, f"a row must be a JSON object, got {type(record).__name__}")
            return None
        if self.layout == "auto":
            self.layout = detect_layout(record, self.columns)
        if self.layout == "documents":
            text = record.get(self.columns.text)
            if text is None and self.columns.text not in record:
                self.bad.add(where, f"no column {self.columns.text!r} (set data.columns.text=NAME)")
                return None
            if not isinstance(text, str) or not text.strip():
                self.bad.add(where, f"{self.columns.text!r} is {'empty' if isinstance(text, str) else type(text).__name__}")
                return None
            return Row(where, text=text)
        values = []
        for role in ("source", "target"):
            name = self.columns[role]
            value = record.get(name)
            if not isinstance(value, str) or not value.strip():
                why = f"no column {name!r} (set data.columns.{role}=NAME)" if name not in record else f"{name!r} is not a non-empty string"
                self.bad.add(where, why)
                return None
            values.append(value)
        return Row(where, source=values[0], target=values[1])

    # -- files ------------------------------------------------------------------

    def files(self, paths: list[str]) -> Iterator[Row]:
        for path in paths:
            fmt, compression = file_format(path)
            if fmt == "jsonl":
                yield from self._jsonl(path, compression)
            elif fmt == "txt":
                yield from self._txt(path, compression)
            elif fmt == "parquet":
                yield from self._parquet(path)
            else:
                yield from self._datasets(fmt, path)

    def _jsonl(self, path: str, compression: str | None) -> Iterator[Row]:
        try:
            with open_text(path, compression) as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"{path}:{number}"
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        self.bad.add(where, f"not valid JSON ({getattr(e, 'msg', e)})")
                        continue
                    row = self.from_record(record, where)
                    if row is not None:
                        yield row
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"cannot read {path}: {first_line(e)}") from None

    def _txt(self, path: str, compression: str | None) -> Iterator[Row]:
        if self.layout == "auto":
            self.layout = "documents"
        if self.layout != "documents":
            raise DataError(f"{path}: a txt file holds documents, not source/target pairs")
        try:
            with open_text(path, compression) as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        yield Row(f"{path}:{number}", text=line.rstrip("\n"))
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"cannot read {path}: {first_line(e)}") from None

    def _parquet(self, path: str) -> Iterator[Row]:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            number = 0
            for batch in parquet.iter_batches(batch_size=4096):
                for record in batch.to_pylist():
                    number += 1
                    row = self.from_record(record, f"{path}:row {number}")
                    if row is not None:
                        yield row
        except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise DataError(f"cannot read {path}: {first_line(e)}") from None

    def _datasets(self, fmt: str, path: str) -> Iterator[Row]:
        datasets = quiet_datasets()
        try:
            stream = datasets.load_dataset(fmt, data_files=[path], split="train", streaming=True)
            for number, record in enumerate(stream, start=1):
                row = self.from_record(record, f"{path}:row {number}")
                if row is not None:
                    yield row
        except Exception as e:  # datasets raises many types for unreadable files
            raise DataError(f"cannot read {path}: {first_line(e)}") from None

    # -- hub --------------------------------------------------------------------

    def hub(self, dataset_id: str, subset: str | None, split: str) -> Iterator[Row]:
        datasets = quiet_datasets()
        try:
            stream = datasets.load_dataset(dataset_id, subset, split=split, streaming=True)
            for number, record in enumerate(stream, start=1):
                row = self.from_record(record, f"{dataset_id}[{split}]:row {number}")
                if row is not None:
                    yield row
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot stream hub dataset {dataset_id!r} split {split!r}: {first_line(e)}") from None


def detect_layout(first: dict, columns) -> str:
    """documents when the text column is there, else pairs when source and target are."""
    if columns.text in first:
        return "documents"
    if columns.source in first and columns.target in first:
        return "pairs"
    raise DataError(f"the first row has neither {columns.text!r} nor {columns.source!r}+{columns.target!r} columns "
                    f"(it has: {', '.join(first)}); set data.columns.text=NAME or data.layout=pairs")
