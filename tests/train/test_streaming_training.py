"""Training from a prepared token store: streamed with loader workers, packed with document isolation,
resumed exactly after kill -9 in the middle of an epoch."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_PRETRAIN, cli, newest_run, resumed_from, wait_for_steps, write_corpus
from safetensors.torch import load_file

from slmctl.data.synthetic import SyntheticWorld
from slmctl.data.tokenizer import TextTokenizer

# dropout on: a resumed run ends with the uninterrupted run's weights only if its random state was restored too
STREAMED = ["model=tiny", "model.dropout=0.1", "data=prepared", "data.path=prepare/latest", "data.num_workers=2",
            "batch_size=8", "max_source_len=48", "max_target_len=16", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", "trainer.val_check_interval=4", "data.validation_rows=16"]


@pytest.fixture(scope="module")
def prepared_runs(tmp_path_factory):
    """A runs directory holding one prepare run of a 3-shard gzip corpus (about 400 windows of 64 tokens)."""
    root = tmp_path_factory.mktemp("streamed")
    texts = SyntheticWorld(seed=0, n_people=200).texts("train", 800)
    corpus = write_corpus(root / "corpus", texts, files=3, suffix=".jsonl.gz")
    prepare_corpus(corpus, root / "runs")
    return root / "runs"


def prepare_corpus(corpus, runs, *overrides):
    result = cli("prepare", "data=files", f"data.train={corpus}", "tokenizer.vocab_size=400", "shard_tokens=5000",
                 *overrides, runs=runs)
    assert result.exit_code == 0, result.output


def weights(run):
    return load_file(run / "model" / "model.safetensors")


@pytest.mark.parametrize("model, objective", [("tiny", "span_corruption"), ("deconly-tiny", "causal_lm")])
def test_pretrain_streams_the_prepared_corpus_with_its_tokenizer_and_reports_packing(prepared_runs, model, objective):
    result = cli("pretrain", *STREAMED, f"model={model}", f"objective={objective}", "max_source_len=256",
                 "max_target_len=64", "trainer.max_steps=3", "--name", model, runs=prepared_runs)
    assert result.exit_code == 0, result.output
    run = newest_run(prepared_runs, "pretrain", model)
    prepared = newest_run(prepared_runs, "prepare")
    assert TextTokenizer.load(run / "model").vocab() == TextTokenizer.load(prepared / "data" / "tokenizer").vocab()
    inputs = json.loads((run / "inputs.json").read_text())
    assert any(i["role"] == "data" and i["stage"] == "prepare" for i in inputs if "role" in i)
    summary = json.loads((run / "status.json").read_text())["summary"]
    assert 0.97 <= summary["packing_efficiency"] <= 1.0  # the goal at the default lengths


def test_an_objective_that_does_not_fit_the_prepared_layout_is_one_line(prepared_runs):
    result = cli("pretrain", *STREAMED, "objective=seq2seq", "trainer.max_steps=1", runs=prepared_runs)
    assert result.exit_code == 2
    assert "holds documents, and this objective trains on pairs" in result.stderr


def test_kill_9_in_the_middle_of_an_epoch_with_two_workers_resumes_to_the_uninterrupted_weights(prepared_runs, tmp_path):
    """...on the data it started with, though prepare/latest has moved on since."""
    steps = ["trainer.max_steps=10", "checkpoint_every=2"]
    whole = cli("pretrain", *STREAMED, *steps, "--name", "whole", runs=prepared_runs)
    assert whole.exit_code == 0, whole.output
    runs = tmp_path / "runs"  # its own runs directory, so the wait sees only this run's steps
    corpus = str(prepared_runs.parent / "corpus" / "part-*.jsonl.gz")
    prepare_corpus(corpus, runs)  # the same store again (prepare is deterministic), as prepare/latest here
    command = [sys.executable, "-m", "slmctl", "pretrain", *STREAMED, *steps, "--runs-dir", str(runs)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_steps(runs, "pretrain", 5, process)
    finally:
        process.kill()
        process.wait()
    killed = newest_run(runs, "pretrain")
    assert json.loads((killed / "status.json").read_text())["status"] == "running"  # kill -9 left it so
    prepare_corpus(corpus, runs, "tokenizer.vocab_size=300")  # prepare/latest now names other data
    resumed = cli("pretrain", f"resume={killed}", runs=runs)
    assert resumed.exit_code == 0, resumed.output
    (line,) = resumed_from(killed)  # wherever the kill landed: after a checkpoint, before the end
    assert 2 <= int(line.split()[3]) <= 8, line
    a, b = weights(newest_run(prepared_runs, "pretrain", "whole")), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distilling_from_prepared_pairs_trains_exactly_as_from_the_same_pairs_in_memory(llama_dir, tmp_path):
    world = SyntheticWorld(seed=0, n_people=200)
    for split, n in (("train", 96), ("validation", 16)):
        rows = world.qa(split=split, n=n, min_facts=1, max_facts=2)
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"source": r["source"], "target": r["target"]}) + "\n"
                                                         for r in rows))
    files = [f"data.train={tmp_path / 'train.jsonl'}", f"data.validation={tmp_path / 'validation.jsonl'}"]
    runs = tmp_path / "runs"
    prepared = cli("prepare", "data=files", *files, "tokenizer=teacher", "teacher=llama", f"teacher.path={llama_dir}",
                   runs=runs)
    assert prepared.exit_code == 0, prepared.output
    common = [f"teacher.path={llama_dir}", "student=tiny", "batch_size=8", "max_source_len=64", "max_target_len=12",
              "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.enable_progress_bar=false"]
    streamed = cli("distill", *common, "data=prepared", "data.path=prepare/latest", "data.num_workers=2", "--name", "streamed",
                   runs=runs)
    assert streamed.exit_code == 0, streamed.output
    in_memory = cli("distill", *common, "data=files", *files, "--name", "in-memory", runs=runs)
    assert in_memory.exit_code == 0, in_memory.output
    a, b = weights(newest_run(runs, "distill", "streamed")), weights(newest_run(runs, "distill", "in-memory"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_readme_real_corpus_path_prepare_pretrain_distill(llama_dir, tmp_path):
    """README's three commands at toy size: text and pairs prepared with the teacher's tokenizer,
    an encoder-decoder pretrained on the text, then distilled from the teacher on the pairs."""
    world = SyntheticWorld(seed=0, n_people=200)
    corpus = write_corpus(tmp_path / "corpus", world.texts("train", 300), files=2, suffix=".jsonl.gz")
    pairs = tmp_path / "qa.jsonl"
    pairs.write_text("".join(json.dumps({"source": r["source"], "target": r["target"]}) + "\n"
                             for r in world.qa(split="train", n=120, min_facts=1, max_facts=2)))
    runs, teacher = tmp_path / "runs", ["tokenizer=teacher", "teacher=llama", f"teacher.path={llama_dir}"]
    tiny = ["batch_size=4", "max_source_len=48", "max_target_len=12", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "data.validation_rows=8"]
    assert cli("prepare", "data=files", f"data.train={corpus}", *teacher, "--name", "text", runs=runs).exit_code == 0
    pretrained = cli("pretrain", "model=tiny", "data=prepared", "data.path=prepare/latest", "objective=span_corruption",
                     *tiny, runs=runs)
    assert pretrained.exit_code == 0, pretrained.output
    assert cli("prepare", "data=files", f"data.train={pairs}", *teacher, "--name", "pairs", runs=runs).exit_code == 0
    distilled = cli("distill", f"teacher.path={llama_dir}", "student.init=pretrain/latest", "data=prepared",
                    f"data.path={newest_run(runs, 'prepare', 'pairs')}", *tiny, runs=runs)
    assert distilled.exit_code == 0, distilled.output
    summary = json.loads((newest_run(runs, "distill") / "status.json").read_text())["summary"]
    assert summary["steps"] == 2 and summary["val_kd_loss"] > 0
    # documents are not pairs; a student whose tokenizer is not the data's: each refused in one line
    wrong = cli("distill", f"teacher.path={llama_dir}", "student.init=pretrain/latest", "data=prepared",
                f"data.path={newest_run(runs, 'prepare', 'text')}", *tiny, runs=runs)
    assert wrong.exit_code == 2 and "holds documents" in wrong.stderr
    assert cli("prepare", "data=files", f"data.train={pairs}", "tokenizer.vocab_size=300", "--name", "bpe", runs=runs).exit_code == 0
    wrong = cli("distill", f"teacher.path={llama_dir}", "student.init=pretrain/latest", "data=prepared",
                f"data.path={newest_run(runs, 'prepare', 'bpe')}", *tiny, runs=runs)
    assert wrong.exit_code == 2 and "has another tokenizer than the prepared data" in wrong.stderr


def test_seq2seq_packing_is_refused_rather_than_silently_ignored(tmp_path):
    result = cli("pretrain", *TINY_PRETRAIN, "objective.packing=true", runs=tmp_path / "runs")
    assert result.exit_code == 2 and "objective.packing=true is not supported for seq2seq" in result.stderr
