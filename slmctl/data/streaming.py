"""Training rows out of a token store, in an order that is a pure function of (seed, position).

A training run sees an endless sequence of row *positions*; position p belongs to epoch
p // n and is mapped to a row by that epoch's permutation of the n rows. Batch k holds the
positions k*B .. k*B+B-1, so which rows batch k contains depends on nothing but the seed and
k: a resumed run, every DDP rank and every DataLoader worker can compute its own share without
talking to the others, no row is seen twice or skipped within an epoch, and nothing about
the order needs memory that grows with the corpus.

The permutation is a keyed Feistel network over the next power of four above n, walked until
it lands inside [0, n) (cycle walking: a bijection on [0, n)); O(1) memory and a few
microseconds per position, however large n is.

Rows are:
- `Windows`: fixed-length windows of a documents stream (packed training): window i is
  tokens i*W .. i*W+W-1, handed out as its document pieces (slmctl.data.packing packs them);
- `Documents`: one document per row (unpacked LM objectives), without its stored EOS;
- `Pairs`: one (source, target) pair per row (seq2seq).
"""

from __future__ import annotations

import hashlib

from slmctl.data.packing import Piece
from slmctl.data.store import Stream, TokenSplit

FEISTEL_ROUNDS = 6


class Permutation:
    """A seeded bijection of range(n), computed per index (constant memory)."""

    def __init__(self, n: int, key: str):
        if n < 1:
            raise ValueError(f"cannot permute {n} rows")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2  # each Feistel half has `half` bits; the domain is 4**half >= n
        self.mask = (1 << self.half) - 1
        digest = hashlib.blake2b(key.encode(), digest_size=8 * FEISTEL_ROUNDS).digest()
        self.keys = [int.from_bytes(digest[8 * r:8 * r + 8], "little") for r in range(FEISTEL_ROUNDS)]

    def _round(self, value: int, key: int) -> int:
        x = (value * 0x9E3779B97F4A7C15 + key) & 0xFFFFFFFFFFFFFFFF  # splitmix64's finaliser
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return (x ^ (x >> 31)) & self.mask

    def _feistel(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self.half) | right

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(index)
        x = self._feistel(index)
        while x >= self.n:  # cycle walking stays inside [0, n)
            x = self._feistel(x)
        return x


class PositionOrder:
    """Position p -> row index: epoch p // n, that epoch's permutation (one cached at a time)."""

    def __init__(self, n_rows: int, seed: int, shuffle: bool = True):
        self.n_rows, self.seed, self.shuffle = n_rows, seed, shuffle
        self._epoch, self._permutation = None, None

    def row(self, position: int) -> int:
        epoch, index = divmod(position, self.n_rows)
        if not self.shuffle:
            return index
        if epoch != self._epoch:
            self._epoch, self._permutation = epoch, Permutation(self.n_rows, f"{self.seed}:{epoch}")
        return self._permutation[index]


class Windows:
    """Row i: the document pieces of stream positions i*W .. i*W+W-1 (the tail is dropped)."""

    def __init__(self, stream: Stream, window: int):
        if window < 2:
            raise ValueError(f"a window needs at least 2 tokens, got {window}")
        self.stream, self.window = stream, window

    def __len__(self) -> int:
        return self.stream.n_tokens // self.window

    def __getitem__(self, index: int) -> list[Piece]:
        start = index * self.window
        return [Piece(*piece) for piece in self.stream.window_pieces(start, start + self.window, separator=True)]

    def describe(self) -> str:
        return f"windows of {self.window} tokens"


class Documents:
    """Row i: document i's ids without its stored EOS."""

    def __init__(self, stream: Stream, separator: bool = True):
        self.stream, self.separator = stream, separator

    def __len__(self) -> int:
        return self.stream.n_documents

    def __getitem__(self, index: int) -> list[int]:
        ids = self.stream.document(index)
        return (ids[:-1] if self.separator else ids).tolist()

    def describe(self) -> str:
        return "documents"


class Pairs:
    """Row i: the i-th (source ids, target ids) pair."""

    def __init__(self, split: TokenSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.n_documents

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.split.pair(index)

    def describe(self) -> str:
        return "pairs"
