"""`slmctl bench`: inference speed and memory (or `--train`: training steps) of models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from slmctl.config.choices import FloatDtype, RecordFormat, Runtime
from slmctl.config.training import TrainerOptionsSchema


@dataclass
class BenchSchema:
    models: list = field(default_factory=list)  # presets (random weights: 330m, deconly-330m, ...) or model directories / runs
    input_lens: list = field(default_factory=lambda: [512])
    output_lens: list = field(default_factory=lambda: [64])
    batch: list = field(default_factory=lambda: [1])
    repeat: int = 3  # timed runs per configuration (median / p90 / stdev reported); 0 with estimate
    warmup: int = 1
    # per configuration: none | prompt | a draft model (preset, model directory, run or export of the same vocabulary);
    # drafted decoding, docs/speed.md
    draft: list = field(default_factory=lambda: ["none"])
    draft_tokens: int = 10  # most tokens drafted per pass (K adapts below it)
    draft_ngram: int = 6  # prompt: the longest n-gram looked up (n down to 1)
    dtype: FloatDtype = FloatDtype.float32
    runtime: Runtime = Runtime.auto  # auto: ONNX Runtime for exports (slmctl export onnx), torch for the rest
    device: str = "cpu"  # set by --device
    ep: Optional[str] = None  # exports: ONNX Runtime execution provider (--ep; null: the device's)
    allow_fallback: bool = False  # --device npu: run even when nodes would fall back to the CPU provider
    prepacking: bool = True  # ONNX Runtime: packed copies of the weights for its GEMMs (false: less memory; docs/export.md)
    threads: Optional[int] = None  # torch threads (null: torch's default)
    format: Optional[RecordFormat] = None  # also print the records to stdout
    # a conf/hardware profile (this-cpu, a100, h100, ...): add roofline predictions; with repeat=0 a prediction only
    estimate: Optional[str] = None
    image_size: list = field(default_factory=lambda: [336, 336])  # vision models: the image (width, height) each prompt carries
    seed: int = 0
    resume: Optional[str] = None  # RUN or "latest": continue that (unfinished) run where it stopped
    # true: measure each model in a fresh child process (no allocator, thread-pool or cache state shared between models)
    isolate: bool = False
    # --train MODEL: time training steps (forward + backward + AdamW) instead of generation (slmctl.bench.training)
    train: bool = False
    source_len: int = 256  # train: encoder tokens per row (decoder-only: the sequence length)
    target_len: int = 64  # train: decoder tokens per row
    t5: bool = False  # train (--compare): also train transformers' T5 of matching dimensions, with ratios against it
    # train: the trainer options a training run would set (trainer.activation_checkpointing=true)
    trainer: TrainerOptionsSchema = field(default_factory=TrainerOptionsSchema)
