"""The one stage runner: everything around a stage's `run(cfg, run)`.

    run_stage("pretrain", ["model=tiny"], runs_dir=Path("runs"))

It composes the config, opens the run directory (a new one, the one `resume=` names, or
rank 0's on another training process), handles SIGTERM like Ctrl-C, calls the stage, and
maps how it ended to the run's status and an exit code:

    succeeded                              -> returns the Run
    UserError (bad input)                  -> run failed,      StageEnded(exit 2)
    RunFailure (validation, save, diverge) -> run failed,      StageEnded(exit 1)
    no space left on device                -> run failed,      StageEnded(exit 1)
    Ctrl-C, SIGTERM                        -> run interrupted, StageEnded(exit 130)
    anything else (a bug)                  -> run failed, the exception propagates

The CLI and recipes both call it, so a stage behaves the same however it was started.
`resume=unfinished` names the newest interrupted (or killed) run of the stage; `latest`
as a model reference names the newest succeeded one (slmctl.runs.lookup.latest_run).
"""

from __future__ import annotations

import errno
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slmctl.errors import RunFailure, TrainingDiverged, UserError, first_line
from slmctl.interrupts import settle, sigterm_as_interrupt

TRAINING_STAGES = ("pretrain", "distill", "add-vision")  # take --device as a Lightning accelerator
RESUME_UNFINISHED = "unfinished"  # resume=unfinished: the newest run of the stage that did not end

console = Console()
err_console = Console(stderr=True)


class StageEnded(Exception):
    """A stage ended without success: `message` is one line for the user, `exit_code` 1, 2 or 130.
    The run, if one was opened, is already marked failed or interrupted."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def user_errors() -> tuple[type[BaseException], ...]:
    """What counts as bad input: our own UserErrors, and a file the user named that is not there."""
    return (UserError, FileNotFoundError)


def run_stage(stage: str, overrides: list[str], *, runs_dir: Path, name: str | None = None, device: str = "cpu",
              verbose: bool = False, dry_run: bool = False, extra: dict | None = None, argv: list[str] | None = None,
              inputs: list[tuple[str, Path]] | None = None):
    """Compose, open (or reopen, for resume=) the run directory and call the stage's run().

    `extra` holds values from options and arguments (e.g. eval's models), merged after composing;
    `inputs` are (reference, run directory) pairs recorded in the run's lineage (a recipe's
    earlier steps). Returns the Run (None for a dry run); raises StageEnded when it did not succeed."""
    argv = argv or ["slmctl", stage, *overrides, *(["--name", name] if name else []), "--runs-dir", str(runs_dir),
                    *(["--device", device] if device != "cpu" else [])]
    run = None
    with sigterm_as_interrupt():  # from before the run exists: a SIGTERM never leaves one "running"
        try:
            cfg, run = _open(stage, overrides, runs_dir, name, device, extra, argv, dry_run)
            if run is None:
                return None
            for ref, path in inputs or []:
                run.add_input("run", ref, path, stage=None)
            out = err_console if cfg.get("format") else console  # stdout carries only the records then
            if run.is_writer:
                out.print(f"[bold]{stage}[/bold] -> {run.path}", highlight=False, soft_wrap=True)
        except user_errors() as e:
            if run is not None:
                run.fail(first_line(e))
            if verbose:
                raise
            raise StageEnded(first_line(e), 2) from None
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM while the run was being opened
            settle()
            why = str(e) or "interrupted"
            if run is not None:
                run.interrupt(f"{why} (resume with resume={run.path})")
            raise StageEnded(f"{why} before {stage} started", 130) from None
        _execute(stage, cfg, run, verbose)
    if run.is_writer:
        print_summary(stage, run.path, run.status().get("summary") or {}, out)
    return run


def _open(stage, overrides, runs_dir, name, device, extra, argv, dry_run):
    """(config, Run) for this invocation; (config, None) for a dry run, after printing the config."""
    from omegaconf import OmegaConf

    from slmctl.config.compose import compose, saved_config, to_yaml
    from slmctl.config.registry import STAGE_SCHEMAS, stage_module
    from slmctl.errors import ConfigError
    from slmctl.runs.run import Run
    from slmctl.train.ranks import follow_rank0

    check_device(stage, device, (extra or {}).get("runtime", "torch"))
    if "device" in STAGE_SCHEMAS[stage].__dataclass_fields__:
        overrides = [*overrides, f"device={device}"]
    elif stage in TRAINING_STAGES and device != "cpu" and not any(o.startswith(("trainer=", "trainer.accelerator="))
                                                                   for o in overrides):
        overrides = [*overrides, f"trainer.accelerator={'gpu' if device == 'cuda' else device}"]
    cfg = compose(stage, overrides)
    if extra:
        cfg = OmegaConf.merge(cfg, extra)
    if dry_run:
        console.print(to_yaml(cfg), highlight=False, end="")
        return cfg, None
    follower = stage in TRAINING_STAGES and follow_rank0(stage, cfg)
    if follower:
        run, cfg = follower
        return cfg, run
    if cfg.get("resume"):
        from_device_option = ("trainer.accelerator=", "device=")  # added above from --device
        others = [o for o in overrides if not o.startswith(("resume=", *from_device_option))]
        if others:
            raise ConfigError(f"resume= continues a run with its saved config; drop the other overrides ({' '.join(others)})")
        path = resumable_run(str(cfg.resume), runs_dir, stage)
        run = Run.open(path)
        cfg = saved_config(stage, run.config(), resume=str(path))
        run.resume()
        return cfg, run
    preflight = getattr(stage_module(stage), "preflight", None)
    if preflight is not None:  # what the stage can refuse before a run directory exists
        preflight(cfg, runs_dir)
    return cfg, Run.create(runs_dir, stage, name or stage, cfg, argv=argv, device=device)


def _execute(stage: str, cfg, run, verbose: bool) -> None:
    """Call the stage inside the rank handling; map how it ended (see the module docstring)."""
    from slmctl.config.registry import stage_module
    from slmctl.train.ranks import shared_with_other_ranks

    module = stage_module(stage)
    try:
        with shared_with_other_ranks(run, training=stage in TRAINING_STAGES):
            module.run(cfg, run)
    except TrainingDiverged as e:
        kept = sorted(run.checkpoint_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        message = f"{e}; last good checkpoint: {kept[-1]}" if kept else f"{e}; no checkpoint was written before it"
        run.fail(message)
        raise StageEnded(message, 1) from None
    except RunFailure as e:  # a measured failure or a fault, not a usage error
        run.fail(str(e))
        raise StageEnded(first_line(e), 1) from None
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, SIGTERM (Lightning turns a Ctrl-C it caught into SystemExit)
        settle()
        why = str(e) if isinstance(e, KeyboardInterrupt) and str(e) else "interrupted"
        run.interrupt(f"{why} (resume with resume={run.path})")
        raise StageEnded(f"{why}; resume with: slmctl {stage} resume={run.path}", 130) from None
    except user_errors() as e:
        run.fail(first_line(e))
        if verbose:
            raise
        raise StageEnded(first_line(e), 2) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            run.fail(f"{type(e).__name__}: {first_line(e, '')}")
            raise
        message = f"no space left on device writing {e.filename or 'an artifact'}; free space and run again"
        run.fail(message)
        raise StageEnded(message, 1) from None
    except Exception as e:  # a bug or an environment problem: record it, show it
        run.fail(f"{type(e).__name__}: {first_line(e, '')}")
        raise


def run_generate(model: str, texts: list[str], image_paths: list[Path], prompt_file: Path | None, *, runs_dir: Path,
                 device: str, runtime: str, threads: int | None, ep: str | None, allow_fallback: bool, verbose: bool,
                 out: Console = console, draft: str = "none", draft_tokens: int = 10, draft_ngram: int,
                 dtype: str = "float32",
                 **decoding) -> None:
    """`slmctl generate`: print (streaming) what `model` generates for each prompt (and the
    prompts of `prompt_file`), with the images of `image_paths`. Bad input ends it with
    StageEnded(exit 2) before or during generation; no run directory is written."""
    from slmctl.runtime.devices import check_device as check_runtime_device
    from slmctl.runtime.generator import check_drafting, generate_text, load_generator, open_drafter, read_image, read_prompt_file

    def ended(e: BaseException):
        if verbose:
            raise e
        return StageEnded(first_line(e), 2)

    try:
        images = [read_image(path) for path in image_paths]
        texts = [*texts, *(read_prompt_file(prompt_file) if prompt_file is not None else [])]
        if not texts:
            raise UserError('give prompt="..." or --file prompts.jsonl')
        for number, text in enumerate(texts, 1):
            if not text:
                raise UserError(f'prompt {number} is empty: an encoder-decoder answers a source text (prompt="...")')
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(f"prompt {number} is not valid Unicode text (it holds a lone surrogate)") from None
        if runtime == "torch":
            check_torch_device(device)
        else:
            check_runtime_device(device, runtime)
        generator = load_generator(model, runs_dir, device, runtime, threads, ep, allow_fallback, dtype)
        drafter = open_drafter(draft, draft_tokens, generator, runs_dir, device, ngram=draft_ngram)
        if drafter is not None:
            check_drafting(generator, decoding.get("num_beams", 1))
    except user_errors() as e:
        raise ended(e) from None
    for text in texts:
        out.print(f"[bold]> {text}[/bold]", highlight=False)
        try:
            generate_text(generator, text, on_piece=lambda piece: out.print(piece, end="", highlight=False, soft_wrap=True),
                          images=images, drafter=drafter, **decoding)
        except (user_errors() + (ValueError,)) as e:
            raise ended(e) from None
        out.print()
        if drafter is not None:  # stderr: stdout stays what plain decoding prints
            stats = drafter.stats
            err_console.print(f"draft {drafter.name}: {stats.passes} passes, {stats.drafted} tokens drafted, {stats.accepted} "
                              f"accepted ({stats.accepted_per_pass:.2f} per pass)", highlight=False)


def check_device(stage: str, device: str, runtime: str = "torch") -> None:
    """Fail before any run directory exists when the requested device is not there."""
    from slmctl.runtime.devices import check_device as check_runtime_device

    if stage in ("bench", "serve"):  # NPUs are reached through ONNX Runtime providers: its own check
        check_runtime_device(device, runtime)
    else:
        check_torch_device(device)


def check_torch_device(device: str) -> None:
    from slmctl.errors import ConfigError
    from slmctl.runtime.devices import check_torch_device as check

    if device == "npu":
        raise ConfigError("--device npu: NPUs run exported ONNX graphs (slmctl export, then bench --runtime onnx), "
                          "not PyTorch; use --device cpu or cuda here")
    check(device)


def resumable_run(ref: str, runs_dir: Path, stage: str) -> Path:
    """The run `resume=` names: `unfinished` (the newest interrupted or killed run of the stage)
    or any run reference. `latest` is refused: it names the newest *succeeded* run, which is sealed."""
    from slmctl.errors import ConfigError
    from slmctl.runs.lookup import LATEST, RunError, list_runs, resolve_run

    if ref == RESUME_UNFINISHED:
        candidates = [r for r in list_runs(runs_dir, stage) if r.status in ("interrupted", "running")]
        if not candidates:
            raise RunError(f"no unfinished {stage} run under {runs_dir} to resume")
        return candidates[0].path
    if ref == LATEST:
        raise ConfigError(f"resume=latest is now resume={RESUME_UNFINISHED} (the newest interrupted {stage} run); "
                          f"'latest' names the newest succeeded run, which cannot be resumed")
    return resolve_run(ref, runs_dir)


def print_summary(stage: str, path: Path, summary: dict, out: Console = console) -> None:
    table = Table(title=f"{stage} finished", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)
    out.print(f"run: {path}", highlight=False, soft_wrap=True)
