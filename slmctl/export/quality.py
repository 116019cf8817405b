"""Quantized variants and what they cost: size, speed and quality against fp32, measured in
the same process on the same prompts.

Quality is (1) greedy token agreement with the fp32 graphs on the task's prompts (or random
prompts for a model without a tokenizer) and (2) the task's first metric (exact match for
synthetic_qa) on a small eval slice, fp32 and quantized side by side.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from slmctl.export.onnx_export import variant_mb
from slmctl.export.quantize import quantize_int4, quantize_int8, quantize_qdq, record_feeds
from slmctl.export.validate import token_agreement
from slmctl.runtime.onnx import OnnxLM

console = Console()


def quantize_and_report(cfg, run, out: Path, model, source: Path | None, fp32_model: OnnxLM, fp32: dict):
    """({variant name: variant description}, the report written to quantization.json)."""
    prompts, texts, tokenizer = _prompts(cfg, model, source)
    variants, rows = {}, {}
    baseline = _measure(cfg, fp32_model, "fp32")
    task = _task_metric(cfg, fp32_model, tokenizer, source) if tokenizer is not None else None
    rows["fp32"] = {"mb": variant_mb(fp32), **baseline, **({"task": task} if task else {})}
    for method in cfg.quantize:
        if method == "int8":
            variant = quantize_int8(out, fp32, per_channel=cfg.int8.per_channel, reduce_range=cfg.int8.reduce_range)
        elif method == "int4":
            variant = quantize_int4(out, fp32, cfg.int4.block_size, cfg.int4.symmetric, cfg.int4.accuracy_level,
                                    cfg.int4.embeddings)
        else:
            feeds = record_feeds(fp32_model, prompts[: cfg.qdq.calibration_prompts], cfg.qdq.calibration_steps)
            variant = quantize_qdq(out, fp32, feeds, cfg.qdq.activation_type, cfg.qdq.weight_type, cfg.qdq.per_channel)
        variants[method] = variant
        spec = dict(fp32_model.spec, variants={"fp32": fp32, method: variant})
        quantized = OnnxLM(out, threads=cfg.threads, variant=method, spec=spec)
        agreement = token_agreement(fp32_model, quantized, prompts[: cfg.report.prompts], cfg.report.steps)
        row = {"mb": variant_mb(variant), **_measure(cfg, quantized, method), **agreement}
        if tokenizer is not None:
            row["task"] = _task_metric(cfg, quantized, tokenizer, source)
        rows[method] = row
        run.log(f"{method}: {row['mb']:.1f} MB, token agreement {agreement['token_agreement']:.3f}, "
                f"decode {row['decode_tok_s']:.1f} tok/s (fp32 {baseline['decode_tok_s']:.1f})")
    for row in rows.values():
        row["size_vs_fp32"] = row["mb"] / rows["fp32"]["mb"]
        row["decode_vs_fp32"] = row["decode_tok_s"] / rows["fp32"]["decode_tok_s"]
        row["first_token_vs_fp32"] = row["first_token_ms"] / rows["fp32"]["first_token_ms"]
    report = {"prompt_source": "task" if texts else "random", "speed_setting": dict(cfg.report), "variants": rows,
              "methods": {name: v["quantization"] for name, v in variants.items()}}
    console.print(_table(rows, task is not None))
    return variants, report


def _prompts(cfg, model, source: Path | None):
    """([1, L] prompt tensors, their texts or None, the tokenizer or None)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    count = max(cfg.report.prompts, cfg.qdq.calibration_prompts)
    if source is not None and (source / "tokenizer.json").is_file():
        from slmctl.data.tokenizer import TextTokenizer
        from slmctl.eval.tasks import load_task

        tokenizer = TextTokenizer.load(source)
        examples = load_task(cfg.task, count)
        texts = [e.source for e in examples]
        prompts = [torch.tensor([_encode(tokenizer, t, model.config)]) for t in texts]
        return prompts, texts, tokenizer
    lengths = torch.randint(8, 64, (count,), generator=generator).tolist()
    prompts = [torch.randint(4, model.config.vocab_size, (1, n), generator=generator) for n in lengths]
    return prompts, None, None


def _encode(tokenizer, text: str, config) -> list[int]:
    ids = tokenizer.encode(text)
    return ids if config.is_encoder_decoder else [tokenizer.bos_id, *ids]


def _measure(cfg, onnx_model: OnnxLM, name: str) -> dict:
    from slmctl.bench.measure import LoadedModel, measure

    loaded = LoadedModel(name, onnx_model, "encdec" if onnx_model.config.is_encoder_decoder else "deconly", onnx_model.load_s)
    input_len = cfg.report.input_len
    if onnx_model.is_static:
        input_len = min(input_len, onnx_model.graphs["static"]["prompt_len"])
    summary, _ = measure(loaded, "cpu", onnx_model.graphs["static"]["batch"] if onnx_model.is_static else 1, input_len,
                         cfg.report.output_len, cfg.report.repeat, 1, cfg.seed)
    return {"first_token_ms": summary["first_token_s"]["median"] * 1e3,
            "decode_tok_s": summary["decode_tokens_per_s"]["median"]}


def _task_metric(cfg, onnx_model: OnnxLM, tokenizer, source: Path) -> dict:
    from slmctl.eval import metrics as M
    from slmctl.eval.predict import predict
    from slmctl.eval.tasks import load_task
    from slmctl.runtime.generator import Generator

    examples = load_task(cfg.task, cfg.report.eval_limit)
    kind = "encdec" if onnx_model.config.is_encoder_decoder else "deconly"
    predictions = predict(Generator(onnx_model, tokenizer, kind, source), [e.source for e in examples],
                          batch_size=1 if onnx_model.is_static else 8, max_new_tokens=cfg.task.max_new_tokens)
    metric = next(m for m in cfg.task.metrics if m not in ("perplexity", "judge"))
    result = M.score_examples(predictions, [e.references for e in examples], [metric], n_resamples=200, seed=cfg.seed)[metric]
    return {"metric": metric, "value": result.value, "low": result.low, "high": result.high, "n": result.n}


def _table(rows: dict, with_task: bool) -> Table:
    table = Table(title="quantized vs fp32 (ONNX Runtime, same process)")
    columns = ["variant", "MB", "size", "first token ms", "decode tok/s", "decode x", "token agreement"]
    if with_task:
        columns.append(next(iter(rows.values()))["task"]["metric"])
    for column in columns:
        table.add_column(column)
    for name, row in rows.items():
        cells = [name, f"{row['mb']:.1f}", f"{row['size_vs_fp32']:.2f}x", f"{row['first_token_ms']:.1f}",
                 f"{row['decode_tok_s']:.1f}", f"{row['decode_vs_fp32']:.2f}x",
                 f"{row['token_agreement']:.3f}" if "token_agreement" in row else "-"]
        if with_task:
            cells.append(f"{row['task']['value']:.3f}")
        table.add_row(*cells)
    return table
