"""A recipe's closing summary: the story its runs measured, in a few short tables, with every
number read from those runs (eval's metrics.json, bench's bench.json, export's quantization.json),
never typed by hand. A recipe step names the runs per section:

    - name: summary
      summary:
        architecture: {eval: ${runs.eval}, bench: ${runs.bench}, models: [encdec, deconly]}
        distillation: {eval: ${runs.eval}, models: [deconly, distill, distill/control]}
        export: {export: ${runs.export}}
        vision: {eval: ${runs.eval-vision}}
        drafting: {plain: ${runs.eval}, drafted: ${runs.eval-draft}, model: encdec}

Each section is optional; `drafting` may also be a list of such pairs (one table each: PyTorch,
ONNX Runtime). The step writes a run of its own (stage `summary`): summary.md (the
tables as Markdown, what the README quotes), summary.json (the same rows as data) and, with an
architecture section, architecture.png (exact match beside each inference cost)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from slmctl.errors import ConfigError
from slmctl.eval.report import cell as interval  # 0.755 [0.695, 0.815], as eval's tables show it
from slmctl.eval.report import difference_cell

SECTIONS = ("architecture", "distillation", "export", "vision", "drafting")


@dataclass
class Section:
    """One table of the summary: `rows` of cells under `columns`, and sentences below it."""
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines + [""] + [f"- {note}" for note in self.notes])

    def rich(self) -> Table:
        table = Table(title=escape(self.title), caption=escape("\n".join(self.notes)) or None, caption_justify="left")
        for column in self.columns:
            table.add_column(escape(column))
        for row in self.rows:
            table.add_row(*(escape(cell) for cell in row))
        return table


# -- reading runs --------------------------------------------------------------------------


def read_json(run: str | Path, name: str) -> dict:
    """`name` of a succeeded run whose files still match its MANIFEST."""
    from slmctl.runs.lookup import read_status, verify_manifest

    status = read_status(run) or {}
    if status.get("status") != "succeeded":
        raise ConfigError(f"summary: {run} is not a succeeded run (status: {status.get('status', 'none')})")
    path = Path(run) / name
    if not path.is_file():
        raise ConfigError(f"summary: {path} does not exist (is {run} a run of the right stage?)")
    problems = verify_manifest(run)
    if problems:
        raise ConfigError(f"summary: {run} changed since it finished: {problems[0]}")
    return json.loads(path.read_text())


def one_task(metrics: dict, run, task: str | None) -> tuple[str, dict]:
    """(name, results) of the eval run's task: the one named, or its only one."""
    tasks = metrics["tasks"]
    if task is None and len(tasks) != 1:
        raise ConfigError(f"summary: {run} evaluated tasks {', '.join(tasks)}; name one with task=")
    name = task or next(iter(tasks))
    if name not in tasks:
        raise ConfigError(f"summary: {run} has no task {name!r} (it has {', '.join(tasks)})")
    return name, tasks[name]


def model_results(task: dict, run, label: str) -> dict:
    if label not in task["models"]:
        raise ConfigError(f"summary: {run} evaluated no model {label!r} (it has {', '.join(task['models'])})")
    return task["models"][label]


def difference(pair: dict, metric: str = "exact_match") -> str:
    """+0.110 [+0.055, +0.170]"""
    return difference_cell(pair["metrics"][metric])


def paired_rows(task: dict, labels: list[str]) -> list[dict]:
    """The eval run's paired comparisons between two of `labels`, in its order."""
    return [p for p in task.get("paired", []) if p["model"] in labels and p["baseline"] in labels
            and "exact_match" in p["metrics"]]


def bench_records(bench: dict, run, label: str, input_len: int | None) -> dict:
    """The batch-1 record of `label` at `input_len` (the bench's longest prompt when None)."""
    records = [r for r in bench["records"] if r["model"] == label and r.get("batch", 1) == 1]
    if not records:
        raise ConfigError(f"summary: {run} measured no model {label!r} at batch 1 "
                          f"(it has {', '.join(sorted({r['model'] for r in bench['records']}))})")
    wanted = input_len or max(r["input_len"] for r in records)
    chosen = [r for r in records if r["input_len"] == wanted]
    if not chosen:
        raise ConfigError(f"summary: {run} measured {label!r} at no {wanted}-token prompt")
    return chosen[0]


def measured_on(bench: dict, records: list[dict]) -> str:
    """Which CPU (or device) and runtime timed the records: speeds of different CPUs are not comparable."""
    environment = bench.get("environment") or {}
    where = records[0].get("cpu") or environment.get("cpu") or records[0].get("device", "cpu")
    names = {"onnx": "ONNX Runtime", "torch": "PyTorch"}
    runtimes = [names.get(r.get("runtime"), r.get("runtime")) for r in records]
    if len(set(runtimes)) > 1:
        return f"{where}, " + ", ".join(f"{r['model']} on {runtime}" for r, runtime in zip(records, runtimes))
    return f"{where}, {runtimes[0]}" if runtimes[0] else where


# -- sections ------------------------------------------------------------------------------


def architecture(spec: dict) -> tuple[Section, dict]:
    """Quality beside inference cost: each model's exact match and its first-token latency, decode
    speed (bench, batch 1) and the CPU seconds its eval answers took; plus the paired difference."""
    metrics = read_json(spec["eval"], "metrics.json")
    bench = read_json(spec["bench"], "bench.json")
    task_name, task = one_task(metrics, spec["eval"], spec.get("task"))
    labels = list(spec["models"])
    points = {}
    sample = bench_records(bench, spec["bench"], labels[0], spec.get("input_len"))
    timed = [bench_records(bench, spec["bench"], label, sample["input_len"]) for label in labels]
    section = Section(f"Architecture: {task_name}, {task['n']} held-out questions; speed at "
                      f"{sample['input_len']} -> {sample['output_len']} tokens, batch 1, {measured_on(bench, timed)}",
                      ["model", "parameters", "exact match [95% CI]", "first token ms", "decode tok/s",
                       f"CPU s for {task['n']} answers"])
    for label, record in zip(labels, timed):
        result = model_results(task, spec["eval"], label)["exact_match"]
        cost = task.get("cost", {}).get(label)
        points[label] = {"exact_match": result, "first_token_ms": record["first_token_ms"],
                         "decode_tok_s": record["decode_tok_s"], "params": record.get("params"),
                         "cpu_s": cost["cpu_s"] if cost else None}
        section.rows.append([label, f"{record['params'] / 1e6:.2f}M" if record.get("params") else "-", interval(result),
                             f"{record['first_token_ms']:.1f}", f"{record['decode_tok_s']:.0f}",
                             f"{cost['cpu_s']:.1f}" if cost else "-"])
    for pair in paired_rows(task, labels):
        section.notes.append(f"exact match {pair['model']} - {pair['baseline']} on the same questions: "
                             f"{difference(pair)} (paired bootstrap)")
    return section, points


def distillation(spec: dict) -> Section:
    """Teacher, students and controls on the same questions, and each paired difference."""
    metrics = read_json(spec["eval"], "metrics.json")
    task_name, task = one_task(metrics, spec["eval"], spec.get("task"))
    labels = list(spec["models"])
    section = Section(f"Distillation: {task_name}, {task['n']} held-out questions",
                      ["model", "exact match [95% CI]", "F1 [95% CI]"])
    for label in labels:
        results = model_results(task, spec["eval"], label)
        section.rows.append([label, interval(results["exact_match"]),
                             interval(results["f1"]) if "f1" in results else "-"])
    pairs = paired_rows(task, labels)
    for pair in pairs:
        section.notes.append(f"exact match {pair['model']} - {pair['baseline']} on the same questions: {difference(pair)}")
    if len(pairs) > 1:  # several seeds: how consistent the gain is
        gains = [p["metrics"]["exact_match"] for p in pairs]
        above = sum(g["low"] > 0 for g in gains)
        section.notes.append(f"mean difference over the {len(pairs)} pairs: "
                             f"{sum(g['difference'] for g in gains) / len(gains):+.3f} (range {min(g['difference'] for g in gains):+.3f} "
                             f"to {max(g['difference'] for g in gains):+.3f}); {above} of {len(pairs)} intervals above 0")
    return section


def export(spec: dict) -> Section:
    """Each exported variant's size, speed and quality, as the export stage measured them."""
    report = read_json(spec["export"], "quantization.json")
    setting = report["speed_setting"]
    section = Section(f"Export (ONNX Runtime, {setting['input_len']} -> {setting['output_len']} tokens, batch 1; "
                      f"exact match on {setting['eval_limit']} questions)",
                      ["variant", "MB", "first token ms", "decode tok/s", "greedy tokens = fp32", "exact match [95% CI]"])
    for name, variant in report["variants"].items():
        agreement = variant.get("token_agreement")
        section.rows.append([name, f"{variant['mb']:.1f}", f"{variant['first_token_ms']:.1f}",
                             f"{variant['decode_tok_s']:.0f}", "-" if agreement is None else f"{agreement:.3f}",
                             interval(variant["task"]) if variant.get("task") else "-"])
    return section


def vision(spec: dict) -> Section:
    """Exact match per question kind (with its bootstrap interval) beside the chance of always giving
    the kind's most frequent answer."""
    metrics = read_json(spec["eval"], "metrics.json")
    task_name, task = one_task(metrics, spec["eval"], spec.get("task"))
    if "per_kind" not in task:
        raise ConfigError(f"summary: {spec['eval']} has no exact match per question kind (a shapes task has)")
    label = spec.get("model") or next(iter(task["per_kind"]))
    per_kind, chance = task["per_kind"][label], task["chance"]
    overall = model_results(task, spec["eval"], label)["exact_match"]
    section = Section(f"Vision: {task_name}, {task['n']} held-out scenes ({label})",
                      ["question kind", "exact match", "chance", "above chance"])
    intervals = task.get("per_kind_interval", {}).get(label, {})  # evals before 2026-12-02 have none
    for kind, value in per_kind.items():
        shown = f"{value:.3f} [{intervals[kind][0]:.3f}, {intervals[kind][1]:.3f}]" if kind in intervals else f"{value:.3f}"
        section.rows.append([kind, shown, f"{chance[kind]:.3f}", f"{value - chance[kind]:+.3f}"])
    section.rows.append(["all [95% CI]", interval(overall), f"{chance['overall']:.3f}",
                         f"{overall['value'] - chance['overall']:+.3f}"])
    if spec.get("model_run"):
        section.notes.append(tower_note(spec["model_run"]))
    return section


def tower_note(model_run: str) -> str:
    """One line on how the add-vision run `model_run` trained its tower (its stages.json)."""
    stages = {s["stage"]: s for s in read_json(model_run, "stages.json")}
    later = ", ".join(f"stage {n} {stages[n]['steps']} steps" for n in (1, 2) if n in stages)
    first = stages.get(0)
    if first is None:
        return f"the tower learned only through the language model ({later}): no stage-0 pretraining"
    if first.get("reloaded") or "seconds" not in first:
        return f"tower pretrained first: {first['objective']}, {first['steps']} steps; then {later}"
    scenes = "one-shape" if first["max_shapes"] == 1 else f"up-to-{first['max_shapes']}-shape"
    return (f"tower pretrained first on {first['scenes']} {scenes} scenes: {first['objective']}, {first['steps']} steps "
            f"in {first['seconds']:.0f} s; then {later}")


def drafting(spec: dict) -> Section:
    """One model's answers decoded plainly and with drafts (two eval runs, `generation.draft=`): the same
    quality (drafted greedy decoding gives the same tokens) in less time, and how many drafts it kept."""
    section, plain_s, plain_rate = None, None, None
    for role in ("plain", "drafted"):
        metrics = read_json(spec[role], "metrics.json")
        task_name, task = one_task(metrics, spec[role], spec.get("task"))
        label = spec.get("model") or next(iter(task["models"]))
        results = model_results(task, spec[role], label)
        cost = task.get("cost", {}).get(label)
        if cost is None:
            raise ConfigError(f"summary: {spec[role]} recorded no generation time for {label!r}")
        draft = cost.get("draft")
        if (role == "drafted") != (draft is not None):
            raise ConfigError(f"summary: drafting.{role} must be an eval {'with' if draft is None else 'without'} drafts "
                              f"(generation.draft=...); {spec[role]} is not")
        if section is None:
            section = Section(f"Drafted decoding: {task_name}, {task['n']} held-out questions, {label}, one at a time",
                              ["decoding", "exact match [95% CI]", "ROUGE-Lsum [95% CI]", f"wall s for {task['n']} answers",
                               "speed-up", "decode tok/s", "decode speed-up", "drafts kept per pass"])
            plain_s, plain_rate = cost["wall_s"], cost.get("decode_tok_s")
        drafter = None if draft is None else "prompt lookup" if draft["drafter"] == "prompt" else draft["drafter"]
        name = "plain greedy" if draft is None else f"{label} + {drafter} (K <= {draft['draft_tokens']})"
        rate = cost.get("decode_tok_s")  # evals before it was recorded have none
        section.rows.append([name, interval(results["exact_match"]),
                             interval(results["rougeLsum"]) if "rougeLsum" in results else "-", f"{cost['wall_s']:.1f}",
                             f"{plain_s / cost['wall_s']:.2f}x", "-" if rate is None else f"{rate:.0f}",
                             "-" if rate is None or plain_rate is None else f"{rate / plain_rate:.2f}x",
                             "-" if draft is None else f"{draft['accepted_per_pass']:.2f}"])
    section.notes.append("wall seconds spent generating the answers (encoder included), batch 1; decode tok/s: the tokens "
                         "after each answer's first over the time after it (the encoder's prefill apart); greedy decoding "
                         "with drafts keeps the tokens plain greedy decoding gives")
    return section


# -- the step ------------------------------------------------------------------------------


def check_spec(spec, where: str) -> None:
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: a summary names one or more of {', '.join(SECTIONS)}")
    unknown = [k for k in spec if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{where}: unknown summary section {unknown[0]!r} (choose from: {', '.join(SECTIONS)})")
    needs = {"architecture": ("eval", "bench", "models"), "distillation": ("eval", "models"), "export": ("export",),
             "vision": ("eval",), "drafting": ("plain", "drafted")}
    for name, sections in spec.items():
        for section in sections if name == "drafting" and isinstance(sections, list) else [sections]:
            missing = [k for k in needs[name] if not isinstance(section, dict) or k not in section]
            if missing:
                raise ConfigError(f"{where}: summary section {name!r} needs {', '.join(needs[name])} (missing {missing[0]})")


def build(spec: dict) -> tuple[list[Section], dict]:
    """The sections in SECTIONS order, and the architecture's plotted points (empty without one)."""
    sections, points = [], {}
    for name in SECTIONS:
        if name not in spec:
            continue
        if name == "architecture":
            section, points = architecture(spec[name])
        elif name == "drafting":
            sections += [drafting(pair) for pair in (spec[name] if isinstance(spec[name], list) else [spec[name]])]
            continue
        else:
            section = {"distillation": distillation, "export": export, "vision": vision}[name](spec[name])
        sections.append(section)
    return sections, points


def plot_architecture(points: dict, path: Path) -> None:
    """Exact match (95% CI) against first-token latency, decode speed and CPU seconds of the eval answers:
    the paper's trade-off, quality per unit of inference cost, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slmctl.atomic import atomic_save_figure

    costs = [("first_token_ms", "first-token latency (ms, lower is better)"),
             ("decode_tok_s", "decode tokens/s (higher is better)"),
             ("cpu_s", "CPU seconds to answer the eval set (lower is better)")]
    costs = [(key, label) for key, label in costs if all(p[key] is not None for p in points.values())]
    figure, axes = plt.subplots(1, len(costs), figsize=(4.2 * len(costs), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], costs):
        for name, point in points.items():
            em = point["exact_match"]
            ax.errorbar([point[key]], [em["value"]], yerr=[[em["value"] - em["low"]], [em["high"] - em["value"]]],
                        fmt="o", capsize=4, label=name)
            ax.annotate(name, (point[key], em["value"]), textcoords="offset points", xytext=(6, 4), fontsize="small")
        ax.set_xlabel(label)
        ax.set_ylabel("exact match (95% CI)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    atomic_save_figure(figure, path)


def run_summary(name: str, spec: dict, runs_dir: Path, console, argv: list[str]) -> Path:
    """Build the tables, print them, and write them into a new summary run; returns its directory."""
    from slmctl.runs.run import Run

    check_spec(spec, f"step {name!r}")
    sections, points = build(spec)
    run = Run.create(runs_dir, "summary", name, {"summary": spec}, argv=argv)
    for section_name, given in spec.items():
        for section in given if isinstance(given, list) else [given]:
            for role, ref in section.items():
                if role in ("eval", "bench", "export", "plain", "drafted", "model_run"):
                    run.add_input("run", str(ref), ref, role=f"{section_name}.{role}")
    for section in sections:
        console.print(section.rich())
    run.write_text("summary.md", "\n\n".join(s.markdown() for s in sections) + "\n")
    run.write_json("summary.json", [{"title": s.title, "columns": s.columns, "rows": s.rows, "notes": s.notes}
                                    for s in sections])
    if points:
        plot_architecture(points, run.path / "architecture.png")
    run.succeed({"sections": len(sections)})
    return run.path
