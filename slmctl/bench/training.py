"""`slmctl bench --train MODEL`: how fast a model trains, per batch size, in tokens/s and MFU.

One training step = forward (teacher-forced, the model's own loss) + backward + an AdamW step
(the optimiser and parameter groups every training stage uses, slmctl.train.optim) + zeroing
the gradients; no gradient clipping, no data loading (one seeded random batch of B rows of S
encoder + T decoder tokens, no padding; decoder-only: B rows of S tokens). `warmup` untimed
steps, then `repeat` timed steps; the record holds their median (and every sample).

MFU (model FLOPs utilisation) = `slmctl.model.flops.training_step_flops` / median step time /
the device's peak FLOP/s (`slmctl.runtime.hardware.device_peak_flops`: on the CPU a matmul
measured just before the model's timed steps, with the same threads; on CUDA the GPU's
conf/hardware profile). Peak memory: the process's resident high-water mark (CPU) or
torch.cuda.max_memory_allocated (CUDA), from just before the optimiser is built to the last
step, so it holds weights, gradients, AdamW's two moments and the activations of a step.

`trainer.activation_checkpointing=true` applies that training option (slmctl.train.trainer_options)
to every model measured (T5 included: its own gradient checkpointing).

With `t5=true` (`--compare`) Hugging Face `T5ForConditionalGeneration` of matching dimensions
(slmctl.bench.t5_baseline.build_t5) goes through the same steps on the same batch after our
model, which is freed first; the comparison is our tokens/s over T5's.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
from omegaconf import OmegaConf

from slmctl.bench.measure import BENCH_KINDS, DTYPES, load_for_bench
from slmctl.config.training import OptimSchema
from slmctl.errors import ConfigError
from slmctl.model import flops
from slmctl.refs import parse
from slmctl.runtime.hardware import peak_memory_mb, reset_peak_memory

T5_NAME = "transformers T5"


def measure(cfg, run, shown) -> list[dict]:
    """Every record of `cfg` (one model, `cfg.batch` sizes, our model then T5 per size)."""
    if len(cfg.models) != 1:
        raise ConfigError(f"bench --train times one model, got {len(cfg.models)}: {' '.join(map(str, cfg.models))}")
    if cfg.estimate or cfg.isolate or cfg.runtime == "onnx" or cfg.device == "npu":
        raise ConfigError("bench --train times PyTorch training steps: --estimate, --isolate, --runtime onnx and "
                          "--device npu are for generation benchmarks")
    ref = cfg.models[0]
    parse(ref, run.runs_dir).require(BENCH_KINDS, "bench").record_input(run, role="model")
    records = []
    for batch in cfg.batch:
        loaded = load_for_bench(ref, run.runs_dir, cfg.device, "float32", cfg.seed, runtime="torch", training=True)
        model = loaded.model
        from slmctl.model.base import LanguageModel

        if not isinstance(model, LanguageModel):
            raise ConfigError(f"{ref}: bench --train times slmctl's text models (presets, model directories), "
                              f"not {type(model).__name__}")
        config = model.config
        records.append(time_training(cfg, loaded.name, loaded.arch, "torch", model, config, batch))
        shown.print(_line(records[-1]), highlight=False)
        del model, loaded
        gc.collect()
        if cfg.t5:
            if not config.is_encoder_decoder:
                raise ConfigError(f"--compare trains T5, an encoder-decoder, beside {ref}: give an encoder-decoder model")
            from slmctl.bench.t5_baseline import build_t5, t5_flop_config

            torch.manual_seed(cfg.seed)
            t5 = build_t5(config).to(cfg.device)
            records.append(time_training(cfg, T5_NAME, "encdec", "transformers", t5, t5_flop_config(config), batch))
            shown.print(_line(records[-1]), highlight=False)
            del t5
            gc.collect()
    return records


def training_batch(config, batch: int, source_len: int, target_len: int, seed: int, device) -> dict:
    """Seeded random token ids (no padding): encoder-decoder (ours and T5): input_ids [B, S] and
    labels [B, T] (each model shifts the labels right into its decoder input); decoder-only:
    input_ids = labels [B, S]."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.vocab_size, (batch, source_len), generator=generator).to(device)
    if not config.is_encoder_decoder:
        return {"input_ids": ids, "labels": ids}
    labels = torch.randint(4, config.vocab_size, (batch, target_len), generator=generator).to(device)
    return {"input_ids": ids, "labels": labels}


def time_training(cfg, name: str, arch: str, runtime: str, model: torch.nn.Module, flop_config, batch: int) -> dict:
    """One record: `cfg.warmup` untimed then `cfg.repeat` timed training steps of `model`."""
    from slmctl.runtime.hardware import device_peak_flops
    from slmctl.train.optim import adamw_with_schedule, decay_groups
    from slmctl.train.trainer_options import apply_trainer_options

    device, S, T = cfg.device, cfg.source_len, cfg.target_len
    encdec = flop_config.is_encoder_decoder
    T = T if encdec else 0
    model.train()
    options = {k: bool(v) for k, v in cfg.trainer.items()}
    apply_trainer_options(model, options, lambda message: None)
    data = training_batch(flop_config, batch, S, T, cfg.seed, device)
    mixed = cfg.dtype != "float32"  # weights stay fp32, matmuls in bf16/fp16 (the trainer's *-mixed precision)
    gc.collect()
    reset_peak_memory(device)
    optimizer = adamw_with_schedule(decay_groups(model, OptimSchema.weight_decay), OmegaConf.structured(OptimSchema),
                                    cfg.warmup + cfg.repeat, fused=True)["optimizer"]  # as training does

    def step() -> float:
        started = time.perf_counter()
        with torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=DTYPES[cfg.dtype], enabled=mixed):
            loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for _ in range(cfg.warmup):
        step()
    peak, peak_source = device_peak_flops(device, cfg.dtype)  # just before the timed steps: the machine as it is now
    samples = [step() for _ in range(cfg.repeat)]
    memory = peak_memory_mb(device)
    optimizer.zero_grad(set_to_none=True)  # (the optimizer's state goes with this function's frame)
    median = statistics.median(samples)
    step_flops = flops.training_step_flops(flop_config, S, T, batch)
    tokens = batch * (S + T)
    target_tokens = batch * (T if encdec else S - 1)
    return {
        "model": name, "arch": arch, "device": device, "runtime": runtime, "dtype": cfg.dtype, "batch": batch,
        "source_len": S, "target_len": T if encdec else None, "step_ms": median * 1e3,
        "step_ms_stdev": (statistics.stdev(samples) if len(samples) > 1 else 0.0) * 1e3,
        "tokens_per_s": tokens / median, "target_tokens_per_s": target_tokens / median,
        "mfu": step_flops / median / peak if peak else None, "peak_mem_mb": memory,
        "params": sum(p.numel() for p in model.parameters()), "flops_per_step": step_flops, "peak_flops": peak,
        "activation_checkpointing": options["activation_checkpointing"],
        "step_ms_min": min(samples) * 1e3, "peak_source": peak_source, "warmup": cfg.warmup, "steps": cfg.repeat,
        "samples": samples,
    }


def _line(r: dict) -> str:
    mfu = f"{r['mfu']:.0%} MFU" if r["mfu"] is not None else "MFU -"
    return (f"{r['model']} train b{r['batch']} S{r['source_len']} T{r['target_len'] or '-'}: {r['step_ms']:.0f} ms/step, "
            f"{r['tokens_per_s']:.0f} tokens/s, {mfu}, peak {r['peak_mem_mb']:.0f} MB")
