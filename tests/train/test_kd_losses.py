"""Knowledge-distillation losses, checked against hand-written formulas and by their gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slmctl.train.kd_losses import KINDS, agreement, divergence, kd_loss, teacher_topk, topk_kd_loss, uld_loss


def logits(b=3, t=5, v=16, seed=0, scale=2.0):
    """Seeded student logits, teacher logits and a mask with some padded positions."""
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(b, t, v, generator=g)
    te = scale * torch.randn(b, t, v, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    mask[-1, 1:] = False
    return s, te, mask


def grad_of(fn, s):
    s = s.clone().requires_grad_(True)
    loss = fn(s)
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", [*KINDS, "uld"])
def test_zero_when_equal_positive_otherwise(kind, temperature):
    s, t, mask = logits()

    def loss(a, b):
        if kind == "uld":
            return uld_loss(a, b, mask, temperature=temperature)
        return kd_loss(a, b, mask, kind=kind, temperature=temperature)

    assert abs(loss(s, s).item()) < 1e-6
    assert loss(s, t).item() > 1e-2


def test_kl_matches_kl_div_by_hand():
    s, t, mask = logits()
    ls, lt = F.log_softmax(s[mask], -1), F.log_softmax(t[mask], -1)
    n = int(mask.sum())
    forward = F.kl_div(ls, lt, log_target=True, reduction="sum") / n  # KL(teacher || student)
    reverse = F.kl_div(lt, ls, log_target=True, reduction="sum") / n
    torch.testing.assert_close(kd_loss(s, t, mask, "forward_kl"), forward, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd_loss(s, t, mask, "reverse_kl"), reverse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_brute_force(beta):
    s, t, mask = logits()
    p = F.softmax(t[mask].double(), -1)  # teacher
    q = F.softmax(s[mask].double(), -1)  # student
    m = beta * p + (1 - beta) * q
    expected = (beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)).mean()
    assert kd_loss(s, t, mask, "jsd", beta=beta).item() == pytest.approx(expected.item(), rel=1e-5)


def test_zero_probability_entries_give_no_nan():
    s, t, mask = logits(b=2, t=3, v=8)
    t[..., :3] = float("-inf")  # teacher gives these tokens zero probability
    for kind in ("forward_kl", "jsd"):
        loss, grad = grad_of(lambda x, kind=kind: kd_loss(x, t, mask, kind), s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # both sides zero on an entry: it contributes nothing to any kind
    lp = torch.tensor([[0.0, float("-inf")]])
    for kind in KINDS:
        x = lp.clone().requires_grad_(True)
        d = divergence(lp, x, kind)
        d.sum().backward()
        assert d.item() == 0.0 and torch.isfinite(x.grad).all()
    assert torch.isinf(divergence(lp, torch.log(torch.tensor([[0.5, 0.5]])), "reverse_kl")).all()  # student mass where teacher has none


def test_forward_kl_gradient_is_softmax_difference():
    s, t, mask = logits()
    _, grad = grad_of(lambda x: kd_loss(x, t, mask, "forward_kl"), s)
    n = int(mask.sum())
    expected = (F.softmax(s[mask], -1) - F.softmax(t[mask], -1)) / n
    torch.testing.assert_close(grad[mask], expected, atol=1e-6, rtol=0)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_step_lowers_loss(kind):
    s, t, mask = logits()
    loss, grad = grad_of(lambda x: kd_loss(x, t, mask, kind), s)
    assert kd_loss(s - 0.5 * grad, t, mask, kind).item() < loss.item()


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_scaling(kind):
    s, t, mask = logits()
    for temp in (0.5, 2.0, 4.0):
        torch.testing.assert_close(kd_loss(s, t, mask, kind, temperature=temp), temp**2 * kd_loss(s / temp, t / temp, mask, kind))


@pytest.mark.parametrize("kind", [*KINDS, "uld", "topk"])
def test_padding_contributes_nothing(kind):
    s, t, mask = logits()

    def loss(a, b):
        if kind == "uld":
            return uld_loss(a, b, mask)
        if kind == "topk":
            return topk_kd_loss(a, *teacher_topk(b, 4), mask)
        return kd_loss(a, b, mask, kind)

    ref_loss, ref_grad = grad_of(lambda x: loss(x, t), s)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = float("nan")
    s2[0, 4, 0] = float("inf")
    t2[~mask] = float("-inf")
    t2[2, 2, 1] = float("nan")
    new_loss, new_grad = grad_of(lambda x: loss(x, t2), s2)
    torch.testing.assert_close(new_loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(new_grad, ref_grad, rtol=0, atol=0)
    assert (new_grad[~mask] == 0).all()


def test_all_false_mask_gives_zero_and_backward_works():
    s, t, mask = logits()
    s[0, 0, 0] = float("nan")  # padded everywhere, so even a nan must not leak
    none = torch.zeros_like(mask)
    for fn in (lambda x: kd_loss(x, t, none, "jsd"), lambda x: uld_loss(x, t, none), lambda x: topk_kd_loss(x, *teacher_topk(t, 4), none)):
        loss, grad = grad_of(fn, s)
        assert loss.item() == 0.0 and (grad == 0).all()
    assert agreement(s, t, none).item() == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_full_vocab_equals_dense(kind, temperature):
    s, t, mask = logits(v=16)
    cache = teacher_topk(t, k=16, temperature=temperature)
    assert torch.isneginf(cache[2]).all()
    dense, dense_grad = grad_of(lambda x: kd_loss(x, t, mask, kind, temperature=temperature), s)
    sparse, sparse_grad = grad_of(lambda x: topk_kd_loss(x, *cache, mask, kind, temperature=temperature), s)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(sparse_grad).all()
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_close_to_dense_for_peaked_teacher(kind):
    g = torch.Generator().manual_seed(1)
    b, t_len, v, k = 2, 6, 64, 8
    t = torch.randn(b, t_len, v, generator=g)
    top = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b * t_len)]).view(b, t_len, k)
    t.scatter_add_(-1, top, torch.full((b, t_len, k), 10.0) + torch.randn(b, t_len, k, generator=g))
    s = t + 0.5 * torch.randn(b, t_len, v, generator=g)  # a student that roughly follows the teacher
    mask = torch.ones(b, t_len, dtype=torch.bool)
    ids, logp, tail = teacher_topk(t, k)
    assert (logp.exp().sum(-1) > 0.99).all()
    dense = kd_loss(s, t, mask, kind).item()
    sparse = topk_kd_loss(s, ids, logp, tail, mask, kind).item()
    assert abs(sparse - dense) < 1e-2 or abs(sparse - dense) < 0.05 * dense


def test_topk_tail_bin_matters():
    s, t, mask = logits(v=32, scale=1.0)
    ids, logp, tail = teacher_topk(t, 4)
    assert (tail.exp() > 0.3).all()  # a flat teacher: most mass is outside the top 4
    with_tail = topk_kd_loss(s, ids, logp, tail, mask)
    without = topk_kd_loss(s, ids, logp, torch.full_like(tail, float("-inf")), mask)
    assert torch.isfinite(without) and abs(with_tail.item() - without.item()) > 0.1


def test_teacher_topk_values():
    _, t, _ = logits(v=64, scale=1.5)
    for temp in (1.0, 2.0):
        ids, logp, tail = teacher_topk(t.half(), 8, temperature=temp)
        assert ids.dtype == torch.int64 and logp.dtype == tail.dtype == torch.float32
        assert ids.shape == logp.shape == (3, 5, 8) and tail.shape == (3, 5)
        ref = F.log_softmax(t.half().float() / temp, -1)
        torch.testing.assert_close(logp, ref.gather(-1, ids))
        assert (ids == ref.topk(8, -1).indices).all()
        expected_tail = torch.log1p(-logp.double().exp().sum(-1))
        torch.testing.assert_close(tail.double(), expected_tail, rtol=0, atol=1e-5)
    ids, logp, tail = teacher_topk(t, 100)  # k clamped to V
    assert ids.shape[-1] == 64 and torch.isneginf(tail).all()


def test_topk_accepts_half_precision_teacher():
    s, t, mask = logits(v=32)
    ids, logp, tail = teacher_topk(t, 6)
    full = topk_kd_loss(s, ids, logp, tail, mask, "jsd")
    for dtype in (torch.float16, torch.bfloat16):
        loss, grad = grad_of(lambda x, dtype=dtype: topk_kd_loss(x, ids, logp.to(dtype), tail.to(dtype), mask, "jsd"), s)
        assert loss.dtype == torch.float32 and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, full, rtol=2e-2, atol=1e-3)


def test_uld_matches_numpy_and_ignores_vocab_order():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 4, 50, generator=g), 2 * torch.randn(2, 4, 70, generator=g)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    for temp in (1.0, 2.0):
        rows = []
        for a, b in zip(s[mask].double().numpy(), t[mask].double().numpy()):
            pa, pb = np.exp(a / temp - np.log(np.exp(a / temp).sum())), np.exp(b / temp - np.log(np.exp(b / temp).sum()))
            pa, pb = np.sort(pa)[::-1], np.sort(pb)[::-1]
            pa = np.pad(pa, (0, 70 - 50))
            rows.append(np.abs(pa - pb).sum())
        expected = temp**2 * np.mean(rows)
        assert uld_loss(s, t, mask, temperature=temp).item() == pytest.approx(expected, rel=1e-5)
    loss = uld_loss(s, t, mask)
    permuted = uld_loss(s[..., torch.randperm(50, generator=g)], t[..., torch.randperm(70, generator=g)], mask)
    torch.testing.assert_close(permuted, loss)
    torch.testing.assert_close(uld_loss(t, s, mask), loss)  # symmetric, works either way round
    _, grad = grad_of(lambda x: uld_loss(x, t, mask), s)
    assert grad[mask].abs().sum() > 0


def test_agreement_hand_built():
    s = torch.zeros(1, 5, 4)
    for pos, top in enumerate([0, 1, 2, 3, 0]):
        s[0, pos, top] = 1.0
    teacher_ids = torch.tensor([[0, 1, 3, 3, 2]])
    mask = torch.tensor([[True, True, True, True, False]])  # the miss at position 4 is padding
    assert agreement(s, teacher_ids, mask).item() == 0.75
    teacher_logits = F.one_hot(teacher_ids, 6).float()  # a wider teacher vocab works too
    assert agreement(s, teacher_logits, mask).item() == 0.75
    assert agreement(s, teacher_ids, torch.ones_like(mask)).item() == pytest.approx(0.6)


def test_errors_name_the_problem():
    s, t, mask = logits()
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd"):
        kd_loss(s, t, mask, kind="kl")
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="beta"):
            kd_loss(s, t, mask, kind="jsd", beta=beta)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, mask, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(3, 5, 16\).*\(3, 5, 12\)"):
        kd_loss(s, t[..., :12], mask)
    with pytest.raises(ValueError, match=r"mask shape \(3, 4\)"):
        kd_loss(s, t, mask[:, :4])
    ids, logp, tail = teacher_topk(t, 4)
    with pytest.raises(ValueError, match=r"teacher_tail shape \(3, 4\)"):
        topk_kd_loss(s, ids, logp, tail[:, :4], mask)
    with pytest.raises(ValueError, match=r"\(3, 5, 4\).*\(3, 5, 3\)"):
        topk_kd_loss(s, ids, logp[..., :3], tail, mask)
    with pytest.raises(ValueError, match="valid kinds"):
        divergence(logp, logp, "tvd")
