"""`slmctl prepare`: a corpus read once (streamed), tokenised and written as a token store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from slmctl.config.choices import Layout


@dataclass
class PrepareSchema:
    """slmctl prepare: a corpus read once (streamed), tokenised and written as a token store."""
    seed: int = 0  # the train/validation split of documents, the tokenizer's sample order
    layout: Layout = Layout.auto  # documents (text column) | pairs (source/target) | auto: what the first row has
    shard_tokens: int = 67108864  # tokens per shard file (2**26; 128 MB at uint16)
    batch_rows: int = 1024  # rows a tokenizing worker takes at a time
    workers: Optional[int] = None  # tokenizing worker processes (null: one per core)
    max_rows: Optional[int] = None  # stop after this many rows (a sample of a larger corpus)
    data: Any = None
    tokenizer: Any = None
    teacher: Any = None  # tokenizer=teacher: the teacher whose tokenizer the data is prepared with
