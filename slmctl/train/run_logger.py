"""A Lightning logger that writes metrics into the run directory's metrics.jsonl."""

from __future__ import annotations

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


class RunLogger(Logger):
    def __init__(self, run, prefix: str = ""):
        super().__init__()
        self.run, self.prefix = run, prefix  # prefix: e.g. "control_" for a second model trained in the same run

    @property
    def name(self) -> str:
        return "slmctl"

    @property
    def version(self) -> str:
        return self.run.path.name

    @property
    @rank_zero_experiment
    def experiment(self):
        return self.run

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        record = {"step": step} if step is not None else {}
        record.update({self.prefix + k: float(v) for k, v in metrics.items() if k != "epoch"})
        self.run.log_metrics(record)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the resolved config is already the run's config.yaml
