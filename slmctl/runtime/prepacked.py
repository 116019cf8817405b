"""Linear weights prepacked for oneDNN, for PyTorch inference on the CPU (what inductor's CPU
freezing does to a model's weights, without compiling anything).

Why: at decode every product has one row (M = 1, or K + 1 with drafts) against a large weight,
and what it costs is how fast the kernel reads the weight. torch's `F.linear` goes to MKL for
fp32 and to oneDNN with a weight reordered on every call for bf16. Measured on a 2-core AMD EPYC
(Zen 4), one 1024x4096 product of a chain of 40 distinct weights, 2 threads (docs/speed.md,
`python -m slmctl.bench.kernels --routes torch,onednn,onednn-bf16`):

| product | M = 1 | M = 9 |
|---|---|---|
| fp32 `F.linear` (MKL) | 1021 us | 1999 us |
| fp32, weight prepacked for oneDNN | 657 us | 661 us |
| bf16 `F.linear` | 781 us | 721 us |
| bf16, weight prepacked for oneDNN | 330 us | 346 us |

So bf16 runs packed wherever oneDNN has a bf16 product (AVX512BW/VL/DQ or AVX-NE-CONVERT: not on an
AVX2-only CPU such as a Zen 3, where its reorder refuses bf16 and bf16 stays on torch's own path), and
fp32 runs packed where torch's BLAS is MKL on an AMD CPU; on an Intel Xeon MKL's fp32 product at M = 1
is the faster one (606 against 756 us) and stays.

Small fp32 weights (at most `ONE_ROW_KEPT` elements, 1 MB: `mini`'s 256-wide products) also keep the
plain weight for one-row products: there torch's matrix-vector kernel, its weight in cache, beats the
packed product (Zen 3, `mini` answering the long-output task on PyTorch, runs alternated: plain decode
208-225 tok/s packed against 290-291 with MKL), while from two rows on the packed product is as fast or
faster (MKL's small-M GEMM: with drafts 778-861 against 714-770 tok/s). Keeping the plain weight alive costs
at most 1 MB per product.

A packed model is for inference only: the packed weights are opaque oneDNN tensors, out of the
state dict and of autograd. SLMCTL_PACK=on|off overrides the choice.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmctl.model.base import LanguageModel

PACK_ENV = "SLMCTL_PACK"
BF16_FEATURES = ("avx512_bf16", "amx_bf16")  # the CPUs whose oneDNN has bf16 products (else it emulates them, slowly)
ONEDNN_BF16_FEATURES = (("avx512bw", "avx512vl", "avx512dq"), ("avx_ne_convert",))  # any one set: oneDNN's bf16 reorder
NO_BF16_PACKING = "oneDNN prepacks bf16 weights only on CPUs with AVX512BW/VL/DQ or AVX-NE-CONVERT"
ONE_ROW_KEPT = 1 << 18  # fp32 weights of at most this many elements keep torch's own product for one row


def has_bf16(identity: dict) -> bool:
    """Whether the CPU `identity` describes (slmctl.runtime.hardware.cpu_identity) computes in bf16 natively."""
    return any(f in identity.get("cpu_features", ()) for f in BF16_FEATURES)


def packs_bf16(identity: dict) -> bool:
    """Whether oneDNN can prepack a bf16 weight on this CPU (its reorder refuses one on AVX2-only CPUs)."""
    features = set(identity.get("cpu_features", ()))
    return any(features.issuperset(needed) for needed in ONEDNN_BF16_FEATURES)


def choose_packing(identity: dict, dtype: torch.dtype, environ=os.environ) -> tuple[bool, str]:
    """(pack?, why) for a model of `dtype` on the CPU `identity` describes."""
    from slmctl.errors import ConfigError

    forced = environ.get(PACK_ENV, "auto")
    if forced not in ("auto", "on", "off"):
        raise ConfigError(f"{PACK_ENV}={forced!r}: choose auto, on or off")
    no_bf16 = dtype == torch.bfloat16 and not packs_bf16(identity)
    if forced == "on" and no_bf16:
        raise ConfigError(f"{PACK_ENV}=on: {NO_BF16_PACKING}, and this one ({identity.get('cpu', 'this CPU')}) has neither")
    if forced != "auto":
        return forced == "on", f"{PACK_ENV}={forced}"
    if no_bf16:
        return False, NO_BF16_PACKING
    if dtype == torch.bfloat16:
        return True, "bf16 products read a prepacked weight twice as fast"
    if dtype == torch.float32 and identity.get("cpu_vendor") == "AuthenticAMD" and identity.get("torch_blas") == "mkl":
        return True, "MKL's fp32 products read the weights at about 0.6x oneDNN's prepacked ones on AMD"
    return False, f"torch's {identity.get('torch_blas', 'BLAS')} products are the faster ones here"


class PackedLinear(nn.Module):
    """`nn.Linear`'s product, through oneDNN with the weight reordered once, here, for any M (a small
    fp32 weight: from two rows on; one row goes through torch's own product of the plain weight)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tied: bool = False):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # the parameters it stands for, in LanguageModel.num_parameters (none for a copy of a tied weight)
        self.replaces_parameters = 0 if tied else weight.numel() + (0 if bias is None else bias.numel())
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)  # a plain attribute: no state dict
            self.bias = None if bias is None else bias.detach().clone()
            small = weight.dtype == torch.float32 and weight.numel() <= ONE_ROW_KEPT
            self.one_row_weight = weight.detach() if small else None  # shares the weight it was given: no copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # its weight is a frozen copy: training it would silently train nothing
            raise RuntimeError("a model with prepacked weights is for inference: load it again to train it")
        if self.one_row_weight is not None and x.numel() == self.in_features:
            return F.linear(x, self.one_row_weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, oneDNN prepacked"


def pack_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` of `model` (CPU, fp32 or bf16) for a `PackedLinear`, and give a
    tied LM head (`LanguageModel.lm_head`) a packed copy of the embedding; returns how many
    products were packed. The model is then in eval mode, for inference only."""
    # (parent, name) only: a list of the Linears themselves would keep every fp32 weight alive beside its packed copy
    places = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
              if type(child) is nn.Linear and child.weight.device.type == "cpu"]
    for parent, name in places:
        linear = getattr(parent, name)
        setattr(parent, name, PackedLinear(linear.weight, linear.bias))
        del linear
    if isinstance(model, LanguageModel):  # its lm_head takes this packed copy of the tied embedding
        model.head_product = PackedLinear(model.embed.weight, None, tied=True)
    model.eval()
    return len(places) + isinstance(model, LanguageModel)


def pack_for_inference(model: nn.Module, identity: dict | None = None, say=None) -> bool:
    """Pack `model`'s products when `choose_packing` says it wins on this CPU (a CPU model only);
    `say(line)` is told which way it went and why. Returns whether it packed."""
    if model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if identity is None:
        from slmctl.runtime.hardware import cpu_identity

        identity = cpu_identity()
    pack, why = choose_packing(identity, model.dtype)
    if pack:
        count = pack_linears(model)
        if say:
            say(f"weights: {count} products prepacked for oneDNN ({why}; {PACK_ENV}=off for torch's own)")
    return pack
