"""How bench results are shown: the Rich table of medians, the ratios against the last model
(the paper's encoder-decoder vs decoder-only comparison), the Figure 1a plot, and the records
as json, csv or Markdown for `--format`; for `bench --train`, its own table (step time,
tokens/s, MFU, peak memory) and ratios against T5."""

from __future__ import annotations

import csv
import io
import json

from rich.table import Table

from slmctl.atomic import atomic_save_figure

RECORD_FIELDS = ("model", "arch", "device", "runtime", "ep", "dtype", "prepacked", "batch", "input_len", "output_len", "first_token_ms",
                 "decode_tok_s", "e2e_ms", "peak_mem_mb", "params", "load_s", "prefill_flops", "decode_flops_per_token",
                 "decode_bytes_per_token", "bandwidth_bound_tok_s", "bound_fraction", "draft", "draft_tokens",
                 "accepted_per_pass", "pass_cost_ratio", "predicted_pass_cost_ratio", "implied_speedup", "measured_speedup")


# `bench --train` records (slmctl.bench.training)
TRAIN_RECORD_FIELDS = ("model", "arch", "device", "runtime", "dtype", "batch", "source_len", "target_len", "step_ms",
                       "tokens_per_s", "target_tokens_per_s", "mfu", "peak_mem_mb", "params", "flops_per_step", "peak_flops",
                       "activation_checkpointing")


def is_training(records: list[dict]) -> bool:
    return bool(records) and "step_ms" in records[0]


def table(records: list[dict]) -> Table:
    estimated = any("estimate" in r for r in records)
    measured = any(r["first_token_ms"] is not None for r in records)
    result = Table(title="bench (medians)" if measured else f"roofline estimate: {records[0]['device']}")
    drafted = any(r.get("draft") not in (None, "none") for r in records)
    columns = ["model", "batch", "in", "out"] + (["draft"] if drafted else [])
    columns += ["first token ms", "decode tok/s", "e2e ms", "peak MB", "bound frac"] if measured else []
    columns += ["accepted/pass", "pass cost"] if drafted else []
    for column in columns + (["predicted ft ms", "predicted tok/s"] if estimated else []):
        result.add_column(column)

    def show(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in records:
        row = [r["model"], str(r["batch"]), str(r["input_len"]), str(r["output_len"])] + ([r.get("draft") or "none"] if drafted else [])
        if measured:
            row += [show(r["first_token_ms"], ".1f"), show(r["decode_tok_s"], ".1f"), show(r["e2e_ms"], ".0f"),
                    show(r["peak_mem_mb"], ".0f"), show(r["bound_fraction"], ".2f")]
        if drafted:
            row += [show(r.get("accepted_per_pass"), ".2f"), show(r.get("pass_cost_ratio"), ".2f")]
        if estimated:
            row += [show(r.get("predicted_first_token_ms"), ".1f"), show(r.get("predicted_decode_tok_s"), ".1f")]
        result.add_row(*row)
    return result


def comparisons(records: list[dict], models: list[str]) -> list[dict]:
    """For each model but the last, at each (batch, input, output): ratios against the last model."""
    baseline = models[-1]
    by_key = {(r["model"], r["batch"], r["input_len"], r["output_len"], r.get("draft") or "none"): r for r in records}
    rows = []
    for model in models[:-1]:
        for (name, batch, input_len, output_len, draft), r in by_key.items():
            if name != model or (baseline, batch, input_len, output_len, draft) not in by_key:
                continue
            b = by_key[(baseline, batch, input_len, output_len, draft)]
            measured = r["first_token_ms"] is not None  # else compare the roofline predictions
            first, rate = ("first_token_ms", "decode_tok_s") if measured else ("predicted_first_token_ms", "predicted_decode_tok_s")
            rows.append({"model": model, "baseline": baseline, "batch": batch, "input_len": input_len, "output_len": output_len,
                         "first_token_reduction": 1 - r[first] / b[first],
                         "throughput_ratio": r[rate] / b[rate] if r[rate] and b[rate] else None,
                         "memory_ratio": r["peak_mem_mb"] / b["peak_mem_mb"] if measured else None})
    return rows


def comparison_table(records: list[dict], models: list[str]) -> Table:
    result = Table(title=f"against {models[-1]}")
    for column in ("model", "batch", "in", "out", "first-token latency reduction", "throughput ratio", "memory ratio"):
        result.add_column(column)
    for c in comparisons(records, models):
        result.add_row(c["model"], str(c["batch"]), str(c["input_len"]), str(c["output_len"]),
                       f"{c['first_token_reduction']:.1%}",
                       *(f"{c[k]:.2f}x" if c[k] is not None else "-" for k in ("throughput_ratio", "memory_ratio")))
    return result


def train_table(records: list[dict]) -> Table:
    result = Table(title="bench --train (median step)")
    for column in ("model", "batch", "source", "target", "step ms", "tokens/s", "target tokens/s", "MFU", "peak MB"):
        result.add_column(column)
    for r in records:
        result.add_row(r["model"], str(r["batch"]), str(r["source_len"]), str(r["target_len"] or "-"), f"{r['step_ms']:.0f}",
                       f"{r['tokens_per_s']:.0f}", f"{r['target_tokens_per_s']:.0f}",
                       "-" if r["mfu"] is None else f"{r['mfu']:.1%}", f"{r['peak_mem_mb']:.0f}")
    return result


def train_comparisons(records: list[dict], models: list[str]) -> list[dict]:
    """For each model but the last, at each (batch, source, target): its tokens/s and peak memory
    over the last model's (the T5 of `--compare`)."""
    baseline = models[-1]
    by_key = {(r["model"], r["batch"], r["source_len"], r["target_len"]): r for r in records}
    rows = []
    for (name, batch, source_len, target_len), r in by_key.items():
        b = by_key.get((baseline, batch, source_len, target_len))
        if name == baseline or b is None:
            continue
        rows.append({"model": name, "baseline": baseline, "batch": batch, "source_len": source_len,
                     "target_len": target_len, "speedup": r["tokens_per_s"] / b["tokens_per_s"],
                     "memory_ratio": r["peak_mem_mb"] / b["peak_mem_mb"]})
    return rows


def train_comparison_table(records: list[dict], models: list[str]) -> Table:
    result = Table(title=f"against {models[-1]}")
    for column in ("model", "batch", "source", "target", "tokens/s ratio", "peak memory ratio"):
        result.add_column(column)
    for c in train_comparisons(records, models):
        result.add_row(c["model"], str(c["batch"]), str(c["source_len"]), str(c["target_len"] or "-"),
                       f"{c['speedup']:.2f}x", f"{c['memory_ratio']:.2f}x")
    return result


def plot(records: list[dict], models: list[str], path) -> None:
    """First-token latency and decode throughput against input length, one line per model
    (batch 1 and the first output length when several were measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch, output_len = records[0]["batch"], records[0]["output_len"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    first, rate = ("first_token_ms", "decode_tok_s") if records[0]["first_token_ms"] is not None else \
        ("predicted_first_token_ms", "predicted_decode_tok_s")
    for model in models:
        rows = sorted((r for r in records if r["model"] == model and r["batch"] == batch and r["output_len"] == output_len),
                      key=lambda r: r["input_len"])
        lengths = [r["input_len"] for r in rows]
        left.plot(lengths, [r[first] for r in rows], marker="o", label=model)
        right.plot(lengths, [r[rate] for r in rows], marker="o", label=model)
    left.set(xlabel="input tokens", ylabel="first-token latency (ms)", title="first-token latency")
    right.set(xlabel="input tokens", ylabel="decode tokens/s", title=f"throughput ({output_len} new tokens)")
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.legend()
    figure.suptitle(f"{records[0]['device']}, {records[0]['dtype']}, batch {batch}")
    figure.tight_layout()
    atomic_save_figure(figure, path)


def plot_batch(records: list[dict], models: list[str], path) -> None:
    """Decode tokens/s of all sequences against batch size, one line per model, beside the
    memory-bandwidth bound (dashed) and, with --estimate, the roofline prediction (dotted): where
    the measured line leaves the bound, decoding stops being bandwidth-bound. First input and
    output length when several were measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    input_len, output_len = records[0]["input_len"], records[0]["output_len"]
    figure, axes = plt.subplots(figsize=(6, 4))
    for model in models:
        rows = sorted((r for r in records if r["model"] == model and r["input_len"] == input_len
                       and r["output_len"] == output_len and r["decode_tok_s"] is not None), key=lambda r: r["batch"])
        if not rows:
            continue
        batches = [r["batch"] for r in rows]
        line = axes.plot(batches, [r["decode_tok_s"] for r in rows], marker="o", label=model)[0]
        for key, style, what in (("bandwidth_bound_tok_s", "--", "bandwidth bound"),
                                 ("predicted_decode_tok_s", ":", "roofline")):
            if all(r.get(key) for r in rows):
                axes.plot(batches, [r[key] for r in rows], style, color=line.get_color(), label=f"{model} {what}")
    axes.set(xlabel="batch (sequences decoded together)", ylabel="decode tokens/s (all sequences)",
             title=f"decode throughput, {input_len} -> {output_len} tokens")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.legend(fontsize="small")
    figure.tight_layout()
    atomic_save_figure(figure, path)


def format_records(records: list[dict], fmt: str) -> str:
    """The records as json (with samples), csv or a Markdown table (without samples)."""
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    fields = TRAIN_RECORD_FIELDS if is_training(records) else RECORD_FIELDS
    flat = [{k: r.get(k) for k in fields} for r in records]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
        return out.getvalue()
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for r in flat:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines) + "\n"
