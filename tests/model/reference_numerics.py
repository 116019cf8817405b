"""An independent re-statement of the reference implementation's numerics, used as the
oracle for checkpoint import: explicit matmul attention, K/V heads repeated by tiling,
masks filled with the dtype's minimum, softmax(scores / sqrt(head_dim)), RoPE by
rotate-half over the padded length (encoder positions centred), masks derived from the
pad id, and plain uncached greedy decoding. It reads a reference-keyed state dict.
"""

import math

import torch
import torch.nn.functional as F


def _rms(x, w, eps=1e-6):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _linear(p, name, x):
    return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])


def _rope(T, head_dim, centred, theta=10000.0):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    pos = torch.arange(T, dtype=torch.float)
    if centred:
        pos = pos - (T - 1) // 2
    emb = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
    return emb.cos()[None, None], emb.sin()[None, None]


def _rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _attention(p, name, xq, xkv, mask, causal, use_rope, H, KV):
    B, T, _ = xq.shape
    hd = p[f"{name}.q_linear.weight"].shape[0] // H
    q = _linear(p, f"{name}.q_linear", xq).view(B, T, H, hd).transpose(1, 2)
    k = _linear(p, f"{name}.k_linear", xkv).view(B, -1, KV, hd).transpose(1, 2)
    v = _linear(p, f"{name}.v_linear", xkv).view(B, -1, KV, hd).transpose(1, 2)
    if use_rope:
        cos, sin = _rope(T, hd, centred=not causal)
        q, k = q * cos + _rot(q) * sin, k * cos + _rot(k) * sin
    k, v = torch.cat([k] * (H // KV), dim=1), torch.cat([v] * (H // KV), dim=1)  # tiling
    scores = q @ k.transpose(-2, -1)
    m = mask[:, None, None, :]
    if causal:
        m = m & torch.tril(torch.ones(T, T)).bool()[None, None]
    scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
    out = F.softmax(scores / math.sqrt(hd), dim=-1) @ v
    return _linear(p, f"{name}.out_linear", out.transpose(1, 2).reshape(B, T, H * hd))


def _mlp(p, name, x):
    return _linear(p, f"{name}.fc2", _gelu(_linear(p, f"{name}.fc1", x)))


def reference_logits(p, enc_ids, dec_ids, H, KV, pad_id=0):
    n_enc = len({k.split(".")[2] for k in p if k.startswith("transformer.e.")})
    n_dec = len({k.split(".")[2] for k in p if k.startswith("transformer.h.")})
    enc_mask, dec_mask = enc_ids != pad_id, dec_ids != pad_id
    e = p["transformer.wte.weight"][enc_ids]
    for i in range(n_enc):
        b = f"transformer.e.{i}"
        h = _rms(e, p[f"{b}.ln1.weight"])
        e = e + _attention(p, f"{b}.attn", h, h, enc_mask, False, True, H, KV)
        e = e + _mlp(p, f"{b}.mlp", _rms(e, p[f"{b}.ln2.weight"]))
    e = _rms(e, p["transformer.ln_e.weight"])
    x = p["transformer.wte.weight"][dec_ids]
    for i in range(n_dec):
        b = f"transformer.h.{i}"
        h = _rms(x, p[f"{b}.ln1.weight"])
        x = x + _attention(p, f"{b}.causal_attn", h, h, dec_mask, True, True, H, KV)
        x = x + _attention(p, f"{b}.cross_attn", _rms(x, p[f"{b}.ln2.weight"]), e, enc_mask, False, False, H, KV)
        x = x + _mlp(p, f"{b}.mlp", _rms(x, p[f"{b}.ln3.weight"]))
    x = _rms(x, p["transformer.ln_f.weight"])
    return x @ p["lm_head.weight"].T


def reference_greedy(p, enc_ids, H, KV, bos_id, eos_id, max_new_tokens, pad_id=0):
    dec = torch.full((enc_ids.shape[0], 1), bos_id, dtype=torch.long)
    finished = torch.zeros(enc_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = reference_logits(p, enc_ids, dec, H, KV, pad_id)[:, -1].argmax(-1)
        nxt = nxt.masked_fill(finished, pad_id)
        finished |= nxt == eos_id
        dec = torch.cat([dec, nxt[:, None]], dim=1)
        if finished.all():
            break
    return dec[:, 1:]


def random_reference_state(vocab, d, H, KV, hd, d_ff, n_enc, n_dec, seed=0, scale=2.0, embed_std=0.5):
    """A reference-keyed state dict with clearly non-trivial random weights."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return scale * torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    def b(n):
        return 0.1 * torch.randn(n, generator=g)

    def norm():
        return 1.0 + 0.2 * torch.randn(d, generator=g)

    def attn(prefix):
        out = {}
        for name, rows in (("q_linear", H * hd), ("k_linear", KV * hd), ("v_linear", KV * hd)):
            out[f"{prefix}.{name}.weight"], out[f"{prefix}.{name}.bias"] = w(rows, d), b(rows)
        out[f"{prefix}.out_linear.weight"], out[f"{prefix}.out_linear.bias"] = w(d, H * hd), b(d)
        return out

    def mlp(prefix):
        return {f"{prefix}.fc1.weight": w(d_ff, d), f"{prefix}.fc1.bias": b(d_ff),
                f"{prefix}.fc2.weight": w(d, d_ff), f"{prefix}.fc2.bias": b(d)}

    wte = embed_std * torch.randn(vocab, d, generator=g)
    wte[0] = 0.0  # the pad embedding (id 0) never wins the argmax: the reference would mask it as padding
    p = {"transformer.wte.weight": wte}
    for i in range(n_enc):
        p |= {f"transformer.e.{i}.ln1.weight": norm(), f"transformer.e.{i}.ln2.weight": norm()}
        p |= attn(f"transformer.e.{i}.attn") | mlp(f"transformer.e.{i}.mlp")
    p["transformer.ln_e.weight"] = norm()
    for i in range(n_dec):
        p |= {f"transformer.h.{i}.ln{j}.weight": norm() for j in (1, 2, 3)}
        p |= attn(f"transformer.h.{i}.causal_attn") | attn(f"transformer.h.{i}.cross_attn") | mlp(f"transformer.h.{i}.mlp")
    p["transformer.ln_f.weight"] = norm()
    p["lm_head.weight"] = wte
    return p
