"""The typed model configuration, the named presets, and the model.json format.

A `ModelConfig` fully describes a network: two models built from equal configs
have the same architecture and the same parameter names and shapes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHITECTURES = ("encdec", "deconly")
MODEL_JSON_FORMAT = "slmctl-model"
MODEL_JSON_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an encoder-decoder LM or of its decoder-only baseline.

    For `arch="deconly"` there is no encoder (`n_encoder_layers == 0`) and
    `n_decoder_layers` counts the causal self-attention + MLP blocks.
    """

    name: str = "330m"
    arch: str = "encdec"
    vocab_size: int = 32128
    d_model: int = 1024
    n_heads: int = 6  # query heads
    n_kv_heads: int = 3  # key/value heads (grouped-query attention)
    head_dim: int = 64
    d_ff: int = 4096
    n_encoder_layers: int = 20
    n_decoder_layers: int = 10
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_factor: float = 1.0  # > 1 turns on NTK scaling beyond max_seq_len
    max_seq_len: int = 1024  # the length RoPE was trained for (NTK reference)
    dropout: float = 0.0
    pad_token_id: int = 0
    bos_token_id: int = 1  # also the decoder start token
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        problems = []
        if self.arch not in ARCHITECTURES:
            problems.append(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        for field in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "n_decoder_layers", "max_seq_len"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                problems.append(f"{field} must be a positive integer, got {getattr(self, field)!r}")
        if self.arch == "encdec" and self.n_encoder_layers <= 0:
            problems.append("an encoder-decoder needs n_encoder_layers > 0")
        if self.arch == "deconly" and self.n_encoder_layers != 0:
            problems.append("a decoder-only model has n_encoder_layers = 0")
        if self.n_heads > 0 and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_factor < 1.0:
            problems.append(f"rope_factor must be >= 1, got {self.rope_factor}")
        for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            if isinstance(value, int) and not 0 <= value < max(self.vocab_size, 1):
                problems.append(f"{field}={value} is outside the vocabulary (size {self.vocab_size})")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def is_encoder_decoder(self) -> bool:
        return self.arch == "encdec"

    @property
    def attn_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"format": MODEL_JSON_FORMAT, "version": MODEL_JSON_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = {k: v for k, v in data.items() if k not in ("format", "version")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)} (valid: {', '.join(sorted(known))})")
        return cls(**data)

    def save_json(self, path: str | Path) -> None:
        from slmctl.atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------
# Parameter counting (analytic, so presets can be checked without building them)


def _attention_params(cfg: ModelConfig) -> int:
    d, a, kv = cfg.d_model, cfg.attn_width, cfg.kv_width
    return (d * a + a) + 2 * (d * kv + kv) + (a * d + d)  # q, k, v, out (all with bias)


def _mlp_params(cfg: ModelConfig) -> int:
    return (cfg.d_model * cfg.d_ff + cfg.d_ff) + (cfg.d_ff * cfg.d_model + cfg.d_model)


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model `cfg` describes, counting the tied embedding once."""
    d = cfg.d_model
    self_block = _attention_params(cfg) + _mlp_params(cfg) + 2 * d  # attn + mlp + 2 norms
    embedding = cfg.vocab_size * d
    if cfg.arch == "deconly":
        return embedding + cfg.n_decoder_layers * self_block + d
    cross_block = self_block + _attention_params(cfg) + d  # + cross-attention + its norm
    return embedding + cfg.n_encoder_layers * self_block + cfg.n_decoder_layers * cross_block + 2 * d


def matched_decoder_only(cfg: ModelConfig) -> ModelConfig:
    """The decoder-only baseline of the paper's comparison: same width, heads, MLP and
    vocabulary, with the layer count whose parameter count is closest to `cfg`'s."""
    target = count_parameters(cfg)
    base = cfg.replace(arch="deconly", n_encoder_layers=0, n_decoder_layers=1, name=f"deconly-{cfg.name}")
    per_layer = count_parameters(base.replace(n_decoder_layers=2)) - count_parameters(base)
    fixed = count_parameters(base) - per_layer
    layers = max(1, round((target - fixed) / per_layer))
    return base.replace(n_decoder_layers=layers)


# ---------------------------------------------------------------------------
# Presets

_ENCDEC_PRESETS = {
    # For tests: a few hundred thousand parameters, same shape rules as the paper.
    "tiny": ModelConfig(
        name="tiny", vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=256,
        n_encoder_layers=6, n_decoder_layers=3, max_seq_len=512,
    ),
    # The quickstart's size: learns the synthetic reading task in a few CPU minutes.
    "mini": ModelConfig(
        name="mini", vocab_size=8192, d_model=256, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=768,
        n_encoder_layers=6, n_decoder_layers=3,
    ),
    # Trains visibly on a laptop CPU in minutes (~21M parameters at vocab 8192).
    "small": ModelConfig(
        name="small", vocab_size=8192, d_model=384, n_heads=6, n_kv_heads=3, head_dim=32, d_ff=1536,
        n_encoder_layers=8, n_decoder_layers=4,
    ),
    # The paper's 330M "Mu": 20/10 layers, d 1024, 6 query / 3 kv heads of 64, MLP 4096.
    "330m": ModelConfig(),
    # The same recipe scaled to ~1B with the 2/3-1/3 split.
    "1b": ModelConfig(
        name="1b", d_model=1536, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=6144,
        n_encoder_layers=28, n_decoder_layers=14, max_seq_len=2048,
    ),
}

PRESETS: dict[str, ModelConfig] = dict(_ENCDEC_PRESETS)
PRESETS.update({f"deconly-{name}": matched_decoder_only(cfg) for name, cfg in _ENCDEC_PRESETS.items()})


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r} (choose from: {', '.join(PRESETS)})") from None


def vocab_size_for(n_tokens: int, multiple: int = 128) -> int:
    """Embedding rows for a tokenizer of `n_tokens`, padded to a multiple of 128 as the
    paper pads Phi-3.5's 32064 tokens to 32128 (aligned matmuls)."""
    return -(-n_tokens // multiple) * multiple


# ---------------------------------------------------------------------------
# From a composed config (slmctl.config's ModelSchema node)


def model_config_from(node, **fallbacks) -> ModelConfig:
    """The ModelConfig a `model` (or `student`) config node describes: its `preset` built as
    its `arch`, with the node's non-null fields as changes and `fallbacks` (e.g. the tokenizer's
    vocab size and token ids) used where the node is null. `arch=deconly` matches the preset's
    encoder-decoder (with the same changes) as a decoder-only baseline of equal parameter count,
    unless the node sets `n_decoder_layers` itself."""
    from omegaconf import OmegaConf

    from slmctl.errors import ConfigError

    node = OmegaConf.to_container(node, resolve=True)
    arch = str(node["arch"])
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch={arch} is not built from a preset (a ModelConfig builds: {', '.join(ARCHITECTURES)})")
    changes = {k: v for k, v in fallbacks.items() if node.get(k) is None}
    changes |= {k: v for k, v in node.items() if k not in ("preset", "arch", "hf", "init") and v is not None}
    try:
        config = get_preset(node["preset"]).replace(**changes)
        if arch == "deconly" and config.arch == "encdec":
            config = matched_decoder_only(config)
            if "n_decoder_layers" in changes:
                config = config.replace(n_decoder_layers=changes["n_decoder_layers"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.arch != arch:
        raise ConfigError(f"model.preset={node['preset']} is a {config.arch} preset, but model.arch={arch}")
    return config


def model_name(node) -> str:
    """What a `model` config node is called in logs and summaries: `hf-causal`, or the
    preset it builds (`small`, `deconly-small`)."""
    if node.arch == "hf-causal":
        return "hf-causal"
    preset = get_preset(node.preset)
    return matched_decoder_only(preset).name if node.arch == "deconly" and preset.arch == "encdec" else preset.name
