"""The model an export starts from: the one the command names (a model directory, a run, a
preset), or the newest succeeded distill or pretrain run; every export format loads it here."""

from __future__ import annotations

from pathlib import Path

from slmctl.errors import ConfigError


def check_source(cfg, runs_dir: Path) -> None:
    """The model the export names exists and is of a kind it exports (before a run directory is opened)."""
    from slmctl.refs import parse

    parse(cfg.source or _newest_model_run(Path(runs_dir), cfg.to), runs_dir).require(("preset", "model_dir"), "export")


def load_source(cfg, run):
    """(model in eval mode, fp32, cpu; the model directory or None for a preset)."""
    from slmctl.refs import resolve

    source = resolve(cfg.source or _newest_model_run(run.runs_dir, cfg.to), run.runs_dir, allow=("preset", "model_dir"),
                     purpose="export")
    source.record_input(run, role="model")
    if source.kind == "preset":
        run.log(f"model: preset {source.text} with random weights (seed {cfg.seed})")
        return source.load_torch(seed=cfg.seed).eval(), None
    return source.load_torch().float().eval(), source.path


def _newest_model_run(runs_dir: Path, to: str) -> str:
    from slmctl.runs.lookup import latest_run

    found = [p for p in (latest_run(runs_dir, stage) for stage in ("distill", "pretrain")) if p is not None]
    if not found:
        raise ConfigError(f"no model given and no succeeded distill or pretrain run under {runs_dir}: "
                          f"slmctl export {to} MODEL (a model dir, a run, or a preset like 330m)")
    return str(max(found, key=lambda p: p.name))
