"""The bench stage: how fast models serve, per (model, batch, input length, output length).

`run(cfg, run)` measures every combination (load time, first-token latency = prompt in ->
first token out, decode tokens/s over the remaining tokens, end-to-end time, peak memory),
adds the analytic cost (FLOPs per prefill and per decoded token, bytes read per decoded
token) and the decode bound that memory bandwidth allows, and writes `bench.json` (the
environment and every record with its samples), a Rich table, and with two or more models a
comparison (ratios against the last model) and `bench.png` (first-token latency and
throughput against input length, the paper's Figure 1a); with two or more batch sizes,
`bench_batch.png` (decode tokens/s of all sequences against batch, beside the bandwidth bound). Each configuration is appended to
progress/bench.jsonl as soon as it is measured; `resume=RUN` continues an interrupted bench
with the configurations missing there. With `isolate=true` each model is measured in its own
child process. With `train=true` (`slmctl bench --train MODEL`) it times training steps
instead: slmctl.bench.training.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from fractions import Fraction
from pathlib import Path

import torch
from rich.console import Console

from slmctl.bench.measure import (
    BENCH_KINDS,
    implied_speedup,
    is_vision,
    load_for_bench,
    measure,
    pass_cost_ratio,
    step_cost_ratio,
    time_vision,
)
from slmctl.bench.report import RECORD_FIELDS, comparison_table, format_records, plot, plot_batch, table
from slmctl.model import flops
from slmctl.model.drafting import DRAFTERS, DraftModel, make_drafter
from slmctl.progress import PROGRESS_DIR, append_progress, read_progress
from slmctl.refs import parse
from slmctl.runtime.hardware import cpu_identity, peak_memory_mb, reset_peak_memory
from slmctl.runtime.generator import Generator, check_drafting
from slmctl.runtime.providers import placement_line

console = Console()
err_console = Console(stderr=True)
# per weight (int8/qdq/int4: quantized exports; int4: 4 bits + one fp32 scale per block of 32, the default block size)
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp16": 2, "int8": 1, "qdq": 1, "int4": Fraction(1, 2) + Fraction(4, 32)}


def preflight(cfg, runs_dir) -> None:
    """Refused before the run exists: a draft model that names nothing bench can load."""
    for draft in cfg.draft:
        if draft not in DRAFTERS:
            parse(draft, runs_dir).require(BENCH_KINDS, "--draft")


def run(cfg, run):
    """With `format` set, stdout carries only the records (`--format json > out.json`): the
    stage's own lines go to stderr, and so does anything a library prints while models load and run."""
    if not cfg.format:
        return _run(cfg, run, records_out=sys.stdout)
    records_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return _run(cfg, run, records_out)


def _run(cfg, run, records_out):
    from slmctl.runtime.devices import check_device

    check_device(cfg.device, cfg.runtime)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    environment = _environment(cfg)
    run.log(f"environment: {environment['cpu']} ({' '.join(environment['cpu_features']) or 'no listed features'}), "
            f"{environment['threads']} threads, torch {environment['torch']} (BLAS {environment['torch_blas']})")
    if cfg.train:
        return _run_training(cfg, run, environment, records_out)
    if cfg.device == "cpu" and cfg.format is None:
        console.print("peak memory = the process's resident high-water mark while each model loads and runs", highlight=False)
    profile = None
    if cfg.estimate:
        from slmctl.runtime.hardware import load_profile

        profile = load_profile(cfg.estimate, cfg.dtype)
        environment["estimate"] = {k: v for k, v in profile.items()}
        run.log(f"estimate: {profile['name']}: {profile['peak_flops'] / 1e12:.3g} TFLOP/s, "
                f"{profile['bandwidth'] / 1e9:.1f} GB/s ({profile['source']})")
    records = []
    runs_dir = run.runs_dir
    shown = err_console if cfg.format else console
    saved = run.path / PROGRESS_DIR / "bench.jsonl"
    measured = {tuple(p["key"]): p["record"] for p in read_progress(saved)}  # what a resumed run has already
    if measured:
        run.log(f"{len(measured)} configurations reused from {saved.relative_to(run.path)}")
    bandwidth_before = _read_bandwidth(cfg)  # a shared host's bandwidth moves: measured before and after the models
    for ref in cfg.models:
        keys = [(ref, batch, input_len, output_len) + ((draft,) if draft != "none" else ()) for batch in cfg.batch
                for input_len in cfg.input_lens for output_len in cfg.output_lens
                for draft in cfg.draft]  # one measurement each: (model as given, batch, in, out[, draft])
        if cfg.repeat and all(key in measured for key in keys):  # nothing left to measure: not even loaded
            records += [measured[key] for key in keys]
            continue
        parse(ref, runs_dir).require(BENCH_KINDS, "bench").record_input(run, role="model")  # verified as it loads
        skip = [key for key in keys if key in measured]
        new = measure_in_child(cfg, ref, runs_dir, environment, profile, skip) if cfg.isolate else \
            measure_model(cfg, ref, runs_dir, environment, profile, skip, shown)
        fresh = {}
        for key, record in new:
            record["cpu"] = environment["cpu"]  # which CPU timed it: a resumed run may reuse records of another
            if cfg.repeat:  # a measurement (not an estimate): kept for a resume
                append_progress(saved, [{"key": key, "record": record}])
            fresh[key] = record
        records += [measured.get(key) or fresh[key] for key in keys] if cfg.repeat else list(fresh.values())
    cpus = sorted({r["cpu"] for r in records if r.get("cpu")})
    if len(cpus) > 1:  # a run resumed on another machine: its records sit side by side in the tables below
        warning = (f"warning: these records were timed on different CPUs ({'; '.join(cpus)}): a resumed run reused "
                   "records measured elsewhere; compare them with care (each record's 'cpu' says which)")
        run.log(warning)
        err_console.print(warning, highlight=False)
    _add_bandwidth_bound(cfg, records, environment, bandwidth_before)
    _add_measured_speedups(records, shown)
    placement = _hoist_placement(records)
    run.write_json("bench.json", {"environment": environment, "records": records} | ({"placement": placement} if placement else {}))
    for model, roles in placement.items():
        run.log(f"{model}: {placement_line(roles)}")
    shown.print(table(records))
    labels = list(dict.fromkeys(r["model"] for r in records))
    if len(labels) > 1:
        shown.print(comparison_table(records, labels))
        plot(records, labels, run.path / "bench.png")
    if len({r["batch"] for r in records}) > 1:
        plot_batch(records, labels, run.path / "bench_batch.png")
    if cfg.format:
        print(format_records(records, cfg.format), end="", file=records_out)
    run.succeed({f"{r['model']}:b{r['batch']}:in{r['input_len']}:first_token_ms": round(r["first_token_ms"], 2)
                 for r in records if r["first_token_ms"] is not None} | {"records": len(records)})
    return run


def _run_training(cfg, run, environment: dict, records_out):
    """`bench --train MODEL`: training steps timed (slmctl.bench.training), T5 beside with `t5=true`."""
    from slmctl.bench.report import train_comparison_table, train_comparisons, train_table
    from slmctl.bench.training import measure as measure_training

    shown = err_console if cfg.format else console
    records = measure_training(cfg, run, shown)
    run.write_json("bench.json", {"environment": environment, "records": records})
    shown.print(train_table(records))
    labels = list(dict.fromkeys(r["model"] for r in records))
    ratios = train_comparisons(records, labels) if len(labels) > 1 else []
    if ratios:
        shown.print(train_comparison_table(records, labels))
    if cfg.format:
        print(format_records(records, cfg.format), end="", file=records_out)
    summary = {}
    for r in records:
        key = f"{r['model']}:b{r['batch']}:s{r['source_len']}:t{r['target_len'] or 0}"
        summary[f"{key}:train_tokens_per_s"] = round(r["tokens_per_s"], 1)
        summary[f"{key}:mfu"] = round(r["mfu"], 4) if r["mfu"] is not None else None
    for c in ratios:
        summary[f"{c['model']}:b{c['batch']}:speedup_vs_{c['baseline']}"] = round(c["speedup"], 3)
    run.succeed(summary | {"records": len(records)})
    return run


def measure_model(cfg, ref: str, runs_dir, environment: dict, profile: dict | None, skip: list, shown):
    """(key, record) for every configuration of one model not in `skip`, as each is measured."""
    import gc

    gc.collect()
    reset_peak_memory(cfg.device)  # each model's peak is its own
    loaded = load_for_bench(ref, runs_dir, cfg.device, cfg.dtype, cfg.seed, cfg.runtime, cfg.threads, cfg.ep, cfg.allow_fallback,
                            cfg.prepacking)
    params = loaded.model.num_parameters()
    image = _bench_image(cfg) if is_vision(loaded.model) else None
    vision = {}
    if image is not None:
        vision_ms, tokens = time_vision(loaded.model, image, cfg.repeat)
        vision = {"image_size": list(image.size), "tokens_per_image": tokens, "vision_ms": vision_ms}
        shown.print(f"{loaded.name}: a {image.size[0]}x{image.size[1]} image -> {tokens} tokens in {vision_ms:.1f} ms",
                    highlight=False)
    skip = {tuple(key) for key in skip}
    drafters = {draft: _drafter(cfg, draft, loaded, runs_dir) for draft in cfg.draft}  # a draft model loads once
    for batch in cfg.batch:
        for input_len in cfg.input_lens:
            for output_len in cfg.output_lens:
                for draft in cfg.draft:
                    key = (ref, batch, input_len, output_len) + ((draft,) if draft != "none" else ())
                    if cfg.repeat == 0:  # an estimate only
                        if draft == "none":
                            yield key, _estimate_only(cfg, loaded, params, batch, input_len, output_len, profile)
                        continue
                    if key in skip:
                        continue
                    yield key, _measured(cfg, loaded, params, batch, input_len, output_len, draft, drafters[draft], image,
                                         environment, profile, shown) | vision


def _drafter(cfg, draft: str, loaded, runs_dir):
    """None, prompt lookup, or a draft model (loaded as bench loads models, so an export drafts on ONNX
    Runtime) whose token ids are the target's: the same vocabulary and special tokens."""
    from slmctl.errors import ConfigError

    if draft in DRAFTERS:
        drafter = make_drafter(draft, cfg.draft_tokens, cfg.draft_ngram)
    else:
        model = load_for_bench(draft, runs_dir, cfg.device, cfg.dtype, cfg.seed, "auto", cfg.threads, cfg.ep,
                               cfg.allow_fallback, cfg.prepacking).model
        ours, theirs = loaded.model.config, model.config
        same = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
        if not theirs.is_encoder_decoder or any(getattr(ours, k) != getattr(theirs, k) for k in same):
            raise ConfigError(f"--draft {draft}: a draft model must be an encoder-decoder with {loaded.name}'s vocabulary "
                              f"({ours.vocab_size} tokens) and special tokens")
        drafter = DraftModel(model, max_tokens=cfg.draft_tokens, label=f"model {draft}")
    if drafter is not None:
        check_drafting(Generator(loaded.model, None, loaded.arch, Path(loaded.name)), 1)
    return drafter


def _measured(cfg, loaded, params, batch, input_len, output_len, draft, drafter, image, environment, profile,
              shown) -> dict:
    """One configuration's record; with a drafter, its acceptance and the cost of a pass checking K drafts
    (and a draft model's step against the target's)."""
    summary, samples = measure(loaded, cfg.device, batch, input_len, output_len, cfg.repeat, cfg.warmup, cfg.seed, image,
                               drafter)
    record = _record(cfg, loaded, params, batch, input_len, output_len, summary, samples, environment)
    record |= {"draft": draft, "draft_tokens": None, "accepted_per_pass": None, "pass_cost_ratio": None, "implied_speedup": None,
               "draft_step_cost_ratio": None}
    if drafter is not None:
        typical = max(1, round(summary["drafted_per_pass"]))  # K adapts: the pass the drafter mostly made
        full_cost = pass_cost_ratio(loaded, cfg.device, batch, input_len, cfg.draft_tokens, cfg.seed)
        typical_cost = full_cost if typical == cfg.draft_tokens else \
            pass_cost_ratio(loaded, cfg.device, batch, input_len, typical, cfg.seed)  # timed once when they are one pass
        # a draft model spends about one of its own steps per drafted token (the first reads what it has not seen)
        draft_step = step_cost_ratio(drafter.model, loaded, cfg.device, batch, input_len, cfg.seed) \
            if isinstance(drafter, DraftModel) else None
        drafting = summary["drafted_per_pass"] * draft_step if draft_step is not None else 0.0
        record |= {"draft_tokens": cfg.draft_tokens, "draft_ngram": getattr(drafter, "ngram", None),
                   "accepted_per_pass": summary["accepted_per_pass"],
                   "drafted_per_pass": summary["drafted_per_pass"], "draft_passes": summary["draft_passes"],
                   "pass_cost_ratio": full_cost, "typical_pass_cost_ratio": typical_cost, "draft_step_cost_ratio": draft_step,
                   "implied_speedup": implied_speedup(output_len, summary["draft_passes"], summary["accepted_per_pass"],
                                                      typical_cost + drafting)}
    if profile:
        _add_prediction(record, loaded.model.config, cfg, profile)
    floor = f" (roofline: >= {record['predicted_pass_cost_ratio']:.2f}x)" if record.get("predicted_pass_cost_ratio") else ""
    drafted = (f", draft {draft}: {record['accepted_per_pass']:.2f} of {record['drafted_per_pass']:.2f} drafts kept per pass, "
               f"a {cfg.draft_tokens}-draft pass {record['pass_cost_ratio']:.2f}x a step{floor}; implied speed-up "
               f"{record['implied_speedup']:.2f}x") if drafter else ""
    shown.print(f"{loaded.name} b{batch} in{input_len} out{output_len}: first token {record['first_token_ms']:.1f} ms, "
                f"decode {record['decode_tok_s']:.1f} tok/s{drafted}", highlight=False)
    return record


def measure_in_child(cfg, ref: str, runs_dir, environment: dict, profile: dict | None, skip: list):
    """`measure_model` in a fresh Python process (`isolate=true`): models measured one after the
    other then share no allocator state, thread pools or caches (in one process, ONNX Runtime's
    large allocations change how fast PyTorch's prefill allocates: docs/speed.md)."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    job = {"cfg": OmegaConf.to_container(cfg, resolve=True), "ref": ref, "runs_dir": str(runs_dir),
           "environment": environment, "profile": profile, "skip": skip}
    child = subprocess.Popen([sys.executable, "-m", "slmctl.bench.isolated"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    child.stdin.write(json.dumps(job))
    child.stdin.close()
    for line in child.stdout:  # one (key, record) per line, as each is measured
        key, record = json.loads(line)
        yield tuple(key), record
    if child.wait() != 0:
        from slmctl.errors import ConfigError

        raise ConfigError(f"measuring {ref} in a child process failed (exit {child.returncode}; its error is above)")


def _record(cfg, loaded, params, batch, input_len, output_len, summary, samples, environment) -> dict:
    config = loaded.model.config
    cost = flops.generation_cost(config, input_len, output_len, BYTES[loaded.dtype])
    decode = cost["decode_per_token"]
    decode_tok_s = summary["decode_tokens_per_s"]["median"] * batch  # every sequence of the batch
    return {
        "model": loaded.name, "arch": loaded.arch, "device": cfg.device, "runtime": loaded.runtime,
        "ep": getattr(loaded.model, "provider", None), "dtype": loaded.dtype, "prepacked": loaded.prepacked,
        "batch": batch, "input_len": input_len, "output_len": output_len,
        "placement": getattr(loaded.model, "placement", None),  # ONNX Runtime: where each node ran
        "first_token_ms": summary["first_token_s"]["median"] * 1e3,
        "first_token_ms_p90": summary["first_token_s"]["p90"] * 1e3,
        "first_token_ms_stdev": summary["first_token_s"]["stdev"] * 1e3,
        "decode_tok_s": decode_tok_s,
        "decode_tok_s_p90": summary["decode_tokens_per_s"]["p90"] * batch,
        "decode_tok_s_stdev": summary["decode_tokens_per_s"]["stdev"] * batch,
        "e2e_ms": summary["total_s"]["median"] * 1e3,
        "peak_mem_mb": peak_memory_mb(cfg.device), "params": params, "load_s": loaded.load_s,
        "prefill_flops": cost["prefill"].flops, "decode_flops_per_token": decode.flops if decode else None,
        "decode_bytes_per_token": decode.weight_bytes + decode.kv_bytes if decode else None,
        "decode_weight_bytes": decode.weight_bytes if decode else None,
        "decode_kv_bytes": decode.kv_bytes * batch if decode else None,
        "bandwidth_bound_tok_s": None, "bound_fraction": None,
        "repeat": len(samples), "warmup": cfg.warmup,
        "samples": [{"first_token_ms": s.first_token_s * 1e3, "decode_tok_s": s.decode_tokens_per_s * batch,
                     "e2e_ms": s.total_s * 1e3} for s in samples],
    }


def _hoist_placement(records: list[dict]) -> dict:
    """{model: {role: full placement report}} for bench.json, once per model; each record keeps
    the report without the node-by-node assignment."""
    from slmctl.runtime.providers import summary

    full = {}
    for r in records:
        if r.get("placement"):
            full.setdefault(r["model"], r["placement"])
            r["placement"] = {role: summary(report) for role, report in r["placement"].items()}
    return full


def _bench_image(cfg):
    """A shape scene resized to `image_size` (width, height): what a vision model reads per prompt."""
    from slmctl.data.shapes import ShapeScenes

    width, height = cfg.image_size
    return ShapeScenes(seed=cfg.seed).example("test", 0)["image"].resize((int(width), int(height)))


def _add_prediction(record: dict, config, cfg, profile: dict) -> dict:
    from slmctl.bench.roofline import pass_cost_floor, predict

    cost = flops.generation_cost(config, record["input_len"], record["output_len"], BYTES[record["dtype"]])
    record.update(predict(cost["prefill"], cost["decode_per_token"], record["batch"], profile))
    if record.get("draft_tokens") and record["dtype"] == cfg.dtype:  # the least a pass over 1 + K tokens can cost
        # (at the profile's peak for the bench's dtype: an int8 record beside fp32 ones would be held to fp32's)
        record["predicted_pass_cost_ratio"] = pass_cost_floor(cost["decode_per_token"], 1 + record["draft_tokens"],
                                                              record["batch"], profile)
    record["estimate"] = profile["name"]
    if record.get("first_token_ms") is not None:
        record["first_token_measured_over_predicted"] = record["first_token_ms"] / record["predicted_first_token_ms"]
    if record.get("decode_tok_s") and record["predicted_decode_tok_s"]:
        record["decode_measured_over_predicted"] = record["decode_tok_s"] / record["predicted_decode_tok_s"]
    return record


def _estimate_only(cfg, loaded, params, batch, input_len, output_len, profile) -> dict:
    if profile is None:
        from slmctl.errors import ConfigError

        raise ConfigError("--repeat 0 measures nothing: use it with --estimate PROFILE for a prediction only")
    record = {key: None for key in RECORD_FIELDS} | {
        "model": loaded.name, "arch": loaded.arch, "device": profile["name"], "runtime": "roofline", "dtype": loaded.dtype,
        "batch": batch, "input_len": input_len, "output_len": output_len, "params": params, "samples": []}
    return _add_prediction(record, loaded.model.config, cfg, profile)


def _add_measured_speedups(records: list[dict], shown) -> None:
    """Each drafted record's decode rate over its plain twin's (same model, batch, lengths; when the run
    measured one), printed beside the speed-up its pass cost and acceptance imply."""
    plain = {(r["model"], r["batch"], r["input_len"], r["output_len"]): r for r in records if r.get("draft") in (None, "none")}
    for r in records:
        twin = plain.get((r["model"], r["batch"], r["input_len"], r["output_len"]))
        if r.get("draft") in (None, "none") or twin is None or not twin["decode_tok_s"] or r["decode_tok_s"] is None:
            continue
        r["measured_speedup"] = r["decode_tok_s"] / twin["decode_tok_s"]
        shown.print(f"{r['model']} b{r['batch']} in{r['input_len']} out{r['output_len']} draft {r['draft']}: decode "
                    f"{r['measured_speedup']:.2f}x plain (its passes imply {r['implied_speedup']:.2f}x)", highlight=False)


def _read_bandwidth(cfg) -> float | None:
    """The read bandwidth in GB/s now (CPU runs that time something; None otherwise). Its 256 MB buffer
    is freed before any model loads, and each model's peak is reset when it starts."""
    if cfg.device != "cpu" or cfg.repeat == 0:
        return None
    from slmctl.runtime.hardware import measure_read_bandwidth

    return round(measure_read_bandwidth(256) / 1e9, 2)


def _add_bandwidth_bound(cfg, records: list[dict], environment: dict, before: float | None) -> None:
    """Batch-B decoding reads the weights once and every sequence's cache per step: the bound
    is B tokens per (weights + B caches) bytes at the read bandwidth, the higher of the two
    measured before and after the models (a bound no kernel may beat: on a shared host a
    neighbour's load during one measurement would otherwise flatter every fraction)."""
    after = _read_bandwidth(cfg)
    if after is None:
        return
    environment["read_bandwidth_gb_s_before_after"] = [before, after]
    environment["read_bandwidth_gb_s"] = max(before or 0.0, after)
    for r in records:
        rate = r["decode_tok_s"]
        if r.get("decode_weight_bytes") is None or rate is None or rate != rate:  # nan: one new token, no decode
            continue
        step_s = (r["decode_weight_bytes"] + r["decode_kv_bytes"]) / (environment["read_bandwidth_gb_s"] * 1e9)
        r["bandwidth_bound_tok_s"] = r["batch"] / step_s
        r["bound_fraction"] = r["decode_tok_s"] / r["bandwidth_bound_tok_s"]


def _environment(cfg) -> dict:
    from slmctl.runtime.devices import onnxruntime_providers

    environment = {**cpu_identity(), "machine": platform.machine(), "python": platform.python_version(),
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "device": cfg.device,
                   "onnxruntime_providers": onnxruntime_providers()}
    if cfg.device == "cuda":
        environment["gpu"] = torch.cuda.get_device_name()
    return environment

