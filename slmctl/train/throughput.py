"""Training throughput, measured in every training run (`fit` adds the callback).

Per training step (each micro-batch), from timestamps at `on_train_batch_start` (the batch has
arrived, on its device) and `on_train_batch_end` (forward, backward and, at the end of an
accumulation, the optimizer step are done):

* compute = start -> end of the step; data wait = end of the previous step -> start of this
  one (fetching and collating the batch, moving it to the device, the loop's own bookkeeping)
  less the time of any validation pass and periodic checkpoint save in that gap (timed by the
  validation hooks and around the checkpoint callback's save, `exclude_from_wait`), which is
  neither training nor waiting for data;
* `tokens_per_s`: input + target token positions of the batch (encoder-decoder: B x (S + T);
  decoder-only: B x L; padding included, as it is computed) over compute + wait, times the
  number of processes (DDP ranks step together); `target_tokens_per_s`: the tokens the loss is
  taken over (labels != -100), likewise;
* `mfu`: `slmctl.model.flops.training_step_flops` of the batch's shape (3 x forward; the
  student only in distillation, not the teacher; image tokens and the vision tower not
  counted; a Hugging Face model: 6 x parameters per token) over compute + wait, over the
  device's peak (`slmctl.runtime.hardware.device_peak_flops`: on CPU an fp32 (or the precision's
  dtype) matmul timed once per run with the training threads; on CUDA the GPU's
  conf/hardware profile);
* `data_wait_fraction`: wait / (compute + wait).

These four are logged like `train_loss` (at `trainer.log_every_n_steps`); `throughput(run)`
sums every fit of the run after each fit's first `WARMUP_STEPS` measured steps (totals:
tokens over seconds, so a slow step weighs what it cost) into the run summary's `throughput`
entry, with `peak_memory_mb` (the process's resident high-water mark on CPU,
torch.cuda.max_memory_allocated on CUDA, from the start of training).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from lightning.pytorch.callbacks import Callback

WARMUP_STEPS = 5  # measured steps of each fit left out of the summary (first allocations, lazy init); at most half


@dataclass
class _Step:
    tokens: int  # input + target positions
    target_tokens: int
    flops: float
    seconds: float  # compute + data wait
    wait: float


@dataclass
class _RunThroughput:
    peak_flops: float | None = None
    peak_source: str = ""
    fits: list[list[_Step]] = field(default_factory=list)
    peak_memory_mb: float = 0.0


_RUNS: dict[str, _RunThroughput] = {}  # run directory -> what this process measured in it


def _of(run) -> _RunThroughput:
    return _RUNS.setdefault(str(run.path), _RunThroughput())


def precision_dtype(precision) -> str:
    """The dtype a Lightning precision setting runs matmuls in: bf16-mixed -> bfloat16, ..."""
    text = str(precision)
    if text.startswith("bf16"):
        return "bfloat16"
    if text.startswith("16"):
        return "float16"
    return "float32"


def step_flops_function(model: torch.nn.Module):
    """(B, S, T) -> FLOPs of one training step of `model` (T = 0 for a decoder-only model)."""
    from slmctl.model.config import ModelConfig
    from slmctl.model.flops import training_step_flops

    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        return lambda B, S, T: training_step_flops(config, S, T, B)
    parameters = sum(p.numel() for p in model.parameters())  # a Hugging Face model: 2 x params per token, forward
    return lambda B, S, T: 3 * 2 * parameters * B * (S + T)


def batch_shape(batch: dict, encoder_decoder: bool) -> tuple[int, int, int, int]:
    """(B, S, T, target tokens) of a training batch (T = 0 for a decoder-only model)."""
    ids, labels = batch["input_ids"], batch["labels"]
    B, S = ids.shape[0], ids.shape[1]
    if encoder_decoder:
        return B, S, labels.shape[1], int((labels != -100).sum())
    return B, S, 0, int((labels[:, 1:] != -100).sum())


class Throughput(Callback):
    """Times every training step of a fit; see the module docstring."""

    def __init__(self, run, precision="32-true"):
        self.run, self.dtype = run, precision_dtype(precision)
        self.steps: list[_Step] = []
        self._start = self._end = self._wait = None
        self._excluded = 0.0  # seconds of the current gap spent validating or saving a checkpoint

    # -- the fit -----------------------------------------------------------------

    def on_train_start(self, trainer, pl_module):
        from slmctl.runtime.hardware import reset_peak_memory

        model = pl_module.model
        config = getattr(model, "config", None)
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.flops = step_flops_function(model)
        self.device = trainer.strategy.root_device.type
        self.world_size = trainer.world_size
        state = _of(self.run)
        if not state.fits:  # the first fit of this run in this process: measure the device's peak once
            from slmctl.runtime.hardware import device_peak_flops

            state.peak_flops, state.peak_source = device_peak_flops(self.device, self.dtype)
            self.run.log(f"throughput: peak {state.peak_flops / 1e9:.1f} GFLOP/s ({state.peak_source})"
                         if state.peak_flops else f"throughput: MFU not measured ({state.peak_source})")
        self.steps = []
        state.fits.append(self.steps)
        reset_peak_memory(self.device)
        self._end, self._excluded = None, 0.0

    def on_train_end(self, trainer, pl_module):
        from slmctl.runtime.hardware import peak_memory_mb

        state = _of(self.run)
        state.peak_memory_mb = max(state.peak_memory_mb, peak_memory_mb(self.device))

    # -- each step ---------------------------------------------------------------

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()
        self._wait = None if self._end is None else max(0.0, self._start - self._end - self._excluded)
        self._shape = batch_shape(batch, self.encoder_decoder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        self._end, self._excluded, wait = end, 0.0, self._wait
        if wait is None:  # the first step of the fit: nothing before it to time
            return
        seconds = end - self._start + wait
        B, S, T, targets = self._shape
        step = _Step(tokens=B * (S + T) * self.world_size, target_tokens=targets * self.world_size,
                     flops=self.flops(B, S, T), seconds=seconds, wait=wait)
        self.steps.append(step)
        peak = _of(self.run).peak_flops
        pl_module.log("tokens_per_s", step.tokens / seconds, on_step=True, on_epoch=False)
        pl_module.log("target_tokens_per_s", step.target_tokens / seconds, on_step=True, on_epoch=False)
        if peak:
            pl_module.log("mfu", step.flops / seconds / peak, on_step=True, on_epoch=False)
        pl_module.log("data_wait_fraction", wait / seconds, on_step=True, on_epoch=False)

    # -- what is not waiting for data --------------------------------------------

    def on_validation_start(self, trainer, pl_module):
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        self._excluded += time.perf_counter() - self._validation_started

    def exclude_from_wait(self, callback: Callback) -> Callback:
        """`callback` (the periodic ModelCheckpoint) with the time of its on_train_batch_end,
        where it saves after the step, left out of the data wait (wrapped on the instance, so its
        class and its state in checkpoints stay as they are)."""
        hook = callback.on_train_batch_end

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self._excluded += time.perf_counter() - started

        callback.on_train_batch_end = timed
        return callback


def throughput(run) -> dict:
    """{"throughput": {tokens_per_s, target_tokens_per_s, mfu, data_wait_fraction, peak_memory_mb,
    steps}} over every fit this process ran in `run` (each fit's warm-up left out); None values
    when no step was measured (e.g. a resumed run whose training had already finished). Every
    training stage adds this to the summary it passes to `run.succeed`."""
    state = _RUNS.pop(str(run.path), _RunThroughput())
    counted = [s for fit in state.fits for s in fit[min(WARMUP_STEPS, len(fit) // 2):]]
    seconds = sum(s.seconds for s in counted)
    if not counted or seconds <= 0:
        return {"throughput": {"tokens_per_s": None, "target_tokens_per_s": None, "mfu": None,
                               "data_wait_fraction": None, "peak_memory_mb": None, "steps": 0}}
    flops = sum(s.flops for s in counted)
    return {"throughput": {
        "tokens_per_s": round(sum(s.tokens for s in counted) / seconds, 1),
        "target_tokens_per_s": round(sum(s.target_tokens for s in counted) / seconds, 1),
        "mfu": round(flops / seconds / state.peak_flops, 4) if state.peak_flops else None,
        "data_wait_fraction": round(sum(s.wait for s in counted) / seconds, 4),
        "peak_memory_mb": round(state.peak_memory_mb, 1),
        "steps": len(counted),
    }}
