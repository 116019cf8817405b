"""`slmctl eval`: models (or another system's predictions) scored on tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from slmctl.config.choices import FloatDtype, Runtime
from slmctl.config.task import GenerationSchema, JudgeSchema, TaskSchema


@dataclass
class EvalSchema:
    models: list = field(default_factory=list)  # set from the command line: slmctl eval MODEL [MODEL ...]
    tasks: list = field(default_factory=list)  # several tasks in one run, each with its defaults; empty: the `task` group's choice
    predictions: Optional[str] = None  # a jsonl of {id, prediction} to score instead of models (--predictions)
    resume: Optional[str] = None  # RUN or "latest": continue that (unfinished) run where it stopped
    limit: Optional[int] = None  # only the first N examples (quick checks)
    batch_size: int = 16
    max_source_len: int = 1024  # prompt tokens kept (encoder-decoder: the first; decoder-only: the last)
    bootstrap: int = 1000  # resamples for the 95% confidence intervals
    # paired comparisons on the same examples, as [model, baseline] positions in `models` ([[2,3]]: the third against
    # the fourth); empty: with two or more models, each against the last
    pairs: list = field(default_factory=list)
    seed: int = 0
    device: str = "cpu"  # set by --device
    # auto: ONNX Runtime for exports, torch for the rest, except model directories this CPU runs faster on ONNX Runtime
    # (docs/speed.md, "The runtime per CPU"); torch: model directories on PyTorch; onnx: exports, and model directories' exports
    runtime: Runtime = Runtime.auto
    dtype: FloatDtype = FloatDtype.float32  # what PyTorch computes in (--dtype; bfloat16 where the CPU has it: docs/speed.md)
    ep: Optional[str] = None  # exports: ONNX Runtime execution provider (--ep; null: the device's)
    allow_fallback: bool = False  # --device npu: run even when nodes would fall back to the CPU provider
    generation: GenerationSchema = field(default_factory=GenerationSchema)
    task: TaskSchema = field(default_factory=TaskSchema)
    judge: JudgeSchema = field(default_factory=JudgeSchema)
