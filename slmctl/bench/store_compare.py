"""slmctl's token store against LitData's on the same tokens: `python -m slmctl.bench.store_compare RUN`.

RUN is a `slmctl prepare` run. Its train split is written again with LitData's
`optimize(..., item_loader=TokensLoader())` (one item per document, as litgpt prepares
corpora) and both are read the way training reads them: `--windows` random windows of
`--window` tokens. For slmctl that is `Windows[i]` (the window's tokens cut at its document
boundaries, what packing needs); for LitData `StreamingDataset(item_loader=TokensLoader(block_size))`
with shuffling (the window's tokens only: LitData's token loader keeps no document boundaries).
Printed: write time, bytes on disk, seconds to the first window, windows/s.

LitData is not a dependency of slmctl (its newest torchvision pulls another torch): measure in a
separate environment, e.g. `python -m venv --system-site-packages /tmp/lit && /tmp/lit/bin/pip
install litdata torchvision==0.28.0 torch==2.13.0`, then run this module with /tmp/lit/bin/python.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def _documents(split, first: int, last: int):
    import torch

    for index in range(first, last):
        yield torch.from_numpy(split.text.document(index).astype(np.int64)).to(torch.int32)


def _document_range(bounds: tuple[str, int, int]):
    from slmctl.data.store import TokenStore

    path, first, last = bounds
    yield from _documents(TokenStore.open(path).split("train"), first, last)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def time_reads(read, count: int) -> tuple[float, float]:
    """(seconds to the first read, reads per second over `count` reads)."""
    started = time.perf_counter()
    read(0)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(1, count + 1):
        read(i)
    return first, count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/slmctl-litdata"))
    args = parser.parse_args(argv)

    from litdata import StreamingDataset, optimize
    from litdata.streaming.item_loader import TokensLoader

    from slmctl.data.prepare import prepared_directory
    from slmctl.data.store import TokenStore
    from slmctl.data.streaming import PositionOrder, Windows

    store_dir = prepared_directory(args.run)
    split = TokenStore.open(store_dir).split("train")
    ours_bytes = sum(s["bytes"] for s in TokenStore.open(store_dir).meta["splits"]["train"]["shard_files"])

    # slmctl: random windows with their document pieces
    windows = Windows(split.text, args.window)
    order = PositionOrder(len(windows), seed=0)
    ours_first, ours_rate = time_reads(lambda i: windows[order.row(i)], args.windows)

    # LitData: the same documents, optimized into chunks, then streamed as shuffled token blocks
    shutil.rmtree(args.out, ignore_errors=True)
    n = split.n_documents
    step = -(-n // (4 * args.workers))
    inputs = [(str(store_dir), first, min(n, first + step)) for first in range(0, n, step)]
    started = time.perf_counter()
    optimize(fn=_document_range, inputs=inputs, output_dir=str(args.out), num_workers=args.workers,
             chunk_bytes="64MB", item_loader=TokensLoader())
    lit_write = time.perf_counter() - started
    started = time.perf_counter()
    dataset = StreamingDataset(str(args.out), item_loader=TokensLoader(block_size=args.window), shuffle=True, seed=0)
    lit_open = time.perf_counter() - started
    iterator = iter(dataset)
    lit_first, lit_rate = time_reads(lambda i: next(iterator), min(args.windows, len(dataset) - 1))

    result = {"tokens": split.text.n_tokens, "documents": n, "window": args.window,
              "slmctl": {"bytes": ours_bytes, "first_window_s": round(ours_first, 4), "windows_per_s": round(ours_rate),
                         "document_boundaries": True},
              "litdata": {"bytes": directory_bytes(args.out), "optimize_s": round(lit_write, 1),
                          "open_s": round(lit_open, 3), "first_window_s": round(lit_first, 4),
                          "windows_per_s": round(lit_rate), "document_boundaries": False}}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
