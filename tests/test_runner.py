"""The stage runner: how a stage run alone or from a recipe opens, resumes and ends its run."""

import json

import pytest

from conftest import Crash, cli

from slmctl.config.compose import compose
from slmctl.runs.run import Run
from slmctl.train import pretrain


def test_resume_unfinished_continues_a_run_whose_group_options_are_not_the_defaults(tmp_path):
    """A pretrain run on data=files (not the default synthetic data) killed mid-way resumes with its
    saved config, checked against the schemas as it is, not merged onto the default data option."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Ana number {i} lives in Porto and reads the news."}) + "\n"
                              for i in range(64)))
    overrides = ["model=tiny", "data=files", f"data.train={corpus}", "tokenizer.vocab_size=300", "batch_size=4",
                 "max_source_len=24", "max_target_len=8", "trainer.max_steps=4", "trainer.val_check_interval=2",
                 "checkpoint_every=2", "trainer.enable_progress_bar=false"]
    cfg = compose("pretrain", overrides)
    killed = Run.create(tmp_path / "runs", "pretrain", "files", cfg, argv=["test"])
    try:
        pretrain.run(cfg, killed, callbacks=[Crash(3)])
    except SystemExit:
        pass
    result = cli("pretrain", "resume=unfinished", runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    status = Run.open(killed.path).status()
    assert status["status"] == "succeeded" and status["summary"]["steps"] == 4
    assert Run.open(killed.path).config()["data"]["train"] == str(corpus)


def test_a_sigterm_while_the_run_is_being_opened_leaves_it_interrupted_not_running(tmp_path, monkeypatch):
    """The SIGTERM handler is in place before the run directory exists: a stop that lands after
    the run is created but before the stage starts marks the run interrupted and exits 130."""
    from slmctl import runner
    from slmctl.runs.lookup import list_runs
    from slmctl.interrupts import Stopped

    def stopped_while_announcing(*args, **kwargs):  # the "pretrain -> RUN" line, printed before the stage runs
        raise Stopped("stopped by SIGTERM")

    monkeypatch.setattr(runner.console, "print", stopped_while_announcing)
    result = cli("pretrain", "model=tiny", runs=tmp_path / "runs")
    assert result.exit_code == 130 and "stopped by SIGTERM before pretrain started" in result.output
    (run,) = list_runs(tmp_path / "runs", "pretrain")
    assert run.status == "interrupted"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed first raise
def test_a_sigterm_swallowed_inside_a_weakref_callback_still_stops_the_stage():
    """A SIGTERM that lands while Python runs a weakref callback (as importlib's module locks use) has
    its exception swallowed ("Exception ignored"); it is raised again moments later, so the stage still
    stops instead of finishing as if never signalled. Once settled, nothing repeats."""
    import os
    import signal
    import time
    import weakref

    from slmctl.interrupts import Stopped, sigterm_as_interrupt

    class Thing:
        pass

    def callback(_ref):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs inside this callback: its Stopped is swallowed

    started = time.monotonic()
    with pytest.raises(Stopped), sigterm_as_interrupt():
        thing = Thing()
        ref = weakref.ref(thing, callback)  # noqa: F841 - kept alive so that its callback runs
        del thing
        while time.monotonic() - started < 5:
            time.sleep(0.01)
    assert time.monotonic() - started < 2  # raised again within a retry, not after the 5 s of work
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # settled on the way out


def test_a_sigterm_during_an_import_stops_the_stage_once_the_import_is_done(tmp_path, monkeypatch):
    """An exception raised inside an import unwinds through the import's C code, and a nanobind extension
    (onnx's) aborts the process on it; the stop waits for the import to finish, then comes."""
    import signal
    import sys
    import time

    from slmctl.interrupts import Stopped, sigterm_as_interrupt

    (tmp_path / "signalled_module.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.3)  # the import goes on past the signal and a retry\n"
        "FINISHED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    started = time.monotonic()
    with pytest.raises(Stopped), sigterm_as_interrupt():
        import signalled_module  # noqa: F401
        while time.monotonic() - started < 5:
            time.sleep(0.01)
    assert sys.modules["signalled_module"].FINISHED  # imported whole, not cut at the signal
    assert time.monotonic() - started < 2  # and stopped right after it
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    del sys.modules["signalled_module"]


def test_a_repeated_sigterm_never_cuts_short_the_cleanup_of_the_stop_it_repeats():
    """While the first Stopped is on its way up, the `finally` blocks it runs (a library restoring its
    state) finish, however long they take: the repeat is only for a stop that was lost."""
    import os
    import signal
    import time

    from slmctl.interrupts import Stopped, sigterm_as_interrupt

    cleaned = False
    with pytest.raises(Stopped), sigterm_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        finally:
            until = time.monotonic() + 1.0  # five retry periods of cleanup
            while time.monotonic() < until:
                pass
            cleaned = True
    assert cleaned
