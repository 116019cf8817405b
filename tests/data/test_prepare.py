"""slmctl prepare: a corpus read as a stream into a sharded token store, bad rows counted or fatal."""

import json

import numpy as np
import pytest
from conftest import cli, newest_run, write_corpus

from slmctl.data.store import TokenStore
from slmctl.data.synthetic import SyntheticWorld
from slmctl.data.tokenizer import TextTokenizer

SMALL_BPE = ["tokenizer.vocab_size=400"]


@pytest.fixture(scope="module")
def texts():
    return SyntheticWorld(seed=0, n_people=200).texts("train", 600)


def prepare(runs, *overrides):
    result = cli("prepare", *overrides, runs=runs)
    assert result.exit_code == 0, result.output
    return newest_run(runs, "prepare")


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".txt"])
def test_every_document_lands_once_in_train_or_validation_tokenised_as_the_tokenizer_says(tmp_path, texts, suffix):
    corpus = write_corpus(tmp_path / "corpus", texts, files=3, suffix=suffix)
    run = prepare(tmp_path / "runs", "data=files", f"data.train={corpus}", "data.validation_fraction=0.1",
                  "shard_tokens=4000", "batch_rows=64", *SMALL_BPE)
    store = TokenStore.open(run / "data")
    tokenizer = TextTokenizer.load(run / "data" / "tokenizer")
    train, validation = store.split("train").text, store.split("validation").text
    assert len(store.meta["splits"]["train"]["shard_files"]) > 3  # shards cut by size, not by input file
    decoded = [tokenizer.decode(stream.document(i)[:-1]) for stream in (train, validation) for i in range(stream.n_documents)]
    assert sorted(decoded) == sorted(texts)  # nothing lost, nothing twice, split by document
    assert 20 < validation.n_documents < 100
    assert all(int(stream.document(i)[-1]) == tokenizer.eos_id for stream in (train, validation)
               for i in range(stream.n_documents))
    first = train.document(0)[:-1].tolist()
    assert first == tokenizer.encode(tokenizer.decode(first))
    summary = json.loads((run / "status.json").read_text())["summary"]
    assert summary["train_documents"] + summary["validation_documents"] == len(texts)
    assert summary["tokens"] == train.n_tokens + validation.n_tokens


def test_the_split_and_the_tokens_are_the_same_every_time(tmp_path, texts):
    corpus = write_corpus(tmp_path / "corpus", texts, files=2)
    first = prepare(tmp_path / "a", "data=files", f"data.train={corpus}", *SMALL_BPE)
    second = prepare(tmp_path / "b", "data=files", f"data.train={corpus}", *SMALL_BPE)
    for split in ("train", "validation"):
        a, b = TokenStore.open(first / "data").split(split).text, TokenStore.open(second / "data").split(split).text
        assert np.array_equal(a.tokens_between(0, a.n_tokens), b.tokens_between(0, b.n_tokens))


def test_bad_rows_are_counted_skipped_and_the_first_ones_named_by_file_and_line(tmp_path, texts):
    corpus = write_corpus(tmp_path / "corpus", texts[:100], extra_lines=['{"text": "cut', '[1, 2]', '{"body": "x"}'])
    run = prepare(tmp_path / "runs", "data=files", f"data.train={corpus}", *SMALL_BPE)
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["bad_rows"]["count"] == 3
    first_file = corpus.replace("*", "0")
    assert meta["bad_rows"]["first"][0].startswith(f"{first_file}:101: not valid JSON")
    assert meta["bad_rows"]["first"][1].startswith(f"{first_file}:102: a row must be a JSON object")
    assert "no column 'text'" in meta["bad_rows"]["first"][2]
    assert "skipped 3 bad rows" in (run / "log.txt").read_text()


def test_on_bad_row_error_stops_at_the_first_bad_row_with_one_line(tmp_path, texts):
    corpus = write_corpus(tmp_path / "corpus", texts[:50], extra_lines=['{"text": "cut'])
    result = cli("prepare", "data=files", f"data.train={corpus}", "data.on_bad_row=error", *SMALL_BPE, runs=tmp_path / "runs")
    assert result.exit_code == 2
    assert f"{corpus.replace('*', '0')}:51: not valid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_source_target_rows_are_prepared_as_pairs(tmp_path):
    rows = [{"source": f"question {i}?", "target": f"answer {i}"} for i in range(200)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = prepare(tmp_path / "runs", "data=files", f"data.train={path}", *SMALL_BPE)
    store = TokenStore.open(run / "data")
    tokenizer = TextTokenizer.load(run / "data" / "tokenizer")
    assert store.layout == "pairs"
    split = store.split("train")
    pairs = {tuple(tokenizer.decode(ids) for ids in split.pair(i)) for i in range(split.n_documents)}
    assert pairs <= {(r["source"], r["target"]) for r in rows} and len(pairs) == split.n_documents


def test_a_given_tokenizer_is_used_as_it_is(tmp_path, texts):
    corpus = write_corpus(tmp_path / "corpus", texts[:200])
    first = prepare(tmp_path / "runs", "data=files", f"data.train={corpus}", *SMALL_BPE)
    again = prepare(tmp_path / "runs", "data=files", f"data.train={corpus}", "tokenizer=run",
                    f"tokenizer.path={first / 'data' / 'tokenizer'}")
    a, b = TokenStore.open(first / "data").split("train").text, TokenStore.open(again / "data").split("train").text
    assert np.array_equal(a.tokens_between(0, a.n_tokens), b.tokens_between(0, b.n_tokens))


def test_no_such_corpus_is_one_line_and_exit_2(tmp_path):
    result = cli("prepare", "data=files", f"data.train={tmp_path}/nothing-*.jsonl", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "no such data file" in result.stderr


def test_a_hub_dataset_is_streamed_split_by_split(tmp_path, texts):
    # a local dataset directory is what `datasets.load_dataset(id, streaming=True)` reads without network
    dataset = tmp_path / "dataset"
    write_corpus(dataset / "train", texts[:300])
    write_corpus(dataset / "validation", texts[300:340])
    (dataset / "train" / "part-0.jsonl").rename(dataset / "train.jsonl")
    (dataset / "validation" / "part-0.jsonl").rename(dataset / "validation.jsonl")
    run = prepare(tmp_path / "runs", "data=hub", f"data.id={dataset}", *SMALL_BPE)
    store = TokenStore.open(run / "data")
    assert store.split("train").n_documents == 300 and store.split("validation").n_documents == 40


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_parquet_and_csv_corpora_are_read_too(tmp_path, texts, suffix):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    table, path = pa.table({"body": texts[:150]}), tmp_path / f"corpus{suffix}"
    if suffix == ".parquet":
        pyarrow.parquet.write_table(table, path, row_group_size=40)
    else:
        pyarrow.csv.write_csv(table, path)
    run = prepare(tmp_path / "runs", "data=files", f"data.train={path}", "data.columns.text=body", *SMALL_BPE)
    store = TokenStore.open(run / "data")
    assert store.split("train").n_documents + store.split("validation").n_documents == 150


def test_a_damaged_store_is_refused_in_one_line(tmp_path, texts):
    corpus = write_corpus(tmp_path / "corpus", texts[:300])
    runs = tmp_path / "runs"
    run = prepare(runs, "data=files", f"data.train={corpus}", *SMALL_BPE)
    shard = next((run / "data" / "train").glob("*.text.tokens"))
    shard.write_bytes(shard.read_bytes()[:-2])  # one token short
    result = cli("pretrain", "model=tiny", "data=prepared", "data.path=prepare/latest", "trainer.max_steps=1", runs=runs)
    assert result.exit_code == 2
    assert shard.name in result.stderr and len(result.stderr.strip().splitlines()) == 1
