"""`slmctl export onnx|hf`: the graphs, their validation, quantized and fp16 variants, and the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from slmctl.config.choices import (
    ActivationType,
    DecoderCache,
    ExportDtype,
    ExportFormat,
    ExternalData,
    Fp16Policy,
    Optimization,
    Quantization,
    WeightType,
)
from slmctl.config.task import TaskSchema


@dataclass
class StaticShapeSchema:
    enabled: bool = False
    batch: int = 1
    prompt_len: int = 512  # prompts are right-padded to this length
    capacity: int = 128  # new tokens the cache holds


@dataclass
class ValidationSchema:
    prompt_lens: list = field(default_factory=lambda: [8, 33, 100])
    steps: int = 32  # greedy tokens compared per prompt
    batch: int = 2  # the last row is padded
    tolerance: float = 1e-4  # max |logit difference| (fp32)
    seed: Optional[int] = None  # null: fresh each export (recorded in validation.json)


@dataclass
class Int8Schema:
    per_channel: bool = True
    # 7-bit weights: CPUs without VNNI (AVX2 only) add u8 x s8 pairs in 16 bits, which 8-bit weights overflow
    # (logits off by a third of their scale on an AVX2 AMD EPYC); an export runs on CPUs other than the one that made it
    reduce_range: bool = True


@dataclass
class Fp16Schema:
    """The fp16 variant's overflow check and validation (slmctl.export.fp16)."""
    # nodes whose activations or weights reach fp16's max (65504) / margin: keep them in fp32, or fail the export
    policy: Fp16Policy = Fp16Policy.keep
    margin: float = 2.0
    calibration_prompts: int = 8  # prompts greedily generated through the fp32 graphs to measure every tensor's range
    calibration_steps: int = 16
    tolerance: float = 0.01  # max |fp16 - fp32 logit| over the largest |fp32 logit|, on the calibration prompts


@dataclass
class Int4Schema:
    """Weight-only block-wise int4 (ONNX Runtime's MatMulNBits)."""
    block_size: int = 32  # weights per scale along the input dimension (16, 32, 64, 128, ...)
    symmetric: bool = True  # false: a zero point per block too
    # MatMulNBits compute type: 1 fp32, 2 fp16, 3 bf16, 4 int8 (activations quantized per block in the kernel); null:
    # ONNX Runtime's default. 4: 1.54x the decode speed of the default at 330m on this CPU (docs/export.md)
    accuracy_level: Optional[int] = 4
    embeddings: bool = True  # the embedding tables too (GatherBlockQuantized); false: they stay fp32


@dataclass
class QdqSchema:
    """QNN HTP: activation_type=uint16 weight_type=uint8."""
    activation_type: ActivationType = ActivationType.uint8
    weight_type: WeightType = WeightType.int8
    per_channel: bool = True
    calibration_prompts: int = 16
    calibration_steps: int = 8


@dataclass
class QuantReportSchema:
    prompts: int = 32  # greedy token agreement over this many task prompts
    steps: int = 32
    eval_limit: int = 50  # task metric on this many examples (needs the model's tokenizer)
    input_len: int = 128  # speed: random prompt of this length, output_len new tokens, median of repeat runs
    output_len: int = 32
    repeat: int = 3


@dataclass
class ExportSchema:
    to: ExportFormat = ExportFormat.onnx  # the target format (the subcommand: slmctl export onnx|hf)
    source: Optional[str] = None  # the model: a model dir, a run or a preset; null: the newest distill/pretrain run
    # int8 (dynamic, weight MatMul/Gemm), int4 (weight-only MatMulNBits) and/or qdq (static QDQ, calibrated): --quantize int8
    quantize: List[Quantization] = field(default_factory=list)
    dtype: ExportDtype = ExportDtype.fp32  # fp16: also an fp16 variant (GPU / NPU providers), overflow-checked (--dtype fp16)
    optimize: Optimization = Optimization.none  # ort: also an ONNX Runtime-only variant with fused contrib ops (--optimize ort)
    fp16: Fp16Schema = field(default_factory=Fp16Schema)
    # the decoder's self-attention cache: grow = standard ONNX ops (any runtime); in_place = buffers ONNX Runtime's
    # GroupQueryAttention writes in place (ONNX Runtime only; no copy of the cache a step: long outputs, docs/export.md)
    cache: DecoderCache = DecoderCache.grow
    external_data: ExternalData = ExternalData.auto  # auto: weights in <graph>.onnx.data (memory-mapped) past 256 MB
    # --static: fixed shapes and a preallocated cache, for NPU runtimes (QNN HTP, OpenVINO NPU)
    static: StaticShapeSchema = field(default_factory=StaticShapeSchema)
    # PyTorch vs ONNX Runtime on fresh random prompts; a breach fails the run (exit 1)
    validation: ValidationSchema = field(default_factory=ValidationSchema)
    int8: Int8Schema = field(default_factory=Int8Schema)
    int4: Int4Schema = field(default_factory=Int4Schema)
    qdq: QdqSchema = field(default_factory=QdqSchema)
    report: QuantReportSchema = field(default_factory=QuantReportSchema)  # quantized vs fp32, measured in the same process
    threads: Optional[int] = None  # ONNX Runtime intra-op threads (null: its default)
    device: str = "cpu"  # set by --device
    ep: Optional[str] = None  # the execution provider validation runs the graphs on (null: the CPU's)
    seed: int = 0  # weights of a preset, prompts of the report
    task: TaskSchema = field(default_factory=TaskSchema)  # prompts for calibration and the quantized-vs-fp32 report
