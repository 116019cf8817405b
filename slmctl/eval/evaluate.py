"""The eval stage: models (or a predictions file) x tasks -> predictions, scores, comparison.

`run(cfg, run)` loads the task, and for every model in `cfg.models` generates answers in
batches (or, with `cfg.predictions`, reads someone else's), scores them with the task's
metrics and 95% bootstrap intervals (plus the perplexity of the reference and, with a judge
configured, the LLM-judge score), and writes into the run:

    predictions.jsonl           one line per (task, model, example): task, model, id, source,
                                references, prediction and the per-example scores
    metrics.json                {"tasks": {task: {"n", "models": {model: {metric: {value, low,
                                high, n}}}, "paired": [{model, baseline, metrics: {metric:
                                {difference, low, high, n}}}], "cost": {model: {cpu_s, wall_s,
                                examples, first_token_ms, decode_tokens, decode_tok_s}}}}} (+ the
                                judge's missing count); cost = the process's CPU and wall seconds
                                spent generating the task's answers, and the decode speed after
                                the first tokens (not with beams or transformers' models)
    comparison-<task>.png       with several models: grouped bars of the 0..1 metrics
    progress/<task>/<model>.jsonl  each generated example (id, prediction, reference NLL) as its
                                batch finishes: `resume=RUN` continues an interrupted eval from them
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from slmctl.data.sources import DataError
from slmctl.errors import ConfigError, UserError, first_line
from slmctl.eval import metrics as M
from slmctl.eval.report import bar_chart, difference_cell, model_table, paired_table, side_by_side
from slmctl.eval.tasks import EvalExample, load_task
from slmctl.progress import PROGRESS_DIR, append_progress, read_progress

console = Console()


def preflight(cfg, runs_dir) -> None:
    """Refused before the run exists: a drafter that is neither none, prompt nor a model directory or run."""
    from slmctl.refs import parse

    draft = cfg.generation.draft
    if draft not in ("none", "prompt"):
        try:
            parse(draft, runs_dir).require(("model_dir",), "generation.draft")
        except UserError as e:
            raise ConfigError(f"generation.draft={draft!r}: none, prompt or a draft model ({first_line(e)})") from None


def run(cfg, run):
    if bool(cfg.models) == bool(cfg.predictions):
        raise ConfigError("give model(s) to evaluate (slmctl eval MODEL... task=...) or --predictions FILE, not both")
    tasks = _tasks(cfg)
    if cfg.judge.kind == "local" and cfg.judge.trust_remote_code:
        run.log("judge.trust_remote_code=true: code from the judge's repository runs in this process")
    runs_dir = run.runs_dir
    judge, judge_cache = _judge(cfg, runs_dir)
    generators: dict[str, object] = {}  # each model is loaded once, whatever the number of tasks
    report: dict[str, dict] = {}
    lines: list[dict] = []
    for task in tasks:
        examples = load_task(task, cfg.limit)
        run.log(f"task {task.name}: {len(examples)} examples" + (f" (limit={cfg.limit})" if cfg.limit else ""))
        results: dict[str, dict] = {}
        scored: dict[str, dict[str, list]] = {}  # label -> per-example scores, for the paired comparisons
        costs: dict[str, dict] = {}  # label -> CPU and wall seconds of generating the answers
        for ref in [None] if cfg.predictions else list(cfg.models):
            if ref is None:
                label = _unique(_label_of_file(cfg.predictions), results)
                predictions, nll = _read_predictions(Path(cfg.predictions), examples), None
                run.add_input("file", cfg.predictions, cfg.predictions, role="predictions")
            else:
                predictions, nll, label, costs_of_model = _generate(cfg, task, run, ref, runs_dir, examples, generators,
                                                                    taken=results)
                if costs_of_model is not None:
                    costs[label] = costs_of_model
                    run.log(f"{task.name} {label}: answers generated in {costs_of_model['cpu_s']:.1f} CPU s "
                            f"({costs_of_model['wall_s']:.1f} s wall)")
            scores, per_example = score(cfg, task, examples, predictions, nll)
            if judge is not None:
                scores["judge"], judge_scores, counts = _judged(cfg, judge, judge_cache, examples, predictions)
                per_example["judge"] = judge_scores
                run.log(f"{task.name} {label}: judge {judge.id}: {counts}")
            results[label] = scores
            scored[label] = per_example
            for i, (example, prediction) in enumerate(zip(examples, predictions)):
                lines.append({"task": task.name, "model": label, "id": example.id, "source": example.source,
                              "references": example.references, "prediction": prediction,
                              "scores": {k: v[i] for k, v in per_example.items()}})
            console.print(model_table(label, scores, task.name))
        if len(results) > 1:
            console.print(side_by_side(results, task.name))
            bar_chart(results, task.name, run.path / f"comparison-{task.name}.png")
        report[task.name] = {"n": len(examples), "models": results}
        if costs:
            report[task.name]["cost"] = costs
        if len(results) > 1:
            report[task.name]["paired"] = paired_comparisons(cfg, list(results), scored, task)
            console.print(paired_table(report[task.name]["paired"], task.name))
        if task.kind == "shapes":  # the accuracy of guessing each question kind's most frequent answer
            from slmctl.data.shapes import ShapeScenes, chance

            scenes = ShapeScenes(seed=task.seed, max_shapes=task.max_shapes)
            questions = scenes.questions("test", len(examples))
            report[task.name]["chance"] = chance(questions)
            run.log(f"{task.name}: chance (most frequent answer per question kind) {report[task.name]['chance']['overall']:.3f}")
            exact_matches = {label: s["exact_match"] for label, s in scored.items() if "exact_match" in s}
            if exact_matches:  # which kinds of question each model answers, against their chance
                report[task.name]["per_kind"], report[task.name]["per_kind_interval"] = {}, {}
                for label, matched in exact_matches.items():
                    by_kind = M.bootstrap_by_group(matched, [q["kind"] for q in questions], cfg.bootstrap, seed=cfg.seed)
                    per_kind = {kind: mean for kind, (mean, _, _) in by_kind.items()}
                    intervals = {kind: [low, high] for kind, (_, low, high) in by_kind.items()}
                    report[task.name]["per_kind"][label] = per_kind
                    report[task.name]["per_kind_interval"][label] = intervals
                    run.log(f"{task.name} {label}: exact match by kind " + ", ".join(
                        f"{kind} {value:.3f} [{intervals[kind][0]:.3f}, {intervals[kind][1]:.3f}] "
                        f"(chance {report[task.name]['chance'][kind]:.3f})" for kind, value in per_kind.items()))
    run.write_text("predictions.jsonl", "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    run.write_json("metrics.json", {"tasks": report})
    summary = {}
    for task in tasks:
        headline = task.metrics[0]
        for label, scores in report[task.name]["models"].items():
            if headline in scores:
                summary[f"{task.name}:{label}:{headline}"] = scores[headline]["value"]
        for pair in report[task.name].get("paired", []):
            if headline in pair["metrics"]:
                summary[f"{task.name}:{pair['model']}-{pair['baseline']}:{headline}"] = difference_cell(pair["metrics"][headline])
    run.succeed(summary)
    return run


def paired_comparisons(cfg, labels: list[str], scored: dict[str, dict[str, list]], task) -> list[dict]:
    """[{model, baseline, metrics: {metric: {difference, low, high, n}}}] for `cfg.pairs` (positions
    in the models' order) or each model against the last, over every per-example metric both have."""
    pairs = [tuple(p) for p in cfg.pairs] or [(i, len(labels) - 1) for i in range(len(labels) - 1)]
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(i, int) and 0 <= i < len(labels) for i in pair) or pair[0] == pair[1]:
            raise ConfigError(f"pairs entry {list(pair)}: two different positions in models (0..{len(labels) - 1}), "
                              f"e.g. pairs=[[0,1]] for {labels[0]} against {labels[min(1, len(labels) - 1)]}")
    rows = []
    for i, j in pairs:
        model, baseline = labels[i], labels[j]
        shared = [m for m in scored[model] if m in scored[baseline] and m in (*task.metrics, "exact_match", "f1")
                  and None not in scored[model][m] and None not in scored[baseline][m]]  # per-example metrics only
        differences = {}
        for metric in shared:
            value, low, high = M.paired_bootstrap_ci(scored[model][metric], scored[baseline][metric],
                                                     n_resamples=cfg.bootstrap, seed=cfg.seed)
            differences[metric] = {"difference": value, "low": low, "high": high, "n": len(scored[model][metric])}
        rows.append({"model": model, "baseline": baseline, "metrics": differences})
    return rows


def _tasks(cfg) -> list:
    """The `task` group's choice, or every task named in `tasks=[...]` (each with its defaults)."""
    from slmctl.config.compose import compose

    tasks = [cfg.task] if not cfg.tasks else [compose("eval", [f"task={name}"]).task for name in cfg.tasks]
    for task in tasks:
        unknown = [m for m in task.metrics if m not in (*M.VALID_METRICS, "perplexity")]
        if unknown:
            raise ConfigError(f"task {task.name}: unknown metric {unknown[0]!r} "
                              f"(choose from: {', '.join((*M.VALID_METRICS, 'perplexity'))})")
    return tasks


# -- predictions ---------------------------------------------------------------------------


def _scorer(generator, ref: str, runs_dir: Path, device: str, generators: dict):
    """The PyTorch model that scores references teacher-forced: the generator itself, or, for a model
    directory that this CPU generates with on ONNX Runtime (slmctl.runtime.routes), the same
    directory on PyTorch, loaded once."""
    from slmctl.runtime.generator import load_generator

    if not hasattr(generator.model, "graphs"):
        return generator
    if (ref, "torch") not in generators:
        generators[ref, "torch"] = load_generator(ref, runs_dir, device, runtime="torch")
    return generators[ref, "torch"]


def _generate(cfg, task, run, ref: str, runs_dir: Path, examples: list[EvalExample], generators: dict, taken: dict):
    """(predictions, reference NLLs or None, label, cost) of one model on a task. Each batch is appended to
    progress/<task>/<label>.jsonl as it finishes, with its share of the batch's generation time, so a
    resumed run generates only the examples missing there (those of the same model: a `latest` that has
    moved on starts over) and the cost still covers every answer. cost = {cpu_s, wall_s, examples[,
    first_token_ms, decode_tokens, decode_tok_s][, draft]}: process CPU seconds (all threads) and wall seconds
    spent generating (not scoring) the answers; the mean time an answer waited for its batch's first tokens
    and the tokens after them over the time after them (the decode speed, prefill apart: a batch's rows
    together, so with batch > 1 the batch's throughput); and with a drafter its passes, drafted and accepted
    tokens."""
    from slmctl.eval.predict import DecodeClock, predict_batches, reference_nll
    from slmctl.model.drafting import DraftStats
    from slmctl.runtime.generator import check_drafting, load_generator, open_drafter

    if ref not in generators:
        generators[ref] = load_generator(ref, runs_dir, cfg.device, runtime=cfg.runtime, ep=cfg.ep,
                                         allow_fallback=cfg.allow_fallback, dtype=cfg.dtype)
    generator = generators[ref]
    generator.ref.record_input(run, role="model")
    exported = generator.ref.kind == "export"  # ONNX Runtime: generation only, no teacher-forced scoring
    label = _unique(generator.ref.label, taken)
    max_new = cfg.generation.max_new_tokens or task.max_new_tokens
    with_images = any(e.images for e in examples)
    if with_images:
        from slmctl.model.vlm import VisionEncoderDecoderLM

        if not isinstance(generator.model, VisionEncoderDecoderLM):
            raise ConfigError(f"task {task.name} has images; {ref} has no vision tower (make one with `slmctl add-vision`)")
    with_nll = "perplexity" in task.metrics and not exported and not with_images
    if exported and "perplexity" in task.metrics:
        run.log(f"{label}: no perplexity (the exported graphs return the last token's logits only)")
    scorer = _scorer(generator, ref, runs_dir, cfg.device, generators) if with_nll else None
    drafter = open_drafter(cfg.generation.draft, cfg.generation.draft_tokens, generator, runs_dir, cfg.device,
                           ngram=cfg.generation.draft_ngram)
    if drafter is not None:
        check_drafting(generator, cfg.generation.num_beams)
    drafted, clock = DraftStats(), DecodeClock()
    sources = [e.source for e in examples]
    references = [e.references[0] if e.references else "" for e in examples]
    model = str(generator.path)
    saved = run.path / PROGRESS_DIR / task.name / f"{label}.jsonl"
    done = {r["id"]: r for r in read_progress(saved) if r["model"] == model}  # id -> {id, model, prediction, nll}
    finished = [i for i, e in enumerate(examples) if e.id in done]
    if finished:
        run.log(f"{task.name} {label}: {len(finished)} of {len(examples)} examples reused from {saved.relative_to(run.path)}")
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"{task.name} {label}: generating", total=len(examples), completed=len(finished))
        started = time.process_time(), time.perf_counter()
        for batch, texts in predict_batches(generator, sources, cfg.batch_size, max_new, cfg.generation.num_beams,
                                            cfg.generation.length_penalty, cfg.max_source_len,
                                            images=[e.images for e in examples] if with_images else None, skip=finished,
                                            drafter=drafter, clock=clock):
            cpu_s, wall_s = time.process_time() - started[0], time.perf_counter() - started[1]
            if drafter is not None:
                drafted.passes += drafter.stats.passes
                drafted.drafted += drafter.stats.drafted
                drafted.accepted += drafter.stats.accepted
            nll = reference_nll(scorer, [sources[i] for i in batch], [references[i] for i in batch], len(batch),
                                cfg.max_source_len) if with_nll else [None] * len(batch)
            share = {"cpu_s": cpu_s, "wall_s": wall_s, "decode_s": clock.decode_s, "decode_tokens": clock.decode_tokens}
            records = [{"id": examples[i].id, "model": model, "prediction": text, "nll": pair,
                        **{key: value / len(batch) for key, value in share.items()},
                        "first_token_s": clock.first_token_s}  # every row of the batch waited that long
                       for i, text, pair in zip(batch, texts, nll)]
            append_progress(saved, records)
            done.update((r["id"], r) for r in records)
            progress.advance(bar, len(batch))
            started = time.process_time(), time.perf_counter()
    if drafter is not None and drafted.passes:
        run.log(f"{task.name} {label}: draft {drafter.name}: {drafted.passes} passes, {drafted.drafted} tokens drafted, "
                f"{drafted.accepted} accepted ({drafted.accepted_per_pass:.2f} per pass)")
    predictions = [done[e.id]["prediction"] for e in examples]
    nll = [tuple(done[e.id]["nll"]) for e in examples] if with_nll else None
    timed = [done[e.id] for e in examples if "cpu_s" in done[e.id]]
    cost = None if len(timed) < len(examples) else {  # progress written before costs were recorded: unknown
        "cpu_s": sum(r["cpu_s"] for r in timed), "wall_s": sum(r["wall_s"] for r in timed), "examples": len(timed)}
    decode_s, decode_tokens = sum(r.get("decode_s", 0) for r in timed), sum(r.get("decode_tokens", 0) for r in timed)
    if cost is not None and decode_tokens > 0 and all("decode_s" in r for r in timed):  # the decode speed after first tokens
        cost |= {"first_token_ms": 1e3 * sum(r["first_token_s"] for r in timed) / len(timed),
                 "decode_tokens": round(decode_tokens), "decode_tok_s": decode_tokens / decode_s}
    if cost is not None and drafter is not None:  # what drafting did for the answers generated in this run
        cost["draft"] = {"drafter": drafter.name, "draft_tokens": cfg.generation.draft_tokens,
                         **({"draft_ngram": drafter.ngram} if hasattr(drafter, "ngram") else {}), **drafted.as_dict()}
    return predictions, nll, label, cost


def _read_predictions(path: Path, examples: list[EvalExample]) -> list[str]:
    """The predictions of a jsonl of {id, prediction}, in the task's order."""
    if not path.is_file():
        raise DataError(f"no such predictions file: {path}")
    found: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("prediction"), str):
            raise DataError(f"{path}:{number}: expected an object with 'id' and a 'prediction' string")
        found[str(record["id"])] = record["prediction"]
    ids = {e.id for e in examples}
    unknown = [i for i in found if i not in ids]
    missing = [e.id for e in examples if e.id not in found]
    if missing:
        raise DataError(f"{path}: {len(missing)} of the task's {len(examples)} examples have no prediction (first: id {missing[0]!r})")
    if unknown and len(unknown) == len(found):
        raise DataError(f"{path}: none of its ids are the task's (first: {unknown[0]!r})")
    return [found[e.id] for e in examples]


# -- scores ------------------------------------------------------------------------------------


def score(cfg, task, examples: list[EvalExample], predictions: list[str], nll) -> tuple[dict[str, dict], dict[str, list]]:
    """(metric -> {value, low, high, n}, metric -> per-example values) for the task's metrics."""
    text_metrics = [m for m in task.metrics if m not in ("perplexity", "judge")]
    references = [e.references for e in examples]
    values = M.per_example_scores(predictions, references, text_metrics)
    results = {name: r.to_dict() for name, r in M.score_examples(predictions, references, text_metrics, n_resamples=cfg.bootstrap,
                                                                  seed=cfg.seed, per_example=values).items()}
    per_example: dict[str, list] = {}
    for name in text_metrics:  # corpus metrics (bleu) and the has/no-answer subsets have no per-example value
        column = values.get(name, [None] * len(predictions))
        if name == "answer_length":
            column = [int(v) for v in column]
        elif name != "exact_match":
            column = [round(v, 4) if v is not None else None for v in column]
        per_example[name] = column
    if nll is not None:
        results["perplexity"] = _perplexity(nll, cfg.bootstrap, cfg.seed)
        per_example["nll"] = [round(total, 4) for total, _ in nll]
    return results, per_example


def _perplexity(nll: list[tuple[float, int]], n_resamples: int, seed: int) -> dict:
    """Token-level perplexity of the references, exp(total NLL / total tokens), with a bootstrap
    interval over examples."""
    totals = np.array([t for t, _ in nll])
    counts = np.array([n for _, n in nll])
    value = math.exp(totals.sum() / max(1, counts.sum()))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_resamples):
        index = rng.integers(0, len(nll), len(nll))
        samples.append(math.exp(totals[index].sum() / max(1, counts[index].sum())))
    low, high = np.percentile(samples, [2.5, 97.5]) if samples else (value, value)
    return {"name": "perplexity", "value": value, "low": float(low), "high": float(high), "n": len(nll)}


# -- the judge -------------------------------------------------------------------------------


def _judge(cfg, runs_dir: Path):
    kind = cfg.judge.kind
    if kind == "none":
        return None, None
    from slmctl.eval.judge import EndpointJudge, JudgeCache, LocalJudge

    if kind == "local":
        judge = LocalJudge(cfg.judge.path, max_new_tokens=cfg.judge.max_new_tokens, batch_size=cfg.batch_size,
                           trust_remote_code=cfg.judge.trust_remote_code, device=cfg.device, runs_dir=runs_dir)
    else:
        judge = EndpointJudge(cfg.judge.endpoint, cfg.judge.model, api_key_env=cfg.judge.api_key_env,
                              max_tokens=cfg.judge.max_new_tokens)
    return judge, JudgeCache(Path(cfg.judge.cache_dir).expanduser() if cfg.judge.cache_dir else default_cache_dir())


def default_cache_dir() -> Path:
    """Where judge scores are kept across runs: $XDG_CACHE_HOME/slmctl, else ~/.cache/slmctl (the XDG rule)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slmctl"


def _judged(cfg, judge, cache, examples: list[EvalExample], predictions: list[str]):
    from slmctl.eval.judge import judge_examples

    items = [{"source": e.source, "reference": e.references[0] if e.references else "", "prediction": p}
             for e, p in zip(examples, predictions)]
    result = judge_examples(judge, items, cache)
    present = [s for s in result.scores if s is not None]
    if present:
        value, low, high = M.bootstrap_ci(present, cfg.bootstrap, seed=cfg.seed)
    else:
        value = low = high = None
    summary = {"name": "judge", "value": value, "low": low, "high": high, "n": len(present), "missing": result.missing}
    counts = f"{len(present)} scored, {result.missing} unparsable (missing), {result.cached} from cache, {result.calls} calls"
    return summary, result.scores, counts


# -- labels ---------------------------------------------------------------------------------


def _label_of_file(path: str) -> str:
    return Path(path).stem


def _unique(label: str, taken: dict) -> str:
    candidate, n = label, 2
    while candidate in taken:
        candidate, n = f"{label}-{n}", n + 1
    return candidate
