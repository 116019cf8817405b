"""Run directories: the files every stage leaves behind, the manifest, "latest", lookup."""

import hashlib
import json
import os
import re
import shlex
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRETRAIN, cli
from omegaconf import OmegaConf

from slmctl.runs import run as run_module
from slmctl.runs.lookup import RunError, RunInfo, latest_run, list_runs, resolve_run, verify_manifest
from slmctl.runs.run import Run

CONFIG = {"model": {"preset": "tiny", "d_model": 64}, "lr": 3e-4, "name": "${model.preset}-run"}
ARGV = ["slmctl", "pretrain", "model=tiny", "--name", "my run"]


@pytest.fixture
def clock(monkeypatch):
    """A UTC clock that advances one second per reading, so ordering is deterministic."""
    state = {"now": datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)}

    def tick():
        state["now"] += timedelta(seconds=1)
        return state["now"]

    monkeypatch.setattr(run_module, "utc_now", tick)
    return state


def new_run(runs_dir, stage="pretrain", name="tiny", **kwargs):
    return Run.create(runs_dir, stage, name, CONFIG, ARGV, **kwargs)


def finished_run(runs_dir, stage="pretrain", name="tiny", summary=None):
    run = new_run(runs_dir, stage, name)
    run.write_json("model/model.json", {"preset": "tiny"})
    run.succeed(summary)
    return run


def temp_files(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_create_writes_the_run_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git repository
    run = new_run(tmp_path / "runs", device="cuda:0")

    assert run.path.parent == (tmp_path / "runs" / "pretrain").resolve()
    assert re.fullmatch(r"\d{8}-\d{6}-tiny", run.path.name)
    assert (run.stage, run.name) == ("pretrain", "tiny")
    assert run.model_dir == run.path / "model" and run.checkpoint_dir == run.path / "checkpoints"

    config = OmegaConf.to_container(OmegaConf.load(run.path / "config.yaml"))
    assert config == {"model": {"preset": "tiny", "d_model": 64}, "lr": 3e-4, "name": "tiny-run"}  # resolved
    assert run.config() == config
    command = (run.path / "command.txt").read_text()
    assert command == shlex.join(ARGV) + "\n" and shlex.split(command) == ARGV

    env = json.loads((run.path / "env.json").read_text())
    assert env["device"] == "cuda:0"
    assert env["versions"]["torch"] and env["versions"]["python"] and env["versions"]["slmctl"]
    assert env["git_commit"] is None
    assert env["cpu_count"] == os.cpu_count() and env["torch_threads"] == torch.get_num_threads()
    assert env["hostname"] and env["platform"]

    status = json.loads((run.path / "status.json").read_text())
    assert status["status"] == "running" and status["error"] is None
    assert status["finished"] is None and status["seconds"] is None and status["summary"] == {}
    assert datetime.fromisoformat(status["started"]).tzinfo is not None
    assert run.status() == status
    assert json.loads((run.path / "inputs.json").read_text()) == []


def test_env_records_the_git_commit_of_the_working_directory(tmp_path):
    env = json.loads((new_run(tmp_path).path / "env.json").read_text())
    commit = run_module.git_commit()  # the tests run inside the slmctl checkout, if it is one
    assert env["git_commit"] == commit
    if commit is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", commit)


def test_runs_created_in_the_same_second_get_different_directories(tmp_path, monkeypatch):
    moment = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
    monkeypatch.setattr(run_module, "utc_now", lambda: moment)
    paths = [new_run(tmp_path).path for _ in range(3)]
    assert [p.name for p in paths] == ["20250301-120000-tiny", "20250301-120000-tiny-2", "20250301-120000-tiny-3"]


def test_log_and_metrics_append_lines(tmp_path):
    run = new_run(tmp_path)
    run.log("step 1")
    run.log("step 2")
    lines = (run.path / "log.txt").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["step 1", "step 2"]
    datetime.fromisoformat(lines[0].split(" ", 1)[0])

    run.log_metrics({"step": 1, "loss": torch.tensor(2.5)})
    run.log_metrics({"step": 2, "val_loss": 2.0, "time": "given"})
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == 2.5 and "time" in records[0]
    assert records[1] == {"step": 2, "val_loss": 2.0, "time": "given"}
    assert run.metrics() == records

    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-append
    assert run.metrics() == records


def test_add_input_records_lineage_once(tmp_path):
    source = finished_run(tmp_path / "runs")
    run = new_run(tmp_path / "runs", stage="eval")
    run.add_input("run", "pretrain/latest", source.path)
    run.add_input("run", "pretrain/latest", source.path)  # e.g. again on resume
    run.add_input("run", "model dir", source.model_dir)  # a path inside a run: still that run's stage
    run.add_input("hub", "microsoft/Phi-3.5-mini-instruct", "microsoft/Phi-3.5-mini-instruct")
    run.add_input("file", "data.jsonl", "data.jsonl")
    assert run.inputs() == json.loads((run.path / "inputs.json").read_text()) == [
        {"kind": "run", "ref": "pretrain/latest", "path": str(source.path.resolve()), "stage": "pretrain"},
        {"kind": "run", "ref": "model dir", "path": str(source.model_dir.resolve()), "stage": "pretrain"},
        {"kind": "hub", "ref": "microsoft/Phi-3.5-mini-instruct", "path": "microsoft/Phi-3.5-mini-instruct",
         "stage": None},
        {"kind": "file", "ref": "data.jsonl", "path": str(Path("data.jsonl").resolve()), "stage": None},
    ]
    with pytest.raises(RunError, match="input kind"):
        run.add_input("url", "x", None)


def test_writes_are_atomic_and_stay_inside_the_run(tmp_path):
    run = new_run(tmp_path)
    assert run.write_text("notes/a.txt", "hello") == run.path / "notes" / "a.txt"
    run.write_json("results.json", {"score": 0.5, "file": tmp_path})
    run.write_bytes("model/model.safetensors", b"\x00\x01")
    assert (run.path / "notes/a.txt").read_text() == "hello"
    assert json.loads((run.path / "results.json").read_text()) == {"score": 0.5, "file": str(tmp_path)}
    assert (run.path / "model/model.safetensors").read_bytes() == b"\x00\x01"

    for outside in ("../escape.txt", "model/../../escape.txt", str(tmp_path / "escape.txt"), "."):
        with pytest.raises(RunError, match="outside run"):
            run.write_text(outside, "x")
    for bookkeeping in ("status.json", "MANIFEST.json", "./log.txt"):
        with pytest.raises(RunError, match="the run keeps it itself"):
            run.write_text(bookkeeping, "x")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "pretrain" / "escape.txt").exists()
    assert temp_files(tmp_path) == []


def test_succeed_writes_a_manifest_that_matches_the_files(tmp_path):
    run = new_run(tmp_path)
    run.write_bytes("model/model.safetensors", os.urandom(3000))
    run.write_json("model/model.json", {"preset": "tiny"})
    run.write_bytes("checkpoints/step-00000100/state.pt", b"changes")
    run.log("training")
    run.log_metrics({"loss": 1.0})
    run.succeed({"val_loss": 1.25, "steps": 100})

    manifest = json.loads((run.path / "MANIFEST.json").read_text())
    assert list(manifest) == sorted(manifest)
    assert set(manifest) == {"command.txt", "config.yaml", "env.json", "inputs.json",
                             "model/model.json", "model/model.safetensors"}
    for relative, entry in manifest.items():
        data = (run.path / relative).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    status = run.status()
    assert status["status"] == "succeeded" and status["error"] is None
    assert status["summary"] == {"val_loss": 1.25, "steps": 100}
    assert status["seconds"] == pytest.approx(
        (datetime.fromisoformat(status["finished"]) - datetime.fromisoformat(status["started"])).total_seconds(),
        abs=1e-3)
    assert status["seconds"] >= 0
    assert verify_manifest(run.path) == []
    assert temp_files(tmp_path) == []


def test_verify_manifest_detects_modified_removed_and_added_files(tmp_path):
    run = new_run(tmp_path)
    run.write_bytes("model/model.safetensors", b"weights" * 100)
    run.write_json("model/model.json", {"preset": "tiny"})
    run.write_text("results.json", "{}")
    run.succeed()
    (run.path / "checkpoints").mkdir()
    (run.path / "checkpoints" / "late.pt").write_bytes(b"ignored")  # checkpoints are not covered
    assert verify_manifest(run.path) == []

    weights = run.path / "model" / "model.safetensors"
    weights.write_bytes(b"weightz" * 100)  # same size, different bytes
    (run.path / "model" / "model.json").unlink()
    (run.path / "results.json").write_text("{}\n")
    (run.path / "extra.txt").write_text("new")
    problems = verify_manifest(run.path)
    assert len(problems) == 4
    assert any(p.startswith("model/model.safetensors:") and "sha256" in p for p in problems)
    assert any(p.startswith("model/model.json:") and "missing" in p for p in problems)
    assert any(p.startswith("results.json:") and "size" in p for p in problems)
    assert any(p.startswith("extra.txt:") for p in problems)

    unfinished = new_run(tmp_path)
    assert "missing" in verify_manifest(unfinished.path)[0]


def test_a_finished_run_is_sealed(tmp_path):
    run = finished_run(tmp_path)
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    attempts = [lambda: run.write_text("a.txt", "x"), lambda: run.write_json("a.json", {}),
                lambda: run.write_bytes("a.bin", b"x"), lambda: run.log("x"), lambda: run.log_metrics({"x": 1}),
                lambda: run.add_input("file", "f", tmp_path), lambda: run.succeed(), lambda: run.fail("x"),
                lambda: run.interrupt(), lambda: run.resume(), lambda: Run.open(run.path).write_text("a.txt", "x")]
    for attempt in attempts:
        with pytest.raises(RunError, match="sealed"):
            attempt()
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == before

    failed = new_run(tmp_path)
    failed.fail("boom")
    with pytest.raises(RunError, match="failed and is sealed"):
        failed.write_text("a.txt", "x")


def test_latest_points_to_the_newest_succeeded_run_and_skips_failed(tmp_path, clock):
    first = finished_run(tmp_path)
    second = finished_run(tmp_path)
    link = tmp_path / "pretrain" / "latest"
    assert link.is_symlink() and os.readlink(link) == second.path.name  # relative: the runs dir can move
    assert latest_run(tmp_path, "pretrain") == second.path

    failed = new_run(tmp_path)
    failed.fail("CUDA out of memory\nTraceback ...")
    assert os.readlink(link) == second.path.name
    assert latest_run(tmp_path, "pretrain") == second.path
    assert failed.status()["status"] == "failed" and failed.status()["error"] == "CUDA out of memory"
    assert "Traceback" in (failed.path / "log.txt").read_text()

    running = new_run(tmp_path)
    assert latest_run(tmp_path, "pretrain") == second.path
    running.interrupt()
    assert running.status()["status"] == "interrupted"
    assert latest_run(tmp_path, "pretrain") == second.path
    assert first.path != second.path
    assert temp_files(tmp_path) == []


def test_latest_survives_a_deleted_or_dangling_symlink(tmp_path, clock):
    finished_run(tmp_path)
    newest = finished_run(tmp_path)
    failed = new_run(tmp_path)
    failed.fail("boom")
    link = tmp_path / "pretrain" / "latest"

    link.unlink()
    assert latest_run(tmp_path, "pretrain") == newest.path
    assert resolve_run("pretrain/latest", tmp_path) == newest.path

    link.symlink_to("20990101-000000-gone")  # dangling
    assert latest_run(tmp_path, "pretrain") == newest.path
    link.unlink()
    link.symlink_to(failed.path.name)  # pointing at a run that did not succeed
    assert latest_run(tmp_path, "pretrain") == newest.path

    assert latest_run(tmp_path, "distill") is None


def test_interrupted_run_can_be_reopened_and_resumed(tmp_path):
    run = new_run(tmp_path)
    run.log_metrics({"step": 1, "val_loss": 3.0})
    run.interrupt()
    reopened = Run.open(run.path)
    assert (reopened.path, reopened.stage, reopened.name) == (run.path, "pretrain", "tiny")
    assert reopened.config() == run.config() and reopened.metrics() == run.metrics()
    reopened.resume()
    assert reopened.status()["status"] == "running" and reopened.status()["finished"] is None
    reopened.write_json("model/model.json", {})
    reopened.succeed()
    assert reopened.status()["started"] == run.status()["started"]
    assert latest_run(tmp_path, "pretrain") == run.path


def test_open_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(RunError, match="is not a run directory"):
        Run.open(tmp_path)


def test_bad_stage_or_name_is_refused(tmp_path):
    for stage, name in (("pretrain", "a/b"), ("pretrain", ""), ("../x", "ok"), ("pretrain", "my run")):
        with pytest.raises(RunError, match="not a valid directory name"):
            Run.create(tmp_path, stage, name, CONFIG, ARGV)
    with pytest.raises(RunError, match="cannot be resolved"):
        Run.create(tmp_path, "pretrain", "ok", {"a": "${missing}"}, ARGV)
    assert not (tmp_path / "pretrain").exists() or list((tmp_path / "pretrain").iterdir()) == []


def test_resolve_run_accepts_every_form(tmp_path, monkeypatch, clock):
    monkeypatch.chdir(tmp_path)
    runs_dir = tmp_path / "runs"
    older = finished_run(runs_dir)
    newest = finished_run(runs_dir)

    assert resolve_run(older.path, runs_dir) == older.path
    assert resolve_run(str(older.path), runs_dir) == older.path
    assert resolve_run(runs_dir / "pretrain" / "latest", runs_dir) == newest.path
    assert resolve_run("runs/pretrain/latest", "runs") == newest.path
    assert resolve_run("pretrain/latest", runs_dir) == newest.path
    assert resolve_run("latest:pretrain", runs_dir) == newest.path
    assert resolve_run(f"pretrain/{older.path.name}", runs_dir) == older.path
    assert resolve_run(older.path.name, runs_dir) == older.path
    # a runs/ path that names a different location than runs_dir still finds the stage under runs_dir
    assert resolve_run("elsewhere/runs/pretrain/latest", runs_dir) == newest.path


def test_resolve_run_errors_are_one_line_and_say_what_to_do(tmp_path):
    runs_dir = tmp_path / "runs"
    with pytest.raises(RunError) as error:
        resolve_run("pretrain/latest", runs_dir)
    assert str(error.value) == f"no succeeded pretrain run under {runs_dir}/ (run `slmctl pretrain` first)"

    failed = new_run(runs_dir)
    failed.fail("boom")
    with pytest.raises(RunError, match=r"no succeeded pretrain run .*run `slmctl pretrain` first"):
        resolve_run("latest:pretrain", runs_dir)
    with pytest.raises(RunError, match="no run 'nonesuch'.*<stage>/latest"):
        resolve_run("nonesuch", runs_dir)
    with pytest.raises(RunError, match="is not a run directory"):
        resolve_run(tmp_path, runs_dir)
    with pytest.raises(RunError, match="needs a stage"):
        resolve_run("latest", runs_dir)

    same_name = failed.path.name
    other_stage = runs_dir / "distill" / same_name
    other_stage.mkdir(parents=True)
    (other_stage / "status.json").write_text((failed.path / "status.json").read_text())
    with pytest.raises(RunError, match="ambiguous"):
        resolve_run(same_name, runs_dir)

    for ref in ("pretrain/latest", "nonesuch", "latest:eval", "latest", same_name, str(tmp_path)):
        with pytest.raises(RunError) as error:
            resolve_run(ref, runs_dir)
        assert "\n" not in str(error.value)


def test_list_runs_newest_first_with_key_metric(tmp_path, clock):
    first = finished_run(tmp_path, summary={"loss": 2.0, "score": 0.1})
    second = new_run(tmp_path)
    second.log_metrics({"step": 1, "val_loss": 3.0})
    second.log_metrics({"step": 2, "val_loss": 2.5})
    second.log_metrics({"step": 3, "loss": 2.2})
    second.fail("boom")
    evaluation = finished_run(tmp_path, stage="eval", name="squad", summary={"score": 0.69})
    running = new_run(tmp_path, name="other")

    infos = list_runs(tmp_path)
    assert [info.path for info in infos] == [running.path, evaluation.path, second.path, first.path]
    assert all(isinstance(info, RunInfo) for info in infos)
    latest_info = infos[0]
    assert (latest_info.stage, latest_info.name, latest_info.status) == ("pretrain", "other", "running")
    assert latest_info.seconds is None and latest_info.key_metric is None
    assert infos[1].key_metric == ("score", 0.69) and infos[1].stage == "eval" and infos[1].status == "succeeded"
    assert infos[2].key_metric == ("val_loss", 2.5) and infos[2].status == "failed"
    assert infos[3].key_metric == ("loss", 2.0) and infos[3].seconds > 0
    assert infos[3].started == datetime.fromisoformat(first.status()["started"])
    assert infos[0].started > infos[1].started > infos[2].started > infos[3].started

    assert [info.path for info in list_runs(tmp_path, "pretrain")] == [running.path, second.path, first.path]
    assert list_runs(tmp_path, "export") == [] and list_runs(tmp_path / "nothing-here") == []


def test_a_run_is_locked_by_its_writer_and_released_when_it_ends(tmp_path):
    run = new_run(tmp_path)
    assert (run.path / ".lock").read_text().strip() == str(os.getpid())
    run.succeed()
    assert not (run.path / ".lock").exists()
    assert ".lock" not in json.loads((run.path / "MANIFEST.json").read_text())


def test_a_second_process_cannot_resume_a_locked_run_but_a_dead_owner_is_taken_over(tmp_path):
    import subprocess
    import sys

    run = new_run(tmp_path)
    run.interrupt("stopped")
    (run.path / ".lock").write_text("1\n")  # init: alive, and not us
    with pytest.raises(RunError, match="is in use by process 1"):
        Run.open(run.path).resume()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run.path / ".lock").write_text(dead.stdout)
    reopened = Run.open(run.path)
    reopened.resume()
    assert (run.path / ".lock").read_text().strip() == str(os.getpid())
    assert f"taking over the lock of process {dead.stdout.strip()}" in (run.path / "log.txt").read_text()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_run_files_get_the_mode_the_umask_gives_a_new_file(tmp_path, umask, mode):
    """Files written to a temporary name and renamed must not keep mkstemp's 0600: a teammate
    on a shared filesystem reads the runs (umask 022), a private user keeps them private (077)."""
    runs_dir = tmp_path / "runs"
    previous = os.umask(umask)
    try:
        result = cli("pretrain", *TINY_PRETRAIN, "checkpoint_every=1", runs=runs_dir)
        assert result.exit_code == 0, result.output
        if umask == 0o022:  # the export's graphs too (once: exporting is the slow part)
            result = cli("export", "onnx", "pretrain/latest", runs=runs_dir)
            assert result.exit_code == 0, result.output
    finally:
        os.umask(previous)
    files = {path.relative_to(runs_dir).as_posix(): path.stat().st_mode & 0o777
             for path in runs_dir.rglob("*") if path.is_file() and not path.is_symlink()}
    pretrain_run = next(name.split("/")[1] for name in files if name.startswith("pretrain/"))
    for written in ("model/model.safetensors", "model/model.json", "model/tokenizer.json", "MANIFEST.json",
                    "status.json", "config.yaml", "checkpoints/step-00000001.ckpt", "checkpoints/MANIFEST.json"):
        assert f"pretrain/{pretrain_run}/{written}" in files, written
    assert umask != 0o022 or any(name.endswith(".onnx") and name.startswith("export/") for name in files)
    wrong = {name: oct(file_mode) for name, file_mode in files.items() if file_mode != mode}
    assert not wrong, f"not {oct(mode)}: {wrong}"
