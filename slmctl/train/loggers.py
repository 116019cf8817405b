"""The loggers of a training fit: the run's own metrics.jsonl, plus the experiment trackers a
user names with `logger=` (csv, tensorboard, wandb, mlflow; several at once: logger=[tensorboard,mlflow]).

Every tracker writes inside the run directory (`loggers/<kind>/`), so a run stays one folder
that can be copied or deleted whole: TensorBoard event files, an MLflow file store
(`mlflow ui --backend-store-uri runs/<stage>/<run>/loggers/mlruns`), W&B in offline mode
(`wandb sync` uploads it later), and Lightning's CSV files. Nothing reaches the network.
"""

from __future__ import annotations

import os

from slmctl.train.run_logger import RunLogger

LOGGERS_DIR = "loggers"
EXPERIMENT = "slmctl"


PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}


def training_loggers(run, kinds, prefix: str = "") -> list:
    """[RunLogger, one Lightning logger per kind]; `prefix` (e.g. "control_") tells the fits of
    one run apart, in every logger. A tracker whose package is missing is a one-line error."""
    loggers = [RunLogger(run, prefix=prefix)]
    for kind in [str(k) for k in kinds or []]:
        try:
            loggers.append(_tracker(kind, run, prefix))
        except ModuleNotFoundError as e:
            from slmctl.errors import ConfigError

            raise ConfigError(f"logger={kind} needs the {PACKAGES.get(kind, kind)} package ({e}): "
                              f"pip install 'slmctl[trackers]'") from None
    return loggers


def _tracker(kind: str, run, prefix: str):
    """One Lightning logger writing under the run's loggers/<kind>/."""
    root = run.path / LOGGERS_DIR
    name = run.path.name + (f"-{prefix.rstrip('_')}" if prefix else "")
    tag = prefix.rstrip("_") or "main"
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(root, name="csv", version=tag)
    if kind == "tensorboard":
        import tensorboard  # noqa: F401  (Lightning would fall back to tensorboardX silently)
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(root, name="tensorboard", version=tag, default_hp_metric=False)
    if kind == "mlflow":
        import mlflow  # noqa: F401
        from lightning.pytorch.loggers import MLFlowLogger

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in to a file store
        return MLFlowLogger(experiment_name=EXPERIMENT, run_name=name, tracking_uri=(root / "mlruns").resolve().as_uri())
    import wandb  # noqa: F401
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    (root / "wandb").mkdir(parents=True, exist_ok=True)
    return WandbLogger(name=name, project=EXPERIMENT, save_dir=str(root / "wandb"), offline=True, id=name)
