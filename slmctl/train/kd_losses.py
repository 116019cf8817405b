"""Knowledge-distillation losses for the distillation stage.

The student is an encoder-decoder, the teacher a decoder-only LM. The caller aligns positions, so student
logits at target token t are paired with the teacher logits that predict t; everything here works on
[B, T, V] tensors plus a [B, T] mask of real target tokens.

Why these pieces:
- `kd_loss`: dense KD against full teacher logits (forward KL, reverse KL or the generalized JSD of GKD).
- `teacher_topk` / `topk_kd_loss`: a teacher logit cache cannot store V floats per token, so it stores the
  top k log-probs plus the log of the remaining mass; the loss compares both distributions on those k+1 bins,
  which keeps the divergence proper (both sides sum to 1) instead of silently renormalising the top k.
- `uld_loss`: Universal Logit Distillation for a teacher with a different tokenizer (no shared vocab ids).
- `agreement`: top-1 agreement, a cheap metric to log next to the loss.

Padded positions are removed with the mask before any arithmetic, so whatever they hold (even inf/nan)
cannot reach the value or the gradient. All divergences are computed in float32 and in log space, so
zero-probability entries (log-prob -inf) give 0 * log 0 = 0 and no NaN in values or gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("forward_kl", "reverse_kl", "jsd")


# ---------------------------------------------------------------------------------------------------------
# checks


def _check_kind(kind: str, beta: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown KD divergence kind {kind!r} (valid kinds: {', '.join(KINDS)})")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_mask(mask: Tensor, logits: Tensor, name: str = "student_logits") -> Tensor:
    """The mask as bool, after checking it is [B, T] for logits [B, T, V]."""
    if logits.dim() != 3:
        raise ValueError(f"{name} must be [B, T, V], got shape {tuple(logits.shape)}")
    if tuple(mask.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} shape {tuple(logits.shape)} (expected [B, T])")
    return mask.bool()


def _empty_loss(selected_student: Tensor) -> Tensor:
    """0.0 with a grad_fn reaching the student logits (the empty selection has no nan to propagate)."""
    return selected_student.float().sum() * 0.0


# ---------------------------------------------------------------------------------------------------------
# divergences on log-probabilities


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(P || Q) over the last dim. Entries where P is zero contribute exactly 0; both inputs are zeroed there
    first so that neither the value nor the gradient sees -inf - (-inf)."""
    zero = torch.isneginf(logp)
    p = logp.exp()
    logp = logp.masked_fill(zero, 0.0)
    logq = logq.masked_fill(zero, 0.0)
    return (p * (logp - logq)).sum(-1)


def divergence(teacher_logp: Tensor, student_logp: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """Per-row divergence over the last dim between two log-probability tensors [N, K] -> [N] (float32).

    forward_kl = KL(teacher || student); reverse_kl = KL(student || teacher);
    jsd = generalized JSD of Agarwal et al. (GKD): beta * KL(P || M) + (1 - beta) * KL(Q || M),
    M = beta * P + (1 - beta) * Q, P = teacher, Q = student, 0 < beta < 1 (beta=0.5 = symmetric JSD).
    Computed in log space, so -inf log-probs (zero probability) are handled without NaN.
    """
    _check_kind(kind, beta)
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(f"teacher_logp shape {tuple(teacher_logp.shape)} != student_logp shape {tuple(student_logp.shape)}")
    logp, logq = teacher_logp.float(), student_logp.float()
    if kind == "forward_kl":
        return _kl(logp, logq)
    if kind == "reverse_kl":
        return _kl(logq, logp)
    # jsd: log M = logaddexp(log beta + log P, log(1 - beta) + log Q). Where both are zero, M is zero too and
    # both KL terms drop that entry; the inputs are zeroed there so logaddexp(-inf, -inf) never needs a gradient.
    both_zero = torch.isneginf(logp) & torch.isneginf(logq)
    logm = torch.logaddexp(logp.masked_fill(both_zero, 0.0) + math.log(beta), logq.masked_fill(both_zero, 0.0) + math.log(1 - beta))
    return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)


# ---------------------------------------------------------------------------------------------------------
# dense KD


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """Dense KD: student and teacher logits [B, T, V] (same V), mask [B, T] (True = real target token).

    Both are divided by `temperature` and log-softmaxed in float32; the divergence is averaged over the selected
    positions and multiplied by temperature**2 (so gradients keep their scale as T changes). No selected
    positions -> 0.0 that still backpropagates (zero gradients).
    """
    _check_kind(kind, beta)
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape {tuple(teacher_logits.shape)}")
    mask = _check_mask(mask, student_logits)
    s, t = student_logits[mask], teacher_logits[mask]  # [N, V]: padded rows never enter the computation
    if s.shape[0] == 0:
        return _empty_loss(s)
    s_logp = F.log_softmax(s.float() / temperature, dim=-1)
    t_logp = F.log_softmax(t.float() / temperature, dim=-1)
    return divergence(t_logp, s_logp, kind, beta).mean() * temperature**2


# ---------------------------------------------------------------------------------------------------------
# sparse (top-k + tail) KD against a logit cache


@torch.no_grad()
def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The sparse teacher distribution a logit cache stores, for logits [..., V] at `temperature`.

    Returns (ids [..., k] int64, logp [..., k] float32 = log-probs of the k largest,
    tail [...] float32 = log of the mass outside the top k, computed as logsumexp(other) - logsumexp(all),
    -inf when k >= V). k is clamped to V.
    """
    _check_temperature(temperature)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    z = teacher_logits.float() / temperature
    k = min(k, z.shape[-1])
    lse = torch.logsumexp(z, dim=-1)
    top, ids = z.topk(k, dim=-1)
    logp = top - lse.unsqueeze(-1)
    if k == z.shape[-1]:
        tail = torch.full_like(lse, float("-inf"))
    else:
        tail = torch.logsumexp(z.scatter(-1, ids, float("-inf")), dim=-1) - lse
    return ids, logp, tail


def _logsumexp_or_neginf(x: Tensor) -> Tensor:
    """logsumexp over the last dim, -inf for rows that are all -inf, with finite gradients in every row."""
    empty = torch.isneginf(x).all(-1, keepdim=True)
    lse = torch.logsumexp(x.masked_fill(empty, 0.0), dim=-1)
    return lse.masked_fill(empty.squeeze(-1), float("-inf"))


def topk_kd_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logp: Tensor,
    teacher_tail: Tensor,
    mask: Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """Sparse KD against a cached top-k teacher (from `teacher_topk` at the same temperature).

    student_logits [B, T, V], teacher_ids / teacher_logp [B, T, k], teacher_tail [B, T], mask [B, T].
    Both distributions are reduced to k+1 bins: the k teacher tokens and one tail bin with all remaining mass
    (student tail = logsumexp of its logits outside teacher_ids minus its logsumexp, in log space).
    With k == V there is no tail bin and the result equals `kd_loss` on the full teacher logits.
    Divergence on the bins, mean over selected positions, times temperature**2.
    """
    _check_kind(kind, beta)
    _check_temperature(temperature)
    mask = _check_mask(mask, student_logits)
    bt, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if teacher_ids.shape != teacher_logp.shape or tuple(teacher_ids.shape[:-1]) != bt:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logp {tuple(teacher_logp.shape)} must both be [B, T, k] "
            f"for student_logits {tuple(student_logits.shape)}"
        )
    if tuple(teacher_tail.shape) != bt:
        raise ValueError(f"teacher_tail shape {tuple(teacher_tail.shape)} must be [B, T] for student_logits {tuple(student_logits.shape)}")
    k = teacher_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher top-k size {k} must be in [1, V={vocab}]")

    s = student_logits[mask]  # [N, V]
    if s.shape[0] == 0:
        return _empty_loss(s)
    ids = teacher_ids[mask].long()  # [N, k]
    t_logp = teacher_logp[mask].float()  # cached teachers may be float16 / bfloat16
    s = s.float() / temperature
    s_lse = torch.logsumexp(s, dim=-1, keepdim=True)
    s_logp = s.gather(-1, ids) - s_lse  # [N, k]
    if k < vocab:  # add the tail bin on both sides
        s_tail = _logsumexp_or_neginf(s.scatter(-1, ids, float("-inf"))) - s_lse.squeeze(-1)
        s_logp = torch.cat([s_logp, s_tail.unsqueeze(-1)], dim=-1)
        t_logp = torch.cat([t_logp, teacher_tail[mask].float().unsqueeze(-1)], dim=-1)
    return divergence(t_logp, s_logp, kind, beta).mean() * temperature**2


# ---------------------------------------------------------------------------------------------------------
# cross-tokenizer KD and metrics


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Universal Logit Distillation (Boizard et al. 2024) for a teacher with a different tokenizer.

    student [B, T, Vs], teacher [B, T, Vt] (Vs != Vt allowed), mask [B, T]. Softmax both at `temperature`,
    sort each descending, zero-pad the shorter to max(Vs, Vt); loss per position = sum of absolute differences
    (Wasserstein-1 between the sorted distributions), mean over selected positions, times temperature**2.
    """
    _check_temperature(temperature)
    mask = _check_mask(mask, student_logits)
    _check_mask(mask, teacher_logits, name="teacher_logits")
    s, t = student_logits[mask], teacher_logits[mask]
    if s.shape[0] == 0:
        return _empty_loss(s)
    s_p = F.softmax(s.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    t_p = F.softmax(t.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(s_p.shape[-1], t_p.shape[-1])
    s_p = F.pad(s_p, (0, width - s_p.shape[-1]))
    t_p = F.pad(t_p, (0, width - t_p.shape[-1]))
    return (s_p - t_p).abs().sum(-1).mean() * temperature**2


@torch.no_grad()
def agreement(student_logits: Tensor, teacher_logits_or_ids: Tensor, mask: Tensor) -> Tensor:
    """Top-1 agreement rate on selected positions: fraction where argmax(student) == argmax(teacher).

    The second argument is teacher logits [B, T, V'] (argmax taken; the caller guarantees ids mean the same in
    both vocabs) or teacher top-1 ids [B, T] (integer). Returns a float32 scalar (0 when nothing is selected).
    """
    mask = _check_mask(mask, student_logits)
    teacher = teacher_logits_or_ids
    if teacher.is_floating_point():
        _check_mask(mask, teacher, name="teacher_logits")
        teacher_ids = teacher.argmax(-1)
    else:
        if tuple(teacher.shape) != tuple(mask.shape):
            raise ValueError(f"teacher ids shape {tuple(teacher.shape)} must be [B, T] = {tuple(mask.shape)}")
        teacher_ids = teacher
    n = int(mask.sum())
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=student_logits.device)
    hits = student_logits[mask].argmax(-1) == teacher_ids[mask].to(student_logits.device)
    return hits.float().sum() / n
