"""Training rows streamed from a token store: every row once per epoch over ranks and loader workers,
the same batches after a restart, windows that carry their document boundaries."""

import itertools

import numpy as np
import pytest
from torch.utils.data import DataLoader

from slmctl.data.store import SplitWriter, TokenSplit, TokenStore, write_meta
from slmctl.data.streaming import Documents, Permutation, PositionOrder, Windows
from slmctl.train.datamodule import StepStream

EOS = 1


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_the_permutation_is_a_bijection_and_depends_on_its_key(n):
    order = [Permutation(n, "0:0")[i] for i in range(n)]
    assert sorted(order) == list(range(n))
    if n >= 64:
        assert order != [Permutation(n, "0:1")[i] for i in range(n)] and order != list(range(n))


def indices(rows, k):
    """make_batch that returns the row indices a batch was built from."""
    return list(rows)


def stream_batches(n_rows, batch_size, rank, world_size, workers, start, count, seed=0):
    stream = StepStream(list(range(n_rows)), batch_size, seed, lambda rows, rngs: rows, start_batch=start, rank=rank,
                        world_size=world_size)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return list(itertools.islice(iter(loader), count))


def test_two_ranks_with_two_workers_each_read_every_row_exactly_once_per_epoch():
    n_rows, batch_size = 96, 8  # 12 batches per epoch
    seen = []
    for rank in (0, 1):
        batches = stream_batches(n_rows, batch_size, rank, 2, workers=2, start=0, count=24)
        assert all(len(b) == batch_size // 2 for b in batches)
        seen.append(batches)
    first_epoch = [row for rank in (0, 1) for batch in seen[rank][:12] for row in batch]
    second_epoch = [row for rank in (0, 1) for batch in seen[rank][12:] for row in batch]
    assert sorted(first_epoch) == list(range(n_rows)) and sorted(second_epoch) == list(range(n_rows))
    assert first_epoch != second_epoch  # each epoch has its own order
    # the two ranks together take what one process would
    one = stream_batches(n_rows, batch_size, 0, 1, workers=0, start=0, count=12)
    assert [sorted(a + b) for a, b in zip(seen[0][:12], seen[1][:12])] == [sorted(b) for b in one]


def test_a_stream_started_at_batch_k_yields_what_the_whole_stream_yields_from_k():
    whole = stream_batches(50, 4, 0, 1, workers=0, start=0, count=30)
    assert stream_batches(50, 4, 0, 1, workers=2, start=17, count=13) == whole[17:]
    assert stream_batches(50, 4, 0, 1, workers=3, start=0, count=30) == whole


def write_store(directory, documents, shard_tokens):
    writer = SplitWriter(directory, "train", "documents", np.dtype(np.uint16), EOS, shard_tokens)
    writer.add(documents)
    write_meta(directory, "documents", np.dtype(np.uint16), EOS, 1000, {"train": writer.summary()}, {})
    return TokenStore.open(directory).split("train")


def test_windows_carry_every_token_with_its_document_boundaries_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    documents = [rng.integers(2, 1000, size=rng.integers(1, 40)).tolist() for _ in range(200)]
    split = write_store(tmp_path, documents, shard_tokens=500)
    assert len(split.text.tokens) > 5
    windows = Windows(split.text, 37)
    rebuilt = []
    for i in range(len(windows)):
        for piece in windows[i]:
            rebuilt.append((piece.ids, piece.starts_doc, piece.ends_doc))
    # joined back, the pieces are the documents in order (up to the dropped tail); a piece ends its
    # document when its window holds the document's EOS
    in_windows = [t for t in [t for doc in documents for t in [*doc, EOS]][:len(windows) * 37] if t != EOS]
    assert [t for ids, _, _ in rebuilt for t in ids] == in_windows
    position = 0
    ends = {sum(len(d) for d in documents[:i + 1]) for i in range(len(documents))}
    starts = {sum(len(d) for d in documents[:i]) for i in range(len(documents))}
    for ids, starts_doc, ends_doc in rebuilt:
        assert starts_doc == (position in starts)
        assert not ends_doc or position + len(ids) in ends
        position += len(ids)
    assert sum(ends_doc for _, _, ends_doc in rebuilt) >= len(documents) - 2 - len(windows)
    assert Documents(split.text)[5] == documents[5]


def test_in_memory_documents_take_the_same_form_as_a_prepared_store(tmp_path):
    documents = [[5, 6, 7], [8], [9, 10]]
    prepared = write_store(tmp_path, documents, shard_tokens=4)
    in_memory = TokenSplit.from_documents(documents, EOS)
    assert [Documents(in_memory.text)[i] for i in range(3)] == [Documents(prepared.text)[i] for i in range(3)] == documents
    assert in_memory.text.tokens_between(0, 9).tolist() == prepared.text.tokens_between(0, 9).tolist()


def test_position_order_covers_each_epoch_once():
    order = PositionOrder(10, seed=3)
    assert sorted(order.row(p) for p in range(10)) == list(range(10))
    assert sorted(order.row(p) for p in range(10, 20)) == list(range(10))


def test_the_document_around_any_position_is_found_past_the_first_block_of_the_offsets_index(tmp_path):
    rng = np.random.default_rng(1)
    documents = [rng.integers(2, 1000, size=rng.integers(1, 9)).tolist() for _ in range(5000)]  # > 4 index blocks
    split = write_store(tmp_path, documents, shard_tokens=10**9)
    assert len(split.text.tokens) == 1
    starts = np.cumsum([0] + [len(d) + 1 for d in documents])
    for position in rng.integers(0, split.text.n_tokens, size=500):
        index = int(np.searchsorted(starts, position, side="right")) - 1
        assert split.text.document_span(int(position)) == (starts[index], starts[index + 1])
