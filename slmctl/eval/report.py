"""How evaluation results are shown: one Rich table per model, a side-by-side table (rows =
metrics, columns = models, each value with its 95% interval) and a grouped bar chart."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from slmctl.atomic import atomic_save_figure

UNIT_SCALE = ("exact_match", "f1", "exact_match_has_ans", "f1_has_ans", "exact_match_no_ans", "f1_no_ans",
              "rouge1", "rouge2", "rougeLsum", "judge")  # metrics on 0..1, drawn in the bar chart


def cell(result: dict) -> str:
    value, low, high = result["value"], result["low"], result["high"]
    if value is None:
        return "-"
    digits = 3 if abs(value) < 10 else 1
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def difference_cell(d: dict) -> str:
    """A paired difference with its interval: +0.110 [+0.055, +0.170]."""
    return f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def model_table(label: str, metrics: dict[str, dict], task: str) -> Table:
    table = Table(title=escape(f"{task}: {label}"))
    for column in ("metric", "value [95% CI]", "n"):
        table.add_column(escape(column))
    for name, result in metrics.items():
        table.add_row(name, escape(cell(result)), str(result["n"]))
    return table


def side_by_side(results: dict[str, dict[str, dict]], task: str) -> Table:
    """Rows = metrics, columns = models."""
    table = Table(title=escape(f"{task}: side by side (value [95% CI])"))
    table.add_column("metric")
    for label in results:
        table.add_column(escape(label))
    names = list(dict.fromkeys(name for metrics in results.values() for name in metrics))
    for name in names:
        table.add_row(name, *(escape(cell(metrics[name])) if name in metrics else "-" for metrics in results.values()))
    return table


def bar_chart(results: dict[str, dict[str, dict]], task: str, path: Path) -> Path | None:
    """Grouped bars of the 0..1 metrics with their intervals as error bars; None if there are none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n in UNIT_SCALE if any(n in m and m[n]["value"] is not None for m in results.values())]
    if not names:
        return None
    width = 0.8 / len(results)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(names) * max(1, len(results) / 2)), 4.0))
    x = np.arange(len(names))
    for k, (label, metrics) in enumerate(results.items()):
        values = [metrics[n]["value"] if n in metrics and metrics[n]["value"] is not None else 0.0 for n in names]
        low = [v - (metrics[n]["low"] if n in metrics and metrics[n]["value"] is not None else 0.0) for v, n in zip(values, names)]
        high = [(metrics[n]["high"] if n in metrics and metrics[n]["value"] is not None else 0.0) - v for v, n in zip(values, names)]
        axes.bar(x + k * width - 0.4 + width / 2, values, width, yerr=[low, high], capsize=3, label=label)
    axes.set_xticks(x, names)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("score (95% CI)")
    axes.set_title(task)
    axes.legend(fontsize="small")
    figure.tight_layout()
    atomic_save_figure(figure, path)
    return path


def paired_table(pairs: list[dict], task: str) -> Table:
    """Each paired comparison's differences with their paired 95% intervals; an interval that
    excludes 0 is marked."""
    result = Table(title=f"{task}: paired differences on the same examples (95% paired bootstrap)")
    metrics = list(dict.fromkeys(m for pair in pairs for m in pair["metrics"]))
    for column in ("model", "baseline", *metrics):
        result.add_column(column)
    for pair in pairs:
        cells = []
        for metric in metrics:
            d = pair["metrics"].get(metric)
            significant = d is not None and (d["low"] > 0 or d["high"] < 0)
            shown = "-" if d is None else difference_cell(d)
            cells.append(shown + (" *" if significant else ""))
        result.add_row(pair["model"], pair["baseline"], *cells)
    return result
