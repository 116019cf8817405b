"""One benchmark measurement: a model, a batch of random prompts, exactly N new tokens.

The prompts are seeded random token ids (no tokenisation in the timings); EOS is suppressed
(min_new_tokens = max_new_tokens) so every run decodes the same number of tokens. Each
configuration gets warm-up runs, then `repeat` timed runs; on CUDA the clock waits for the
device (synchronize) at every timestamp.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch

from slmctl.bench.timing import GenerationTiming, summarize, time_generation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str  # a preset name, or the run / directory name of a model path (+ :variant for an export)
    model: torch.nn.Module  # or an `OnnxLM`
    arch: str  # encdec | deconly
    load_s: float
    runtime: str = "torch"  # torch | onnx
    dtype: str = "float32"  # the weights: float32, bfloat16, float16, or an export's variant (int8, qdq)
    prepacked: bool = False  # PyTorch on the CPU: products on weights prepacked for oneDNN (slmctl.runtime.prepacked)


BENCH_KINDS = ("preset", "model_dir", "export")  # what bench measures (slmctl.refs kinds)


def load_for_bench(ref, runs_dir, device: str, dtype: str, seed: int = 0, runtime: str = "auto",
                   threads: int | None = None, ep: str | None = None, allow_fallback: bool = False,
                   prepacking: bool = True, training: bool = False) -> LoadedModel:
    """A preset name (random weights, so no checkpoint is needed), a model directory / run, or an
    ONNX export (`slmctl export onnx`; `EXPORT:int8` picks a variant), run by ONNX Runtime.
    `training`: a PyTorch model to train, never with prepacked (frozen) weights."""
    from slmctl.errors import ConfigError
    from slmctl.refs import resolve
    from slmctl.runtime.routes import onnx_route

    model_ref = resolve(ref, runs_dir, allow=BENCH_KINDS, purpose="bench")
    if model_ref.kind == "export" and runtime != "torch":
        return _load_export(model_ref, device, threads, ep, allow_fallback, prepacking)
    exported = onnx_route(model_ref, runs_dir, runtime, device) if ep is None and dtype == "float32" else None
    if exported is not None:  # a model directory that this CPU runs through ONNX Runtime (slmctl.runtime.routes)
        loaded = _load_export(exported, device, threads, None, False, prepacking)
        return replace(loaded, name=model_ref.label)
    if runtime == "onnx" or device == "npu" or ep is not None:
        raise ConfigError(f"{ref}: --runtime onnx / --device npu / --ep run ONNX exports (and model directories on the CPU, "
                          f"exported once); make one with `slmctl export onnx {ref}`")
    if model_ref.kind == "export":
        raise ConfigError(f"{ref} is an ONNX export; --runtime torch measures presets, model directories and runs")
    return _load_torch(model_ref, device, dtype, seed, pack=not training)


def _load_export(model_ref, device: str, threads: int | None, ep: str | None, allow_fallback: bool,
                 prepacking: bool = True) -> LoadedModel:
    from slmctl.runtime.onnx import open_export

    model = open_export(model_ref, device=device, threads=threads, ep=ep, allow_fallback=allow_fallback, prepacking=prepacking)
    arch = "encdec" if model.config.is_encoder_decoder else "deconly"
    return LoadedModel(model_ref.label, model, arch, model.load_s, "onnx", weights_dtype(model.graphs))


def weights_dtype(variant: dict) -> str:
    """What an export variant's weights are stored as (its bytes per weight in the bandwidth bound):
    int8 / int4 / qdq quantized, fp16, else float32 (fp32 and the optimized graphs)."""
    method = variant.get("quantization") or {}
    if method.get("method") == "static-qdq":
        return "qdq"
    if method.get("method") == "fp16":
        return "fp16"
    return method.get("weights") if method.get("weights") in ("int8", "int4") else "float32"


def _load_torch(model_ref, device: str, dtype: str, seed: int, pack: bool = True) -> LoadedModel:
    started = time.perf_counter()
    model = model_ref.load_torch(seed=seed)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    prepacked = False
    if device == "cpu" and pack:
        from slmctl.runtime.prepacked import pack_for_inference

        prepacked = pack_for_inference(model, say=lambda line: print(line, file=sys.stderr, flush=True))
    _sync(device)
    return LoadedModel(model_ref.label, model, "encdec" if model.config.is_encoder_decoder else "deconly",
                       time.perf_counter() - started, "torch", dtype, prepacked)


def random_prompts(vocab_size: int, batch: int, length: int, seed: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (batch, length), generator=generator).to(device)


def measure(loaded: LoadedModel, device: str, batch: int, input_len: int, output_len: int, repeat: int, warmup: int,
            seed: int = 0, image=None, drafter=None) -> tuple[dict, list[GenerationTiming]]:
    """(median / p90 / stdev summary, the timed samples) of generating `output_len` tokens. With
    `image` (a vision model), every prompt starts with an <image> placeholder for it; with a
    `drafter`, drafted tokens are checked several per pass (its stats: the timed runs')."""
    model = loaded.model
    prompts = random_prompts(model.config.vocab_size, batch, input_len, seed, model.device)
    vision = {}
    if image is not None:
        prompts[:, 0] = model.image_token_id
        vision = {"images": [[image] for _ in range(batch)]}

    def generate(on_token) -> int:
        count = 0

        def streamer(_tokens):
            nonlocal count
            _sync(device)
            count += 1
            on_token()

        drafting = {"drafter": drafter} if drafter is not None else {}
        model.generate(prompts, max_new_tokens=output_len, min_new_tokens=output_len, streamer=streamer, **vision, **drafting)
        _sync(device)
        if drafter is not None:
            passes.append(drafter.stats)
        return count

    passes = []
    for _ in range(warmup):
        generate(lambda: None)
    passes.clear()
    samples = [time_generation(generate) for _ in range(repeat)]
    summary = summarize(samples)
    if drafter is not None:  # per timed generation: passes, and the drafts they checked and kept
        total = {key: sum(getattr(s, key) for s in passes) for key in ("passes", "drafted", "accepted")}
        summary["draft_passes"] = total["passes"] / len(passes)
        summary["drafted_per_pass"] = total["drafted"] / max(1, total["passes"])
        summary["accepted_per_pass"] = total["accepted"] / max(1, total["passes"])
    return summary, samples


def implied_speedup(output_len: int, passes: float, accepted_per_pass: float, pass_cost: float) -> float:
    """The decode speed-up a drafter's passes imply at a pass cost of `pass_cost` steps: the `output_len - 1`
    tokens after the first take `passes` passes (each its own token plus the kept drafts) and a plain step
    for each token left, against a step per token without drafts."""
    plain_steps = max(0.0, output_len - 1 - passes * (1 + accepted_per_pass))
    return (output_len - 1) / (passes * pass_cost + plain_steps)


def _decoder_timer(model, device: str, batch: int, input_len: int, seed: int, capacity: int, repeat: int):
    """(a decoding session past its first step after `input_len` random prompt tokens, timed(call): the
    median seconds of `repeat` calls, the cache cut back after each so every call sees the same cache)."""
    session = model.start_decoding(random_prompts(model.config.vocab_size, batch, input_len, seed, model.device), None,
                                   capacity)
    session.first_logits()

    def timed(call) -> float:
        seconds = []
        for _ in range(repeat):
            cached = session.cached
            start = time.perf_counter()
            call()
            _sync(device)
            seconds.append(time.perf_counter() - start)
            session.cut(cached)
        return statistics.median(seconds)

    return session, timed


def pass_cost_ratio(loaded: LoadedModel, device: str, batch: int, input_len: int, tokens: int, seed: int = 0,
                    repeat: int = 9) -> float:
    """Median time of one decoder call over 1 + `tokens` tokens (a pass checking `tokens` drafts) over
    that of a 1-token step, after `input_len` prompt tokens: what a pass costs whatever the drafter finds."""
    model = loaded.model
    with torch.inference_mode():
        session, timed = _decoder_timer(model, device, batch, input_len, seed, tokens + 8, repeat)
        one = torch.full((batch,), 5, dtype=torch.long, device=model.device)
        many = torch.full((batch, tokens + 1), 5, dtype=torch.long, device=model.device)
        timed(lambda: session.step(one))  # warm up both shapes
        timed(lambda: session.verify(many))
        return timed(lambda: session.verify(many)) / timed(lambda: session.step(one))


def step_cost_ratio(draft_model, loaded: LoadedModel, device: str, batch: int, input_len: int, seed: int = 0,
                    repeat: int = 9) -> float:
    """Median time of a draft model's 1-token step over the target's, after the same `input_len` prompt
    tokens: what each drafted token costs, in target steps."""
    seconds = []
    with torch.inference_mode():
        for model in (draft_model, loaded.model):
            session, timed = _decoder_timer(model, device, batch, input_len, seed, 8, repeat)
            step = functools.partial(session.step, torch.full((batch,), 5, dtype=torch.long, device=model.device))
            timed(step)  # warm up
            seconds.append(timed(step))
    return seconds[0] / seconds[1]


def is_vision(model) -> bool:
    """A vision model, in torch (`VisionEncoderDecoderLM`) or exported (`OnnxLM` with vision.onnx)."""
    return getattr(model, "image_token_id", None) is not None


def time_vision(model, image, repeat: int) -> tuple[float, int]:
    """(median ms to turn one image into its tokens: tiling, tower, compression, projector,
    assembly; the image's token count)."""
    import statistics

    times, count = [], 0
    for _ in range(max(repeat, 1) + 1):  # the first call warms up
        started = time.perf_counter()
        with torch.inference_mode():
            if hasattr(model, "image_tokens"):
                count = model.image_tokens([image])[0].shape[0]
            else:
                ids = torch.tensor([[model.image_token_id]])
                count = model.prepare_images(ids, None, [[image]])[2].shape[0]
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) * 1e3, count




def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
