"""Interrupted evals and benches resume where they stopped: what was finished is read back from
the run's progress file, only the rest is computed, and the results equal an uninterrupted run's."""

import json
import os

import pytest
import torch
from conftest import TINY_PRETRAIN, cli, newest_run, stage_runs, train_run

from slmctl.eval.predict import predict_batches
from slmctl.progress import append_progress, read_progress
from slmctl.runs.run import Run

# 1,024 held-out questions, 16 batches of 64, a few new tokens each: a long eval that runs in seconds.
EVAL = ["task.n_people=200", "task.n=1024", "batch_size=64", "generation.max_new_tokens=4", "bootstrap=100"]
BENCH = ["tiny", "deconly-tiny", "--input-lens", "8,16", "--output-lens", "2", "--repeat", "1", "--warmup", "0"]
TIMINGS = {"first_token_ms", "first_token_ms_p90", "first_token_ms_stdev", "decode_tok_s", "decode_tok_s_p90",
           "decode_tok_s_stdev", "e2e_ms", "peak_mem_mb", "load_s", "samples", "bandwidth_bound_tok_s", "bound_fraction"}
BANDWIDTH = {"bandwidth_bound_tok_s", "bound_fraction"}  # filled in for every record after all are measured


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests compare runs with each other, not speeds; on a busy 2-core machine one torch
    thread generated 8x faster than two (conftest's setting), which is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny encoder-decoder of one encoder and one decoder layer trained for three steps: these tests
    compare runs with each other, and a shallow model generates the 1,024 answers ~3x faster."""
    return train_run(tmp_path_factory.mktemp("runs"), "pretrain",
                     [*TINY_PRETRAIN, "model.n_encoder_layers=1", "model.n_decoder_layers=1"], name="encdec").path


def count_generated(monkeypatch, stop_after: int | None = None) -> list[int]:
    """The indices of the examples eval generates from now on; after `stop_after` batches the
    next one raises KeyboardInterrupt (what Ctrl-C raises) instead of being generated."""
    generated = []

    def batches(*args, **kwargs):
        for number, (batch, texts) in enumerate(predict_batches(*args, **kwargs), start=1):
            generated.extend(batch)
            yield batch, texts
            if number == stop_after:
                raise KeyboardInterrupt

    monkeypatch.setattr("slmctl.eval.predict.predict_batches", batches)
    return generated


def test_interrupted_eval_of_1024_prompts_resumes_generating_only_the_missing_ones(tmp_path, model, monkeypatch):
    runs = tmp_path / "runs"
    whole = cli("eval", str(model), *EVAL, "--name", "whole", runs=runs)
    assert whole.exit_code == 0, whole.output

    generated = count_generated(monkeypatch, stop_after=3)
    killed = cli("eval", str(model), *EVAL, "--name", "killed", runs=runs)
    assert killed.exit_code == 130 and "resume with: slmctl eval resume=" in killed.output, killed.output
    killed_dir = newest_run(runs, "eval", "killed")
    assert Run.open(killed_dir).status()["status"] == "interrupted"
    saved = killed_dir / "progress" / "synthetic_qa" / "encdec.jsonl"
    assert len(read_progress(saved)) == len(generated) == 3 * 64
    with open(saved, "a", encoding="utf-8") as f:
        f.write('{"id": "test-0123", "model": "')  # killed in the middle of a line

    finished_before = set(generated)
    generated = count_generated(monkeypatch)
    resumed = cli("eval", "resume=unfinished", runs=runs)
    assert resumed.exit_code == 0, resumed.output
    assert len(generated) == 1024 - 3 * 64 and not finished_before & set(generated)  # only the missing ones
    assert Run.open(killed_dir).status()["status"] == "succeeded"
    assert "192 of 1024 examples reused from progress/synthetic_qa/encdec.jsonl" in (killed_dir / "log.txt").read_text()
    assert len(read_progress(saved)) == len(saved.read_text().splitlines()) == 1024  # the partial line was cut off

    whole_dir = newest_run(runs, "eval", "whole")
    assert (killed_dir / "predictions.jsonl").read_text() == (whole_dir / "predictions.jsonl").read_text()
    resumed_metrics, whole_metrics = (json.loads((d / "metrics.json").read_text())["tasks"]["synthetic_qa"]
                                      for d in (killed_dir, whole_dir))
    costs = resumed_metrics.pop("cost")["encdec"], whole_metrics.pop("cost")["encdec"]
    assert resumed_metrics == whole_metrics
    for cost in costs:  # the resumed run's cost still counts the answers generated before the interruption
        assert cost["examples"] == 1024 and cost["cpu_s"] > 0 and cost["wall_s"] > 0
    assert len((whole_dir / "predictions.jsonl").read_text().splitlines()) == 1024


def test_interrupted_bench_resumes_measuring_only_the_rest(tmp_path, monkeypatch):
    from slmctl.bench import stage

    runs = tmp_path / "runs"
    whole = cli("bench", *BENCH, "--name", "whole", runs=runs)
    assert whole.exit_code == 0, whole.output

    measure, load_for_bench = stage.measure, stage.load_for_bench
    measured, loaded, stop_after = [], [], 3

    def counting_measure(loaded_model, device, batch, input_len, output_len, *args):
        if len(measured) == stop_after:
            raise KeyboardInterrupt
        measured.append((loaded_model.name, batch, input_len, output_len))
        return measure(loaded_model, device, batch, input_len, output_len, *args)

    def counting_load(ref, *args):
        loaded.append(ref)
        return load_for_bench(ref, *args)

    monkeypatch.setattr(stage, "measure", counting_measure)
    monkeypatch.setattr(stage, "load_for_bench", counting_load)
    killed = cli("bench", *BENCH, "--name", "killed", runs=runs)
    assert killed.exit_code == 130, killed.output
    killed_dir = newest_run(runs, "bench", "killed")
    before = [p["record"] for p in read_progress(killed_dir / "progress" / "bench.jsonl")]
    assert [(r["model"], r["input_len"]) for r in before] == [("tiny", 8), ("tiny", 16), ("deconly-tiny", 8)]

    measured.clear()
    loaded.clear()
    stop_after = None
    progress = killed_dir / "progress" / "bench.jsonl"  # as if the first records were timed on another machine
    progress.write_text(progress.read_text().replace(json.dumps(before[0]["cpu"]), '"Another CPU"', 1))
    resumed = cli("bench", "resume=unfinished", runs=runs)
    assert resumed.exit_code == 0, resumed.output
    cpus = "; ".join(sorted(["Another CPU", before[0]["cpu"]]))  # sorted: the order depends on this machine's name
    assert f"warning: these records were timed on different CPUs ({cpus})" in (killed_dir / "log.txt").read_text()
    assert measured == [("deconly-tiny", 1, 16, 2)]  # the one configuration left
    assert loaded == ["deconly-tiny"]  # tiny was finished: not even loaded

    records = json.loads((killed_dir / "bench.json").read_text())["records"]
    for reused, saved in zip(records, before):  # the timings of the first run, not new ones
        assert {k: v for k, v in reused.items() if k not in BANDWIDTH | {"cpu"}} == \
            {k: v for k, v in saved.items() if k not in BANDWIDTH | {"cpu"}}
    expected = json.loads((newest_run(runs, "bench", "whole") / "bench.json").read_text())["records"]

    def without_timings(rows):
        return [{k: v for k, v in r.items() if k not in TIMINGS | {"cpu"}} for r in rows]

    assert without_timings(records) == without_timings(expected) and len(records) == 4
    assert all(r["bound_fraction"] > 0 for r in records)
    assert Run.open(killed_dir).status()["summary"]["records"] == 4


def test_a_partial_last_line_is_ignored_and_cut_off_before_the_next_append(tmp_path):
    path = tmp_path / "progress" / "x.jsonl"
    assert read_progress(path) == []
    append_progress(path, [{"id": "a"}, {"id": "b"}])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "c", "predic')  # a process killed mid-write
    assert read_progress(path) == [{"id": "a"}, {"id": "b"}]
    append_progress(path, [{"id": "c"}])
    assert read_progress(path) == [{"id": "a"}, {"id": "b"}, {"id": "c"}]


STAGE_ARGS = {  # long enough to be still running when the signal comes; the marker shows the stage has started
    "eval": (lambda model: ["eval", str(model), "task=synthetic_qa", *EVAL], "progress/*"),
    "export": (lambda model: ["export", "onnx", str(model), "--quantize", "int8", "report.prompts=64"], "export"),
}


@pytest.mark.parametrize("stage", STAGE_ARGS)
def test_sigterm_during_eval_or_export_marks_the_run_interrupted_with_exit_130(model, tmp_path, stage):
    """A real SIGTERM to `python -m slmctl eval|export` once it is working in its run directory."""
    import signal
    import subprocess
    import sys
    import time

    args, marker = STAGE_ARGS[stage]
    runs = tmp_path / "runs"
    process = subprocess.Popen([sys.executable, "-m", "slmctl", *args(model), "--runs-dir", str(runs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # a crash prints its stack in stderr
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(runs.glob(f"{stage}/*/{marker}")) and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "stopped by SIGTERM" in stderr and f"resume with: slmctl {stage} resume=" in stderr
    (run_dir,) = stage_runs(runs, stage)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and "SIGTERM" in status["error"]
    assert not (run_dir / ".lock").exists() and not (runs / stage / "latest").exists()
