"""slmctl's models as transformers models (copied into every `slmctl export hf` directory).

Self-contained: it imports torch and transformers only, so a directory exported by slmctl loads
anywhere with `trust_remote_code=True`:

    AutoModelForSeq2SeqLM.from_pretrained(dir, trust_remote_code=True)   # the encoder-decoder
    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)    # the decoder-only baseline

The encoder-decoder ("Return of the Encoder", the 330M "Mu"):

    encoder:  embed -> N x [RMSNorm -> bidirectional GQA self-attn (RoPE, centred positions) -> +,
                            RMSNorm -> tanh-GELU MLP -> +] -> RMSNorm
    decoder:  embed -> M x [RMSNorm -> causal GQA self-attn (RoPE from 0) -> +,
                            RMSNorm -> cross-attn over the encoder output (no RoPE) -> +,
                            RMSNorm -> tanh-GELU MLP -> +] -> RMSNorm -> LM head tied to the embedding

The decoder-only baseline is the encoder stack made causal. Parameter names are slmctl's own, so
the weights file is the one slmctl wrote. Generation is transformers' `GenerationMixin` with its
cache classes: the encoder runs once per prompt, every decoder layer computes the cross-attention
keys/values once (kept in `EncoderDecoderCache.cross_attention_cache`), self-attention grows a
`DynamicCache`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, Pipeline, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, Seq2SeqLMOutput

IGNORE_INDEX = -100


class SlmctlConfig(PretrainedConfig):
    """The architecture, field for field as slmctl's `ModelConfig` (model.json)."""

    model_type = "slmctl"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
                     "intermediate_size": "d_ff", "num_hidden_layers": "n_decoder_layers"}

    def __init__(self, arch="encdec", name="330m", vocab_size=32128, d_model=1024, n_heads=6, n_kv_heads=3, head_dim=64,
                 d_ff=4096, n_encoder_layers=20, n_decoder_layers=10, norm_eps=1e-6, rope_theta=10000.0, rope_factor=1.0,
                 max_seq_len=1024, dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=True, **kwargs):
        self.arch, self.name, self.vocab_size, self.d_model = arch, name, vocab_size, d_model
        self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff = n_heads, n_kv_heads, head_dim, d_ff
        self.n_encoder_layers, self.n_decoder_layers = n_encoder_layers, n_decoder_layers
        self.norm_eps, self.rope_theta, self.rope_factor, self.max_seq_len = norm_eps, rope_theta, rope_factor, max_seq_len
        self.dropout, self.use_cache = dropout, use_cache
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs["is_encoder_decoder"] = arch == "encdec"
        if arch == "encdec":
            kwargs.setdefault("decoder_start_token_id", bos_token_id)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)


# ---------------------------------------------------------------------------
# Positions and masks


def rope(config: SlmctlConfig, positions: torch.Tensor, seq_len: int, dtype: torch.dtype):
    """cos and signed sin [B or 1, 1, T, head_dim] for integer positions [B or 1, T]. With
    rope_factor > 1, sequences longer than max_seq_len use the dynamic NTK base."""
    d, base = config.head_dim, config.rope_theta
    if config.rope_factor > 1.0 and seq_len > config.max_seq_len:
        base = base * (config.rope_factor * seq_len / config.max_seq_len - (config.rope_factor - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=positions.device).float() / d))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    sin = angles.sin()
    signed_sin = torch.cat((-sin[..., : d // 2], sin[..., d // 2:]), dim=-1)  # rotate-half's sign, folded in
    return angles.cos().to(dtype)[:, None], signed_sin.to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, written as slmctl writes it (same rounding, same logits)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def padding_positions(attention_mask: torch.Tensor, centred: bool) -> torch.Tensor:
    """Positions that skip padding: the first real token is 0 (centred: the middle one is)."""
    mask = attention_mask.long()
    positions = mask.cumsum(dim=1) - 1
    if centred:
        positions = positions - (mask.sum(dim=1, keepdim=True) - 1) // 2
    return positions.masked_fill(mask == 0, 0)


def has_padding(attention_mask: torch.Tensor | None) -> bool:
    return attention_mask is not None and not bool(attention_mask.all())


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """"May attend" -> 0 or the dtype's minimum (not -inf: a fully masked padding row stays finite)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def causal_mask(key_mask: torch.Tensor | None, past: int, T: int, dtype: torch.dtype, device: torch.device):
    """(additive mask or None, is_causal) for T new queries after `past` cached keys; `key_mask`
    [B, past + T] marks real tokens (None: no padding)."""
    if key_mask is None and (past == 0 or T == 1):
        return None, past == 0 and T > 1
    allowed = torch.arange(past + T, device=device)[None, :] <= (past + torch.arange(T, device=device))[:, None]
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    return additive(allowed, dtype), False


# ---------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True).add_(self.eps))
        return normed.to(x.dtype) * self.weight


class MLP(nn.Module):
    def __init__(self, config: SlmctlConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Grouped-query self-attention with RoPE; query head j reads key/value head j // (heads / kv heads)."""

    def __init__(self, config: SlmctlConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.layer = config.n_heads, config.n_kv_heads, config.head_dim, layer
        self.split = (config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.n_kv_heads * config.head_dim)
        self.qkv = nn.Linear(config.d_model, sum(self.split))
        self.out = nn.Linear(self.split[0], config.d_model)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, is_causal, cache: Cache | None):
        B, T, _ = x.shape
        qk, v = self.qkv(x).split((self.split[0] + self.split[1], self.split[2]), dim=-1)
        qk = apply_rope(qk.view(B, T, self.n_heads + self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=1)  # RoPE once over query and key heads
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class CrossAttention(nn.Module):
    """Decoder queries over the encoder output (no positions); keys/values computed once per prompt."""

    def __init__(self, config: SlmctlConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.layer = config.n_heads, config.n_kv_heads, config.head_dim, layer
        self.q = nn.Linear(config.d_model, config.n_heads * config.head_dim)
        self.kv = nn.Linear(config.d_model, 2 * config.n_kv_heads * config.head_dim)
        self.out = nn.Linear(config.n_heads * config.head_dim, config.d_model)
        self.dropout = config.dropout

    def memory(self, encoder_out: torch.Tensor, cache: EncoderDecoderCache | None):
        """The encoder's keys/values for this layer: from the cache after the first step."""
        if cache is not None and cache.is_updated.get(self.layer):
            entry = cache.cross_attention_cache.layers[self.layer]
            return entry.keys, entry.values
        B, S, _ = encoder_out.shape
        kv = self.kv(encoder_out).view(B, S, 2, self.n_kv_heads, self.head_dim)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        if cache is not None:
            k, v = cache.cross_attention_cache.update(k, v, self.layer)
            cache.is_updated[self.layer] = True
        return k, v

    def forward(self, x, encoder_out, memory_mask, cache: EncoderDecoderCache | None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.memory(encoder_out, cache)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=memory_mask, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


def residual_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, True) if training and p > 0 else x


class SelfAttentionBlock(nn.Module):
    """Encoder block (bidirectional) and decoder-only block (causal)."""

    def __init__(self, config: SlmctlConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = SelfAttention(config, layer)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, is_causal, cache=None):
        x = x + residual_dropout(self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache), self.dropout, self.training)
        return x + residual_dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)


class CrossAttentionBlock(nn.Module):
    """Encoder-decoder decoder block: causal self-attention, cross-attention, MLP."""

    def __init__(self, config: SlmctlConfig, layer: int):
        super().__init__()
        self.self_attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = SelfAttention(config, layer)
        self.cross_attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.cross_attn = CrossAttention(config, layer)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, is_causal, encoder_out, memory_mask, cache=None):
        p, training = self.dropout, self.training
        self_cache = cache.self_attention_cache if cache is not None else None
        x = x + residual_dropout(self.self_attn(self.self_attn_norm(x), cos, sin, mask, is_causal, self_cache), p, training)
        x = x + residual_dropout(self.cross_attn(self.cross_attn_norm(x), encoder_out, memory_mask, cache), p, training)
        return x + residual_dropout(self.mlp(self.mlp_norm(x)), p, training)


# ---------------------------------------------------------------------------
# Models


class SlmctlPreTrainedModel(PreTrainedModel):
    config_class = SlmctlConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    gradient_checkpointing = False  # set by gradient_checkpointing_enable()
    _no_split_modules = ["SelfAttentionBlock", "CrossAttentionBlock"]
    _supports_sdpa = True
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        """Fan-in init, as slmctl trains from: Linear ~ N(0, 1/fan_in), embedding ~ N(0, 1/d_model)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=module.in_features ** -0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=module.embedding_dim ** -0.5)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        self.embed = embedding

    def get_output_embeddings(self):
        return None  # the LM head is the input embedding itself (no separate weight to tie)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed.weight)

    def run_layer(self, layer: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        """One block; recomputed in backward under gradient checkpointing."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer.__call__, x, *args)
        return layer(x, *args)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def with_cache(output_class, cache, **fields):
    """A model output carrying the cache under the name this transformers version uses."""
    name = "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"
    return output_class(**{name: cache}, **fields)


class SlmctlEncoder(nn.Module):
    """The encoder stack; what `generate` runs once per prompt (`get_encoder()`)."""

    main_input_name = "input_ids"

    def __init__(self, config: SlmctlConfig, owner: SlmctlPreTrainedModel):
        super().__init__()
        self.layers = nn.ModuleList(SelfAttentionBlock(config, i) for i in range(config.n_encoder_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.config = config
        self._owner = (owner,)  # in a tuple: the model's embedding is read through it, not registered twice

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, return_dict=True, **kwargs):
        owner = self._owner[0]
        x = owner.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        if has_padding(attention_mask):
            positions = padding_positions(attention_mask, centred=True)
            mask = additive(attention_mask.bool()[:, None, None, :], x.dtype)
        else:
            positions, mask = (torch.arange(S, device=x.device) - (S - 1) // 2)[None], None
        cos, sin = rope(self.config, positions, S, x.dtype)
        for layer in self.layers:
            x = owner.run_layer(layer, x, cos, sin, mask, False)
        x = self.norm(x)
        return BaseModelOutput(last_hidden_state=x) if return_dict else (x,)


class SlmctlDecoder(nn.Module):
    def __init__(self, config: SlmctlConfig):
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionBlock(config, i) for i in range(config.n_decoder_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class SlmctlForConditionalGeneration(SlmctlPreTrainedModel, GenerationMixin):
    """The encoder-decoder LM; `labels` give the token cross-entropy (decoder input: BOS + labels[:-1])."""

    def __init__(self, config: SlmctlConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = SlmctlEncoder(config, self)
        self.decoder = SlmctlDecoder(config)
        self.post_init()

    def get_encoder(self, modality=None):
        return self.encoder

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        start = labels.new_full((labels.shape[0], 1), self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self.shift_right(labels)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache=None, past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                return_dict=True, **kwargs):
        cache = cache if cache is not None else past_key_values
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids, attention_mask, inputs_embeds)
        encoder_out = encoder_outputs[0]
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        if not use_cache:
            cache = None
        B, T = decoder_input_ids.shape
        past = cache.self_attention_cache.get_seq_length() if cache is not None else 0
        x = self.embed(decoder_input_ids)
        if has_padding(decoder_attention_mask):
            positions = padding_positions(decoder_attention_mask, centred=False)[:, -T:]
            mask, is_causal = causal_mask(decoder_attention_mask, past, T, x.dtype, x.device)
        else:
            positions = torch.arange(past, past + T, device=x.device)[None]
            mask, is_causal = causal_mask(None, past, T, x.dtype, x.device)
        memory_mask = additive(attention_mask.bool()[:, None, None, :], x.dtype) if has_padding(attention_mask) else None
        cos, sin = rope(self.config, positions, past + T, x.dtype)
        for layer in self.decoder.layers:
            x = self.run_layer(layer, x, cos, sin, mask, is_causal, encoder_out, memory_mask, cache)
        logits = self.lm_head(self.decoder.norm(x))
        loss = self.loss(logits, labels) if labels is not None else None
        return with_cache(Seq2SeqLMOutput, cache, loss=loss, logits=logits, encoder_last_hidden_state=encoder_out)


class SlmctlForCausalLM(SlmctlPreTrainedModel, GenerationMixin):
    """The decoder-only baseline; `labels` align with `input_ids` and are shifted inside."""

    def __init__(self, config: SlmctlConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(SelfAttentionBlock(config, i) for i in range(config.n_decoder_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, return_dict=True, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        key_mask = attention_mask if has_padding(attention_mask) else None
        if position_ids is not None:
            positions = position_ids
        elif key_mask is not None:
            positions = padding_positions(key_mask, centred=False)[:, -T:]
        else:
            positions = torch.arange(past, past + T, device=x.device)[None]
        mask, is_causal = causal_mask(key_mask, past, T, x.dtype, x.device)
        cos, sin = rope(self.config, positions, past + T, x.dtype)
        for layer in self.layers:
            x = self.run_layer(layer, x, cos, sin, mask, is_causal, cache)
        logits = self.lm_head(self.norm(x))
        loss = self.loss(logits[:, :-1], labels[:, 1:]) if labels is not None else None
        return with_cache(CausalLMOutputWithPast, cache, loss=loss, logits=logits)


# ---------------------------------------------------------------------------
# pipeline("text2text-generation"): transformers 5 dropped its own; this one is registered in config.json


class Text2TextGenerationPipeline(Pipeline):
    """Text in, generated text out, for the encoder-decoder: `pipe("question", max_new_tokens=32)`."""

    def _sanitize_parameters(self, skip_special_tokens=None, **generate_kwargs):
        postprocess = {} if skip_special_tokens is None else {"skip_special_tokens": skip_special_tokens}
        return {}, generate_kwargs, postprocess

    def preprocess(self, text):
        return self.tokenizer(text, return_tensors="pt")

    def _forward(self, inputs, **generate_kwargs):
        return {"output_ids": self.model.generate(**inputs, **generate_kwargs)}

    def postprocess(self, outputs, skip_special_tokens=True):
        return [{"generated_text": self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)}
                for ids in outputs["output_ids"]]
