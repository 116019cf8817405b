"""Our encoder-decoder against Hugging Face `T5ForConditionalGeneration` of matching size.

    python -m slmctl.bench.t5_baseline --preset 330m --prompt-len 512 --new-tokens 128 --threads 2 [--onnx]

Both models get random weights, fp32, batch 1, greedy decoding of exactly
`--new-tokens` tokens (EOS suppressed), the same thread count, a warm-up run and
`--repeat` timed runs in the same process. `--onnx` adds our model exported to ONNX
(the same weights, exported in a child process) and run by slmctl's ONNX Runtime generator
after the PyTorch and T5 rounds. T5 is built with the preset's dimensions
(d_model, d_ff, heads of 64, encoder/decoder layers, `gelu_new` MLP, tied
embeddings). Also reported: the memory-bandwidth bound on decoding, i.e. bytes of
decoder + LM-head weights read per token over the measured read bandwidth.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from slmctl.bench.timing import summarize, time_generation
from slmctl.model import build_model
from slmctl.model.base import LanguageModel
from slmctl.model.config import ModelConfig
from slmctl.runtime.hardware import measure_read_bandwidth


def decoder_weight_bytes(model: LanguageModel) -> int:
    """Bytes of weights one decode step reads: the decoder stack (without the cross-attention
    K/V projections, which run once per prompt), its final norm and the tied LM head."""
    if model.config.is_encoder_decoder:
        params = [p for n, p in model.decoder.named_parameters() if ".cross_attn.kv." not in n]
    else:
        params = list(model.layers.parameters()) + list(model.norm.parameters())
    params.append(model.embed.weight)
    return sum(p.numel() * p.element_size() for p in params)


def build_t5(model: LanguageModel | ModelConfig):
    """Hugging Face T5 with a model's (or a ModelConfig's) dimensions, random weights, eval mode."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = model if isinstance(model, ModelConfig) else model.config
    t5_config = T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff, num_heads=cfg.n_heads,
        num_layers=cfg.n_encoder_layers, num_decoder_layers=cfg.n_decoder_layers, feed_forward_proj="gelu_new",
        tie_word_embeddings=True, dropout_rate=0.0, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.pad_token_id,
    )
    return T5ForConditionalGeneration(t5_config).eval()


def t5_flop_config(cfg: ModelConfig) -> ModelConfig:
    """The ModelConfig whose FLOP count (slmctl.model.flops) is `build_t5(cfg)`'s: T5 has full-width
    keys and values (one key/value head per query head, no grouped-query attention); its missing
    biases and its relative position bias are not counted by those conventions anyway."""
    return cfg.replace(n_kv_heads=cfg.n_heads)


class _TokenClock:
    """A transformers streamer that calls `on_token` for every generated token (its first
    `put` is the decoder start token, not a generated one)."""

    def __init__(self, on_token):
        self.on_token, self.started = on_token, False

    def put(self, value):
        if self.started:
            self.on_token()
        self.started = True

    def end(self):
        pass


def run_ours(model, prompt, new_tokens):
    def run(on_token):
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=lambda _: on_token())
        return out.shape[1]
    return run


def run_t5(t5, prompt, new_tokens):
    def run(on_token):
        with torch.no_grad():
            out = t5.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, num_beams=1, streamer=_TokenClock(on_token))
        return out.shape[1] - 1  # minus the decoder start token
    return run


def export_in_subprocess(preset: str, directory: Path) -> None:
    """Export the preset's model (seed 0, the weights `main` builds) in a child process: tracing
    and ONNX Runtime change how this process's allocator behaves (glibc raises its mmap threshold
    after large frees), which would change the PyTorch and T5 timings measured here."""
    code = ("import torch; from pathlib import Path; from slmctl.model import build_model; "
            "from slmctl.export.onnx_export import export_graphs; import json, sys; torch.manual_seed(0); "
            f"m = build_model({preset!r}).eval(); v = export_graphs(m, Path({str(directory)!r})); "
            "json.dump({'model': m.config.to_dict(), 'parameters': m.num_parameters(), 'default_variant': 'fp32', "
            f"'variants': {{'fp32': v}}}}, open(Path({str(directory)!r}) / 'spec.json', 'w'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def run_onnx(directory: Path, prompt, new_tokens, threads: int):
    """The exported graphs on slmctl's ONNX Runtime generator."""
    from slmctl.runtime.onnx import OnnxLM

    spec = json.loads((directory / "spec.json").read_text())
    return run_ours(OnnxLM(directory, threads=threads, spec=spec), prompt, new_tokens)


def time_runners(runners: dict, repeat: int) -> dict:
    """label -> timing summary; one warm-up each, then `repeat` rounds interleaved so drifts in
    machine speed hit every runner alike."""
    timings = {label: [] for label in runners}
    for runner in runners.values():
        time_generation(runner)
    for _ in range(repeat):
        for label, runner in runners.items():
            timings[label].append(time_generation(runner))
    return {label: summarize(timings[label]) for label in runners}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="330m")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--onnx", action="store_true", help="also time the model exported to ONNX, on ONNX Runtime")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console()
    ours = build_model(args.preset).eval()
    t5 = build_t5(ours)
    prompt = torch.randint(3, ours.config.vocab_size, (1, args.prompt_len))
    runners = {"slmctl": run_ours(ours, prompt, args.new_tokens), "transformers T5": run_t5(t5, prompt, args.new_tokens)}
    with tempfile.TemporaryDirectory() as exported:
        if args.onnx:  # exported before any timing, loaded only after PyTorch and T5 are timed
            with console.status("exporting to ONNX (in a child process)"):
                export_in_subprocess(args.preset, Path(exported))
        with console.status("timing"):
            results = time_runners(runners, args.repeat)
            if args.onnx:
                ort = run_onnx(Path(exported), prompt, args.new_tokens, args.threads)
                results.update(time_runners({"slmctl ONNX Runtime": ort}, args.repeat))
    for label in results:
        results[label]["parameters"] = sum(p.numel() for p in t5.parameters()) if label == "transformers T5" else ours.num_parameters()

    bandwidth = measure_read_bandwidth()
    weight_bytes = decoder_weight_bytes(ours)
    bound = bandwidth / weight_bytes
    mine, theirs = results["slmctl"], results["transformers T5"]
    summary = {
        "preset": args.preset, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": args.threads,
        "dtype": "float32", "batch": 1, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "read_bandwidth_gb_s": bandwidth / 1e9, "decoder_weight_bytes_per_token": weight_bytes,
        "bandwidth_bound_tokens_per_s": bound,
        "decode_fraction_of_bound": mine["decode_tokens_per_s"]["median"] / bound,
        "decode_speedup_vs_t5": mine["decode_tokens_per_s"]["median"] / theirs["decode_tokens_per_s"]["median"],
        "first_token_ratio_vs_t5": mine["first_token_s"]["median"] / theirs["first_token_s"]["median"],
        "results": results,
    }
    if args.onnx:
        ort = results["slmctl ONNX Runtime"]
        summary["onnx"] = {
            "decode_fraction_of_bound": ort["decode_tokens_per_s"]["median"] / bound,
            "decode_speedup_vs_t5": ort["decode_tokens_per_s"]["median"] / theirs["decode_tokens_per_s"]["median"],
            "first_token_ratio_vs_t5": ort["first_token_s"]["median"] / theirs["first_token_s"]["median"],
        }

    table = Table(title=f"{args.preset}, fp32, {args.threads} threads, batch 1, {args.prompt_len} -> {args.new_tokens} tokens, greedy")
    for column in ("model", "parameters", "first token (ms)", "decode (tokens/s)", "total (s)"):
        table.add_column(column, justify="right")
    for label, r in results.items():
        table.add_row(label, f"{r['parameters'] / 1e6:.1f}M", f"{r['first_token_s']['median'] * 1000:.0f}",
                      f"{r['decode_tokens_per_s']['median']:.1f}", f"{r['total_s']['median']:.2f}")
    console.print(table)
    console.print(f"decode speed-up vs T5: {summary['decode_speedup_vs_t5']:.2f}x   "
                  f"first-token latency vs T5: {summary['first_token_ratio_vs_t5']:.2f}x")
    if args.onnx:
        console.print(f"ONNX Runtime: decode {summary['onnx']['decode_speedup_vs_t5']:.2f}x T5, first token "
                      f"{summary['onnx']['first_token_ratio_vs_t5']:.2f}x, {summary['onnx']['decode_fraction_of_bound']:.0%} of the bound")
    console.print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {weight_bytes / 1e6:.0f} MB of weights per token -> "
                  f"bound {bound:.1f} tokens/s; achieved {summary['decode_fraction_of_bound']:.0%} of it")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
