"""Import and export the reference implementation's checkpoint format.

The reference (microsoft/encoder-decoder-slm) saves `{"model_state_dict": state_dict}`
with `torch.save`, keys `transformer.wte.weight`, `transformer.e.{i}.*` (encoder),
`transformer.h.{i}.*` (decoder), `transformer.ln_e/ln_f.weight` and the tied
`lm_head.weight`. Its Q, K and V are separate Linears and its grouped K/V heads are
*tiled* (query head i uses K/V head i mod n_kv); ours are fused and grouped
contiguously (query head j uses K/V head j // group), so import permutes query
heads and export permutes them back. Both directions are exact copies.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from slmctl.errors import CheckpointError, first_line
from slmctl.model.base import LanguageModel
from slmctl.model.build import build_model
from slmctl.model.config import ModelConfig
from slmctl.model.store import load_state

REFERENCE_HEAD_DIM = 64
REFERENCE_MAX_SEQ_LEN = 1024  # the reference's block_size
PHI3_EOS_TOKEN_ID = 32000  # the reference tokenizer (Phi-3.5): pad = unk = 0, bos = 1, eos = 32000


def query_head_order(n_heads: int, n_kv_heads: int, grouping: str = "tiled") -> list[int]:
    """order[j] = the reference query head that becomes our query head j."""
    if grouping == "interleaved" or n_heads == n_kv_heads:
        return list(range(n_heads))
    if grouping != "tiled":
        raise ValueError(f"kv grouping must be 'tiled' or 'interleaved', got {grouping!r}")
    group = n_heads // n_kv_heads
    return [(j % group) * n_kv_heads + j // group for j in range(n_heads)]


def _rows(order: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in order])


def _attention_to_ours(ref: dict, prefix: str, cfg: ModelConfig, order: list[int], fused: bool) -> dict:
    rows = _rows(order, cfg.head_dim)
    get = lambda name: ref[f"{prefix}.{name}"]  # noqa: E731
    q_w, q_b = get("q_linear.weight")[rows], get("q_linear.bias")[rows]
    out = {"out.weight": get("out_linear.weight")[:, rows], "out.bias": get("out_linear.bias")}
    kv_w = torch.cat([get("k_linear.weight"), get("v_linear.weight")])
    kv_b = torch.cat([get("k_linear.bias"), get("v_linear.bias")])
    if fused:
        out |= {"qkv.weight": torch.cat([q_w, kv_w]), "qkv.bias": torch.cat([q_b, kv_b])}
    else:
        out |= {"q.weight": q_w, "q.bias": q_b, "kv.weight": kv_w, "kv.bias": kv_b}
    return out


def _attention_to_reference(ours: dict, prefix: str, cfg: ModelConfig, order: list[int], fused: bool) -> dict:
    inverse = [0] * len(order)
    for j, h in enumerate(order):
        inverse[h] = j
    rows = _rows(inverse, cfg.head_dim)
    a, kv = cfg.attn_width, cfg.kv_width
    if fused:
        w, b = ours[f"{prefix}.qkv.weight"], ours[f"{prefix}.qkv.bias"]
        q_w, k_w, v_w = w[:a], w[a:a + kv], w[a + kv:]
        q_b, k_b, v_b = b[:a], b[a:a + kv], b[a + kv:]
    else:
        q_w, q_b = ours[f"{prefix}.q.weight"], ours[f"{prefix}.q.bias"]
        w, b = ours[f"{prefix}.kv.weight"], ours[f"{prefix}.kv.bias"]
        k_w, v_w, k_b, v_b = w[:kv], w[kv:], b[:kv], b[kv:]
    return {
        "q_linear.weight": q_w[rows], "q_linear.bias": q_b[rows],
        "k_linear.weight": k_w, "k_linear.bias": k_b, "v_linear.weight": v_w, "v_linear.bias": v_b,
        "out_linear.weight": ours[f"{prefix}.out.weight"][:, rows], "out_linear.bias": ours[f"{prefix}.out.bias"],
    }


def _copied_keys(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our key, reference key) of every tensor that is copied unchanged."""
    mlp = ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    pairs = [("embed.weight", "transformer.wte.weight"), ("encoder.norm.weight", "transformer.ln_e.weight"),
             ("decoder.norm.weight", "transformer.ln_f.weight")]
    for i in range(cfg.n_encoder_layers):
        ours, ref = f"encoder.layers.{i}", f"transformer.e.{i}"
        pairs += [(f"{ours}.attn_norm.weight", f"{ref}.ln1.weight"), (f"{ours}.mlp_norm.weight", f"{ref}.ln2.weight")]
        pairs += [(f"{ours}.{name}", f"{ref}.{name}") for name in mlp]
    for i in range(cfg.n_decoder_layers):
        ours, ref = f"decoder.layers.{i}", f"transformer.h.{i}"
        for ref_norm, our_norm in (("ln1", "self_attn_norm"), ("ln2", "cross_attn_norm"), ("ln3", "mlp_norm")):
            pairs.append((f"{ours}.{our_norm}.weight", f"{ref}.{ref_norm}.weight"))
        pairs += [(f"{ours}.{name}", f"{ref}.{name}") for name in mlp]
    return pairs


def _attention_modules(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our prefix, reference prefix, whether ours fuses Q/K/V) of every attention module."""
    modules = [(f"encoder.layers.{i}.attn", f"transformer.e.{i}.attn", True) for i in range(cfg.n_encoder_layers)]
    for i in range(cfg.n_decoder_layers):
        modules += [(f"decoder.layers.{i}.self_attn", f"transformer.h.{i}.causal_attn", True),
                    (f"decoder.layers.{i}.cross_attn", f"transformer.h.{i}.cross_attn", False)]
    return modules


def to_reference_state(model_state: dict, cfg: ModelConfig, grouping: str = "tiled") -> dict:
    """Our encoder-decoder state dict -> the reference's keys and layout."""
    order = query_head_order(cfg.n_heads, cfg.n_kv_heads, grouping)
    ref = {ref_key: model_state[our_key] for our_key, ref_key in _copied_keys(cfg)}
    for ours, theirs, fused in _attention_modules(cfg):
        for name, tensor in _attention_to_reference(model_state, ours, cfg, order, fused).items():
            ref[f"{theirs}.{name}"] = tensor
    ref["lm_head.weight"] = model_state["embed.weight"]
    return ref


def from_reference_state(ref: dict, cfg: ModelConfig, grouping: str = "tiled") -> dict:
    """The reference's state dict -> ours (the inverse of `to_reference_state`)."""
    order = query_head_order(cfg.n_heads, cfg.n_kv_heads, grouping)
    ours = {our_key: ref[ref_key] for our_key, ref_key in _copied_keys(cfg)}
    for our_prefix, theirs, fused in _attention_modules(cfg):
        for name, tensor in _attention_to_ours(ref, theirs, cfg, order, fused).items():
            ours[f"{our_prefix}.{name}"] = tensor
    return {k: v.contiguous() for k, v in ours.items()}


def infer_reference_config(ref: dict, head_dim: int = REFERENCE_HEAD_DIM, **overrides) -> ModelConfig:
    """Architecture from tensor shapes; what shapes cannot tell comes from the paper's defaults."""
    for key in ("transformer.wte.weight", "transformer.e.0.attn.q_linear.weight",
                "transformer.e.0.attn.k_linear.weight", "transformer.e.0.mlp.fc1.weight"):
        if key not in ref:
            raise CheckpointError(f"not a reference-format checkpoint: missing {key}")
    vocab, d_model = ref["transformer.wte.weight"].shape
    layers = lambda part: len({int(m.group(1)) for k in ref if (m := re.match(rf"transformer\.{part}\.(\d+)\.", k))})  # noqa: E731
    head_dim = overrides.pop("head_dim", head_dim)
    fields = dict(
        name="reference", arch="encdec", vocab_size=vocab, d_model=d_model, head_dim=head_dim,
        n_heads=ref["transformer.e.0.attn.q_linear.weight"].shape[0] // head_dim,
        n_kv_heads=ref["transformer.e.0.attn.k_linear.weight"].shape[0] // head_dim,
        d_ff=ref["transformer.e.0.mlp.fc1.weight"].shape[0],
        n_encoder_layers=layers("e"), n_decoder_layers=layers("h"), max_seq_len=REFERENCE_MAX_SEQ_LEN,
        pad_token_id=0, bos_token_id=1, eos_token_id=PHI3_EOS_TOKEN_ID if vocab > PHI3_EOS_TOKEN_ID else 2,
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"cannot infer the architecture of this checkpoint: {e}") from None


def read_reference_file(path: Path) -> dict:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable (truncated or not a torch checkpoint?): {first_line(e)}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model_state_dict"), dict):
        return loaded["model_state_dict"]
    if isinstance(loaded, dict) and "transformer.wte.weight" in loaded:
        return loaded
    raise CheckpointError(f"{path} is not a reference-format checkpoint: expected a dict with 'model_state_dict'")


def import_reference_checkpoint(path: str | Path, grouping: str = "tiled", **config_overrides) -> LanguageModel:
    """Load a reference-format file into our `EncoderDecoderLM`, checking every key and shape."""
    path = Path(path)
    ref = read_reference_file(path)
    cfg = infer_reference_config(ref, **config_overrides)
    with torch.device("meta"):
        model = build_model(cfg)
    expected = to_reference_state(model.state_dict(), cfg, grouping)
    missing = sorted(set(expected) - set(ref))
    unexpected = sorted(set(ref) - set(expected))
    misshaped = sorted(f"{k} {tuple(ref[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                       if k in ref and ref[k].shape != v.shape)
    problems = [f"{label} {', '.join(keys[:5])}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if keys]
    if problems:
        raise CheckpointError(f"{path} does not fit the inferred {cfg.n_encoder_layers}/{cfg.n_decoder_layers}-layer "
                              f"model: " + "; ".join(problems))
    if "lm_head.weight" in ref and not torch.equal(ref["lm_head.weight"], ref["transformer.wte.weight"]):
        raise CheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight (an untied head is not supported)")
    load_state(model, from_reference_state(ref, cfg, grouping), source=str(path))
    return model


def export_reference_checkpoint(model: LanguageModel, path: str | Path, grouping: str = "tiled") -> Path:
    """Write `model` in the reference format (a `torch.save`d `{"model_state_dict": ...}`)."""
    if not model.config.is_encoder_decoder:
        raise ValueError("the reference format holds encoder-decoder models only")
    state = {k: v.detach().cpu().clone() for k, v in to_reference_state(model.state_dict(), model.config, grouping).items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied, as the reference saves it
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model_state_dict": state}, tmp)
    tmp.replace(path)
    return path
