"""The prepared token store: a corpus tokenised once, read by training with positioned reads.

Layout (in a prepare run's `data/`; every file written atomically, counted in meta.json):

    meta.json                      format, layout, dtype, eos id, per split: documents, tokens,
                                   shards (name, documents, tokens, bytes), bad rows
    train/00000.text.tokens        documents: every document's token ids followed by one EOS
    train/00000.text.offsets       int64 [documents + 1]: where each document starts; last = tokens
    train/00000.source.tokens ...  pairs: a source and a target stream, no separator
    validation/...

Why flat little-endian arrays plus an offsets index (the Megatron / nanoGPT layout) and not
LitData's chunks or Arrow shards: training cuts fixed-length windows out of the token stream
and needs each window's document boundaries, so it wants O(1) random access to any token range
and O(log n) access to the document around a position. Positioned reads (os.pread) of the
flat files give both with no per-read decoding, and an in-memory index of every 1024th document
offset keeps a lookup to one read; memory stays constant (a memory map would not: see
`ArrayFile`). docs/data.md has the measurements.

A document never spans two shards. `TokenSplit` hides the shards: global token positions and
document numbers run over all of them in order.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmctl.atomic import atomic_writer, atomic_write_text
from slmctl.data.encoding import to_arrays
from slmctl.errors import UserError

FORMAT = "slmctl-tokens/1"
META_FILE = "meta.json"
LAYOUT_STREAMS = {"documents": ("text",), "pairs": ("source", "target")}


class StoreError(UserError, ValueError):
    """A prepared data directory that is missing, damaged or of another format (one line)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------
# Writing


class SplitWriter:
    """Appends documents (or pairs) to shards of about `shard_tokens` tokens each."""

    def __init__(self, directory: Path, split: str, layout: str, dtype: np.dtype, eos_id: int | None,
                 shard_tokens: int):
        self.directory, self.split, self.layout = Path(directory), split, layout
        self.dtype, self.eos_id, self.shard_tokens = dtype, eos_id, shard_tokens
        self.streams = LAYOUT_STREAMS[layout]
        self.shards: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self._tokens = {name: [] for name in self.streams}  # numpy chunks of the open shard
        self._lengths = {name: [] for name in self.streams}
        self._count = 0  # tokens in the open shard, all streams

    def add(self, *columns) -> None:
        """One batch of rows: `add(texts)` for documents, `add(sources, targets)` for pairs, each
        column either token id lists or `(lengths, flat ids)` arrays (slmctl.data.encoding). Rows
        fill the open shard up to `shard_tokens` (a longer row gets a shard of its own)."""
        columns = [c if isinstance(c, tuple) else to_arrays(c, self.dtype) for c in columns]
        separator = int(self.eos_id is not None and self.streams == ("text",))
        per_row = sum(lengths for lengths, _ in columns) + separator
        bounds = [np.concatenate([[0], np.cumsum(lengths)]) for lengths, _ in columns]
        start = 0
        while start < len(per_row):
            room = self.shard_tokens - self._count
            take = int(np.searchsorted(np.cumsum(per_row[start:]), room, side="right"))
            if take == 0 and self._count:
                self.flush()
                continue
            stop = start + max(take, 1)
            self._append([(lengths[start:stop], flat[bound[start]:bound[stop]])
                          for (lengths, flat), bound in zip(columns, bounds)], separator)
            self._count += int(per_row[start:stop].sum())
            start = stop
            if start < len(per_row) or self._count >= self.shard_tokens:
                self.flush()

    def _append(self, columns: list[tuple[np.ndarray, np.ndarray]], separator: int) -> None:
        for name, (lengths, flat) in zip(self.streams, columns):
            flat = flat.astype(self.dtype, copy=False)
            if separator:  # one EOS after every document
                flat = np.insert(flat, np.cumsum(lengths), self.eos_id)
                lengths = lengths + 1
            self._tokens[name].append(flat)
            self._lengths[name].append(lengths)

    def flush(self) -> None:
        if not self._lengths[self.streams[0]]:
            return
        name = f"{len(self.shards):05d}"
        shard = {"name": name, "bytes": 0}
        for stream in self.streams:
            lengths = np.concatenate(self._lengths[stream])
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            tokens = np.concatenate(self._tokens[stream])
            for suffix, array in (("tokens", tokens), ("offsets", offsets)):
                path = self.directory / self.split / f"{name}.{stream}.{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_writer(path) as f:
                    f.write(array.tobytes())
                shard["bytes"] += array.nbytes
            shard["documents"] = len(lengths)
            shard[f"{stream}_tokens"] = int(offsets[-1])
        self.shards.append(shard)
        self._reset()

    def summary(self) -> dict:
        self.flush()
        counts = {"documents": sum(s["documents"] for s in self.shards), "shards": len(self.shards),
                  "bytes": sum(s["bytes"] for s in self.shards)}
        for stream in self.streams:
            counts[f"{stream}_tokens"] = sum(s[f"{stream}_tokens"] for s in self.shards)
        return {**counts, "shard_files": self.shards}


def write_meta(directory: Path, layout: str, dtype: np.dtype, eos_id: int | None, vocab_size: int,
               splits: dict[str, dict], extra: dict) -> None:
    meta = {"format": FORMAT, "layout": layout, "dtype": dtype.name, "eos_id": eos_id, "vocab_size": vocab_size,
            "splits": splits, **extra}
    atomic_write_text(Path(directory) / META_FILE, json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------------------
# Reading


class ArrayFile:
    """A flat array on disk, read by positioned reads (os.pread). Not a memory map: pages a
    memory map has touched stay in the process's resident set, so random windows over a corpus
    would grow it towards the corpus's size; read pages stay in the kernel's page cache instead."""

    def __init__(self, path: Path, dtype: np.dtype, count: int):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise StoreError(f"{path} is missing; the prepared data is incomplete (prepare it again)") from None
        if size != count * dtype.itemsize:
            raise StoreError(f"{path} has {size} bytes, meta.json says {count * dtype.itemsize}; the prepared data is "
                             f"damaged (prepare it again)")
        self.path, self.dtype, self.count = path, dtype, count
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.count

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked loader worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, start: int, stop: int) -> np.ndarray:
        """Items start..stop-1 (clipped to the array)."""
        start, stop = max(0, start), min(stop, self.count)
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        size = self.dtype.itemsize
        data = os.pread(self._file(), (stop - start) * size, start * size)
        return np.frombuffer(data, dtype=self.dtype)

    def __getstate__(self) -> dict:  # pickled to a spawned worker: it opens the file itself
        return {**self.__dict__, "_fd": None, "_pid": None}


class InMemoryArray:
    """An array held in memory with ArrayFile's interface (small data)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.array[max(0, start):stop]


class Offsets:
    """A shard's document offsets with an in-memory index of every STRIDE-th one: finding the
    document around a position takes one read of STRIDE + 1 offsets."""

    STRIDE = 1024

    def __init__(self, array: ArrayFile | InMemoryArray):
        self.array = array
        self.coarse = np.array([array.read(i, i + 1)[0] for i in range(0, len(array), self.STRIDE)], dtype=np.int64)

    @property
    def documents(self) -> int:
        return len(self.array) - 1

    def span(self, index: int) -> tuple[int, int]:
        """(start, end) of document `index`."""
        pair = self.array.read(index, index + 2)
        return int(pair[0]), int(pair[1])

    def locate(self, position: int) -> tuple[int, int, int]:
        """(document, start, end) of the document holding token `position` (shard-local)."""
        block = int(np.searchsorted(self.coarse, position, side="right")) - 1
        first = block * self.STRIDE
        offsets = self.array.read(first, first + self.STRIDE + 1)
        local = int(np.searchsorted(offsets, position, side="right")) - 1
        return first + local, int(offsets[local]), int(offsets[local + 1])


@dataclass(frozen=True)
class Stream:
    """One token stream of a split over all its shards: tokens and document offsets."""

    tokens: list  # per shard: ArrayFile (on disk) or InMemoryArray
    offsets: list[Offsets]  # per shard
    token_starts: np.ndarray  # int64 [shards + 1]: global position of each shard's first token
    doc_starts: np.ndarray  # int64 [shards + 1]: global number of each shard's first document

    @classmethod
    def of(cls, tokens: list, offsets: list[Offsets]) -> Stream:
        token_starts = np.zeros(len(tokens) + 1, dtype=np.int64)
        doc_starts = np.zeros(len(tokens) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in tokens], out=token_starts[1:])
        np.cumsum([o.documents for o in offsets], out=doc_starts[1:])
        return cls(tokens, offsets, token_starts, doc_starts)

    @property
    def n_tokens(self) -> int:
        return int(self.token_starts[-1])

    @property
    def n_documents(self) -> int:
        return int(self.doc_starts[-1])

    def document(self, index: int) -> np.ndarray:
        """Document `index`'s tokens (with its EOS, if the stream stores one)."""
        shard = bisect.bisect_right(self.doc_starts, index) - 1
        start, end = self.offsets[shard].span(index - int(self.doc_starts[shard]))
        return self.tokens[shard].read(start, end)

    def document_span(self, position: int) -> tuple[int, int]:
        """(start, end) global positions of the document holding token `position`."""
        shard = bisect.bisect_right(self.token_starts, position) - 1
        base = int(self.token_starts[shard])
        _, start, end = self.offsets[shard].locate(position - base)
        return base + start, base + end

    def tokens_between(self, start: int, end: int) -> np.ndarray:
        """Tokens at global positions start..end-1 (may join two shards)."""
        parts = []
        while start < end:
            shard = bisect.bisect_right(self.token_starts, start) - 1
            base = int(self.token_starts[shard])
            stop = min(end, int(self.token_starts[shard + 1]))
            parts.append(self.tokens[shard].read(start - base, stop - base))
            start = stop
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def window_pieces(self, start: int, end: int, separator: bool) -> list[tuple[list[int], bool, bool]]:
        """The documents (or parts of them) in positions start..end-1, in order, as
        (ids, starts_document, ends_document); with `separator`, each document's stored EOS is
        left out of its ids (ends_document says it was there). Empty pieces are dropped."""
        pieces = []
        position = start
        while position < end:
            doc_start, doc_end = self.document_span(position)
            stop = min(end, doc_end)
            ids = self.tokens_between(position, stop)
            ends = stop == doc_end
            if separator and ends:
                ids = ids[:-1]
            if len(ids):
                pieces.append((ids.tolist(), position == doc_start, ends))
            position = stop
        return pieces


class TokenSplit:
    """A split of a prepared store: its streams (text, or source and target)."""

    def __init__(self, streams: dict[str, Stream], layout: str, eos_id: int | None):
        self.streams, self.layout, self.eos_id = streams, layout, eos_id

    @classmethod
    def from_documents(cls, documents: list[list[int]], eos_id: int) -> TokenSplit:
        """In-memory data (small corpora, the synthetic world) in the same form as a prepared store."""
        rows = [[*doc, eos_id] for doc in documents if len(doc)]
        return cls({"text": _in_memory(rows, np.int64)}, "documents", eos_id)

    @classmethod
    def from_pairs(cls, sources: list[list[int]], targets: list[list[int]]) -> TokenSplit:
        return cls({"source": _in_memory(sources, np.int64), "target": _in_memory(targets, np.int64)}, "pairs", None)

    @property
    def text(self) -> Stream:
        return self.streams["text"]

    @property
    def n_documents(self) -> int:
        return next(iter(self.streams.values())).n_documents

    def pair(self, index: int) -> tuple[list[int], list[int]]:
        return self.streams["source"].document(index).tolist(), self.streams["target"].document(index).tolist()


def _in_memory(rows: list[list[int]], dtype) -> Stream:
    lengths, tokens = to_arrays(rows, np.dtype(dtype))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Stream.of([InMemoryArray(tokens)], [Offsets(InMemoryArray(offsets))])


@dataclass(frozen=True)
class TokenStore:
    """A prepared data directory, opened: meta.json and a `TokenSplit` per split (read from disk)."""

    path: Path
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> TokenStore:
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise StoreError(f"{path} is not prepared data (no {META_FILE}); run `slmctl prepare` first")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"{meta_file} is unreadable ({e}); prepare the data again") from None
        if meta.get("format") != FORMAT:
            raise StoreError(f"{path} holds {meta.get('format')!r} data; this slmctl reads {FORMAT!r} (prepare it again)")
        return cls(path, meta)

    @property
    def layout(self) -> str:
        return self.meta["layout"]

    def split(self, name: str) -> TokenSplit:
        info = self.meta["splits"].get(name)
        if not info or not info["documents"]:
            raise StoreError(f"{self.path} has no {name} documents")
        dtype = np.dtype(self.meta["dtype"])
        streams = {}
        for stream in LAYOUT_STREAMS[self.layout]:
            tokens, offsets = [], []
            for shard in info["shard_files"]:
                base = self.path / name / f"{shard['name']}.{stream}"
                tokens.append(ArrayFile(Path(f"{base}.tokens"), dtype, shard[f"{stream}_tokens"]))
                offsets.append(Offsets(ArrayFile(Path(f"{base}.offsets"), np.dtype(np.int64), shard["documents"] + 1)))
            streams[stream] = Stream.of(tokens, offsets)
        return TokenSplit(streams, self.layout, self.meta["eos_id"])
