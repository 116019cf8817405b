"""The export stage: ONNX graphs of a model, validated against PyTorch, optionally quantized.

`run(cfg, run)` writes into `<run>/export/`:

    encoder.onnx, decoder.onnx     (model.onnx for the decoder-only baseline; --static: fixed shapes)
    int8/..., int4/..., qdq/...    quantized variants (--quantize)
    fp16/...                       the fp16 variant (--dtype fp16), overflow-checked: fp16.json
    ort/...                        fused ONNX Runtime contrib ops (--optimize ort): validation_ort.json
    tokenizer files, generation.json
    slmctl_onnx.json               the model config, special ids, every graph's inputs/outputs with
                                   shapes and dtypes, the variants, and the validation report
    validation.json, quantization.json     (validation.json: also where ONNX Runtime placed every node)

Validation is a gate: logits beyond the tolerance or any differing greedy token fails the
run (exit 1), and the graphs are not described as usable.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from slmctl.errors import ConfigError
from slmctl.export.onnx_export import OPSET, export_graphs, variant_mb
from slmctl.export.source import check_source, load_source
from slmctl.export.validate import ValidationFailed, validate
from slmctl.files import EXPORT_DIR
from slmctl.runtime.onnx import CONTRACT_VERSION, SPEC_FILE, OnnxLM
from slmctl.runtime.providers import placement_line

console = Console()
TOKENIZER_FILES = ("tokenizer.json", "slmctl_tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation.json")


def preflight(cfg, runs_dir) -> None:
    """Refused before the run exists: no model to export, one of a kind no format exports, or a cache
    layout the graphs cannot have."""
    if cfg.cache == "in_place" and cfg.static.enabled:
        raise ConfigError("cache=in_place is the dynamic decoder's; --static graphs have their own fixed cache")
    check_source(cfg, runs_dir)


def in_place_cache(cfg, encoder_decoder: bool) -> bool:
    """Whether the decoder writes its cache in place (cache=in_place); the decoder-only baseline keeps its graph."""
    return cfg.cache == "in_place" and encoder_decoder and not cfg.static.enabled


def run(cfg, run):
    if cfg.to == "hf":
        from slmctl.export import hf_export

        return hf_export.run(cfg, run)
    model, source = load_source(cfg, run)
    out = run.path / EXPORT_DIR
    out.mkdir(exist_ok=True)
    static = dict(batch=cfg.static.batch, prompt_len=cfg.static.prompt_len, capacity=cfg.static.capacity) if cfg.static.enabled else None
    started = time.perf_counter()
    fp32 = export_graphs(model, out, static=static, external_data=cfg.external_data,
                         in_place=in_place_cache(cfg, model.config.is_encoder_decoder))
    export_s = time.perf_counter() - started
    run.log(f"exported {', '.join(g['file'] for g in fp32['graphs'].values())} in {export_s:.1f} s "
            f"({variant_mb(fp32):.1f} MB)")
    spec = _spec(model, source, cfg, {"fp32": fp32})
    _copy_tokenizer(source, out)
    onnx_model = OnnxLM(out, threads=cfg.threads, spec=spec, ep=cfg.ep)
    run.log(f"validation graphs {placement_line(onnx_model.placement)}")
    report = _validate(cfg, model, onnx_model, static) | {"placement": onnx_model.placement}
    run.write_json("validation.json", report)
    _print_validation(report)
    if not report["passed"]:  # no slmctl_onnx.json: nothing describes these graphs as usable
        worst, cases = report["max_abs_logit_diff"], report["cases"]
        diverged = [c["prompt_len"] for c in cases if not c["greedy_identical"]]
        vision = report.get("vision_max_abs_diff")
        raise ValidationFailed(f"validation failed: max |logit diff| {worst:.3g} (tolerance {report['tolerance']:g})"
                               + (f", greedy tokens differ for prompt lengths {diverged}" if diverged else "")
                               + (f", vision graph max |diff| {vision:.3g}" if vision is not None else ""))
    spec["validation"] = {k: report[k] for k in ("passed", "max_abs_logit_diff", "tolerance", "greedy_identical")}
    quantized = {}
    if cfg.quantize:
        from slmctl.export.quality import quantize_and_report

        quantized, quality = quantize_and_report(cfg, run, out, model, source, onnx_model, fp32)
        run.write_json("quantization.json", quality)
    spec["variants"].update(quantized)
    if cfg.optimize == "ort":
        spec["variants"]["ort"] = _optimized(cfg, run, out, model, spec, onnx_model, fp32, static)
    if cfg.dtype == "fp16":
        from slmctl.export.fp16 import Fp16Overflow, export_fp16

        fp16, fp16_report = export_fp16(cfg, run, out, model, source, onnx_model, fp32)
        run.write_json("fp16.json", fp16_report)
        if fp16 is None:
            kept = [f"{row['node']} ({row['op']}, {row['layer']}, {row['max_abs']:.4g})"
                    for rows in fp16_report["blocked"].values() for row in rows]
            raise Fp16Overflow(f"fp16: {len(kept)} nodes reach {fp16_report['threshold']:.0f} (fp16's max / "
                               f"{cfg.fp16.margin:g}): {', '.join(kept[:8])}{', ...' if len(kept) > 8 else ''}; "
                               f"fp16.json has every layer; --fp16-policy keep keeps them in fp32")
        if not fp16_report["passed"]:
            check = fp16_report["validation"]
            raise ValidationFailed(f"fp16 validation failed: max |logit diff| {check['max_abs_logit_diff']:.3g} is "
                                   f"{check['relative_diff']:.2e} of the largest logit (tolerance {check['tolerance']:g})")
        spec["variants"]["fp16"] = fp16
    run.write_json(f"{EXPORT_DIR}/{SPEC_FILE}", spec)
    summary = {"graphs": len(fp32["graphs"]), "max_abs_logit_diff": f"{report['max_abs_logit_diff']:.2e}",
               "greedy_identical": report["greedy_identical"], "export_s": round(export_s, 1),
               "fp32_mb": round(variant_mb(fp32), 1)}
    for name, variant in quantized.items():
        summary[f"{name}_mb"] = round(variant_mb(variant), 1)
    for name in ("fp16", "ort"):
        if name in spec["variants"]:
            summary[f"{name}_mb"] = round(variant_mb(spec["variants"][name]), 1)
    run.succeed(summary)
    return run


def _optimized(cfg, run, out: Path, model, spec: dict, fp32_model, fp32: dict, static) -> dict:
    """The `--optimize ort` variant, validated against the fp32 graphs (validation_ort.json)."""
    from slmctl.export.ort_optimize import optimize_ort

    variant = optimize_ort(out, fp32)
    optimized = OnnxLM(out, threads=cfg.threads, variant="ort", spec=dict(spec, variants={"fp32": fp32, "ort": variant}))
    report = _validate(cfg, fp32_model, optimized, static)
    run.write_json("validation_ort.json", report)
    fused = "; ".join(f"{role}: " + ", ".join(f"{op} x{n}" for op, n in ops.items())
                      for role, ops in variant["quantization"]["fused"].items())
    run.log(f"ort: {fused}; against fp32: max |logit diff| {report['max_abs_logit_diff']:.2e}, "
            f"greedy identical {report['greedy_identical']}")
    if not report["passed"]:
        raise ValidationFailed(f"the --optimize ort graphs differ from the fp32 graphs: max |logit diff| "
                               f"{report['max_abs_logit_diff']:.3g} (tolerance {report['tolerance']:g})")
    return variant


def _spec(model, source: Path | None, cfg, variants: dict) -> dict:
    import onnx
    import onnxruntime

    c = model.config
    return {
        "format": "slmctl-onnx", "version": CONTRACT_VERSION, "opset": OPSET,
        "architecture": "encoder-decoder" if c.is_encoder_decoder else "decoder-only",
        "model": c.to_dict(), "parameters": model.num_parameters(),
        "special_tokens": {"pad": c.pad_token_id, "bos": c.bos_token_id, "eos": c.eos_token_id,
                           "decoder_start": c.bos_token_id if c.is_encoder_decoder else None},
        "tokenizer": "tokenizer.json" if source is not None and (source / "tokenizer.json").is_file() else None,
        "source": str(source) if source is not None else f"preset {cfg.source} (random weights, seed {cfg.seed})",
        "default_variant": "fp32",
        "variants": variants,
        "how_to_run": _how_to_run(c),
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _how_to_run(c) -> list[str]:
    if c.is_encoder_decoder:
        return ["encoder: input_ids, attention_mask (int64, 1 = token) -> encoder_hidden_states, cross.{i}.key/value",
                "decoder, step 1: input_ids = [[decoder_start]] per row, positions = 0, past_key_values.{i}.* of "
                "length 0 (\"cache\": \"in_place\": zero buffers [B, KV, capacity, d], capacity >= the steps), "
                "cross.{i}.* and encoder_attention_mask from the encoder",
                "decoder, step n: the chosen token, positions = n - 1; past_key_values.{i}.* = the previous step's "
                "present.{i}.* (in place: bind each present to its past's buffer and feed the same buffers)",
                "static graphs: past_key_values.{i}.* are [B, KV, capacity, d] buffers; feed position = tokens so far "
                "and write present.{i}.* (the step's key/value) into the buffers at that position"]
    return ["model: input_ids (the prompt, left-padded, then one token a step), attention_mask over past + new "
            "tokens (0 = padding), past_key_values.{i}.* (length 0 first) -> logits of the last token, present.{i}.*"]


def _copy_tokenizer(source: Path | None, out: Path) -> None:
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)


def _validate(cfg, model, onnx_model, static) -> dict:
    lens = [int(n) for n in cfg.validation.prompt_lens]
    if static:
        lens = sorted({min(n, static["prompt_len"]) for n in lens})
    seed = cfg.validation.seed if cfg.validation.seed is not None else int.from_bytes(os.urandom(4), "little")
    steps = cfg.validation.steps if not static else min(cfg.validation.steps, static["capacity"])
    batch = static["batch"] if static else cfg.validation.batch
    if onnx_model.is_vision:
        from slmctl.export.validate import validate_vision

        return validate_vision(model, onnx_model, lens, steps, batch, cfg.validation.tolerance, seed)
    return validate(model, onnx_model, lens, steps, batch, cfg.validation.tolerance, seed)


def _print_validation(report: dict) -> None:
    table = Table(title=f"validation: ONNX Runtime vs PyTorch (seed {report['seed']})")
    for column in ("prompt len", "batch", "steps", "max |logit diff|", "greedy identical"):
        table.add_column(column)
    for case in report["cases"]:
        table.add_row(str(case["prompt_len"]), str(case["batch"]), str(case["steps"]), f"{case['max_abs_logit_diff']:.2e}",
                      "yes" if case["greedy_identical"] else f"no (step {case['first_divergence']})")
    console.print(table)
    verdict = "[green]passed[/green]" if report["passed"] else "[bold red]FAILED[/bold red]"
    console.print(f"validation {verdict}: max |logit diff| {report['max_abs_logit_diff']:.2e} <= {report['tolerance']:g} "
                  f"and identical greedy tokens", highlight=False)
