"""PyTorch's routes to a weight-only int8 / int4 product on the CPU, for the weight-kernel probe.

`slmctl.bench.kernels` times a chain of distinct weights through each route; this module builds
the chains. Each route takes fp32 weights in nn.Linear's [out, in] layout and returns
`(chain, weight_bytes)`: `chain(x)` runs x [M, in] through every weight in turn, and
`weight_bytes` is what the chain's weights occupy (packed data + scales / zeros), the bytes a
product must read at least once.

- `torch`: PyTorch's packed CPU kernels, eager. fp32 `F.linear`; int8 `torch._weight_int8pack_mm`
  (int8 [out, in], scales per output channel); int4 `aten._weight_int4pack_mm_for_cpu` on
  `aten._convert_weight_to_int4pack_for_cpu` (asymmetric, groups of 32 inputs). Both ops insist
  on scales (and zeros) in the activation's dtype: fp32 here, as the export decodes in fp32.
- `torch-bf16`: the same kernels with bf16 activations and scales / zeros (fp32 rows: bf16
  weights and `F.linear`). On an AVX2 CPU (torch 2.13) the fp32 kernels run a scalar path, the
  bf16 ones a vectorised one, ~10x faster; bf16 activations change the model's numerics.
- `compile`: `torch.compile` (inductor's C++ codegen) of x @ dequant(W) written as a broadcast
  multiply and sum, the form inductor fuses into one kernel that reads the quantized weight.
- `compile-mm`: the same written as `F.linear(x, dequant(W))`, which inductor splits into a
  dequantising kernel (an fp32 copy of the weight) and an extern GEMM.
- `torchao`: torchao's weight-only configs through `quantize_`: `Int8WeightOnlyConfig`, and for
  int4 `PrototypeInt4WeightOnlyConfig` (Int4OpaqueTensor, torchao's CPU int4 layout; the stable
  `Int4WeightOnlyConfig` formats need CUDA kernels or the `mslk` package). fp32 is the plain
  nn.Linear.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

GROUP = 32  # int4 inputs per scale / zero, as the export's MatMulNBits block
TORCH_ROUTES = ("torch", "torch-bf16", "onednn", "onednn-bf16", "compile", "compile-mm", "torchao")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [out, in] int8, scales [out] fp32), w ~= q * scales[:, None]."""
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per `group` inputs: (q [out, in] int32 in 0..15, scales, mins [out, in / group]),
    w ~= q * scale + min (the grid tinygemm's int4 kernels use)."""
    out, inp = w.shape
    grouped = w.reshape(out, inp // group, group)
    mins, maxs = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scales = ((maxs - mins) / 15).clamp(min=1e-12)
    q = torch.round((grouped - mins[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(out, inp), scales, mins


def dequantize(dtype: str, parts: tuple, group: int = GROUP) -> torch.Tensor:
    """The fp32 [out, in] weight that `quantize_<dtype>`'s parts stand for (fp32: the weight itself)."""
    if dtype == "fp32":
        return parts[0]
    if dtype == "int8":
        q, scales = parts
        return q.to(torch.float32) * scales[:, None]
    q, scales, mins = parts
    out, inp = q.shape
    return (q.to(torch.float32).reshape(out, inp // group, group) * scales[..., None] + mins[..., None]).reshape(out, inp)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int4 values [out, in] -> uint8 [out, in / 2], input 2j in the low nibble, 2j + 1 in the high one."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """`pack_nibbles` undone, with ops inductor can fuse into the product."""
    out, half = packed.shape
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(out, 2 * half)


def _bytes(tensor: torch.Tensor) -> int:
    """Storage of a tensor, or of a torchao tensor subclass's inner tensors (qdata, scale, ...)."""
    names = getattr(tensor, "tensor_data_names", None)
    if names:
        return sum(getattr(tensor, name).nbytes for name in names)
    return tensor.nbytes


def _prepacked(dtype: str, weights: list[torch.Tensor], act: torch.dtype):
    """oneDNN's product on weights reordered once (slmctl.runtime.prepacked, what `--dtype` inference
    runs on where it is faster), weights and activations of dtype `act`."""
    if dtype != "fp32":
        raise ValueError("oneDNN's prepacked product takes fp32 or bf16 weights, not quantized ones")
    from slmctl.runtime.hardware import cpu_identity
    from slmctl.runtime.prepacked import NO_BF16_PACKING, PackedLinear, packs_bf16

    if act == torch.bfloat16 and not packs_bf16(cpu_identity()):
        raise ValueError(NO_BF16_PACKING)

    products = [PackedLinear(w.to(act), None).eval() for w in weights]

    def chain(x):
        x = x.to(act)
        for product in products:
            x = product(x)
        return x.float()

    return chain, sum(w.numel() for w in weights) * torch.finfo(act).bits // 8


def _eager(dtype: str, weights: list[torch.Tensor], act: torch.dtype = torch.float32):
    """PyTorch's own CPU kernels, one call per product, on activations of dtype `act`."""
    if dtype == "fp32":
        parts = [(w.to(act),) for w in weights]
        product = F.linear
    elif dtype == "int8":
        parts = [(q, scales.to(act)) for q, scales in map(quantize_int8, weights)]
        product = torch._weight_int8pack_mm  # (x [M, in], q [out, in] int8, scales [out]) -> [M, out]
    else:
        parts = []
        for w in weights:
            q, scales, mins = quantize_int4(w)
            # the kernel computes (q - 8) * scale + zero: zero = min + 8 * scale; [in / group, out, 2]
            scales_and_zeros = torch.stack([scales, mins + 8 * scales], dim=-1).transpose(0, 1).contiguous()
            parts.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros.to(act)))

        def product(x, packed, scales_and_zeros):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_and_zeros)

    def chain(x):
        x = x.to(act)
        for p in parts:
            x = product(x, *p)
        return x.float()

    return chain, sum(t.nbytes for p in parts for t in p)


def _compiled(dtype: str, weights: list[torch.Tensor], fused: bool):
    """torch.compile of the whole chain (one graph, as a compiled decode step would be); the
    weights are inputs, not constants, so inductor cannot fold the dequantisation away."""
    if dtype == "fp32":
        parts = [(w,) for w in weights]
    elif dtype == "int8":
        parts = [quantize_int8(w) for w in weights]
    else:
        parts = []
        for w in weights:
            q, scales, mins = quantize_int4(w)
            parts.append((pack_nibbles(q), scales, mins))

    def chain(x, parts):
        for p in parts:
            w = dequantize(dtype, (unpack_nibbles(p[0]), *p[1:]) if dtype == "int4" else p)
            x = (x[:, None, :] * w).sum(dim=-1) if fused else F.linear(x, w)
        return x

    torch._dynamo.reset()  # a fresh cache: the chains of every dtype and M share one code object
    compiled = torch.compile(chain, dynamic=False, fullgraph=True)
    return (lambda x: compiled(x, parts)), sum(t.nbytes for p in parts for t in p)


def _torchao(dtype: str, weights: list[torch.Tensor]):
    """torchao's weight-only quantization of a stack of nn.Linear layers, run eagerly."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    layers = torch.nn.Sequential()
    for w in weights:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        layers.append(layer)
    # set_inductor_config=False: quantize_ would otherwise change inductor's global settings under the compile route
    if dtype == "int8":
        quantize_(layers, Int8WeightOnlyConfig(set_inductor_config=False))
    elif dtype == "int4":
        quantize_(layers, PrototypeInt4WeightOnlyConfig(group_size=GROUP, set_inductor_config=False))
    return layers, sum(_bytes(layer.weight) for layer in layers)


def build(route: str, dtype: str, weights: list[torch.Tensor]) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """(chain, weight bytes) of `route` for `dtype` ("fp32", "int8", "int4") over [out, in] fp32 weights."""
    if route == "torch":
        return _eager(dtype, weights)
    if route == "torch-bf16":
        return _eager(dtype, weights, torch.bfloat16)
    if route in ("onednn", "onednn-bf16"):
        return _prepacked(dtype, weights, torch.bfloat16 if route == "onednn-bf16" else torch.float32)
    if route in ("compile", "compile-mm"):
        return _compiled(dtype, weights, fused=route == "compile")
    if route == "torchao":
        return _torchao(dtype, weights)
    raise ValueError(f"unknown route {route!r} (choose from: {', '.join(TORCH_ROUTES)})")
