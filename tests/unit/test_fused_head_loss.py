"""The fused, chunked head + loss equals the plain path (head, then kd_divergence /
topk_kd_divergence, hard_label_ce and kd_objective) in value and gradient, in float64."""

from __future__ import annotations

import pytest
import torch

from kdistill.trainer.fused_head_loss import TeacherHead, TopKTeacher, fused_head_kd_loss
from kdistill.trainer.losses import hard_label_ce, kd_divergence, kd_objective, topk_kd_divergence

N, H, V, K = 37, 8, 50, 12
TOL = 1e-6


def _inputs(seed: int, bias: bool = True) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(V, (N,), generator=g)
    labels[3] = -100
    t_hidden = torch.randn(N, 6, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V, 6, generator=g, dtype=torch.float64)
    return {
        "hidden": torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_(),
        "weight": torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_(),
        "bias": torch.randn(V, generator=g, dtype=torch.float64).requires_grad_() if bias else None,
        "labels": labels,
        "t_hidden": t_hidden,
        "t_weight": t_weight,
        "row_weights": torch.rand(N, generator=g, dtype=torch.float64) + 0.1,
    }


def _grads(loss: torch.Tensor, x: dict[str, torch.Tensor | None]) -> list[torch.Tensor]:
    params = [p for p in (x["hidden"], x["weight"], x["bias"]) if p is not None]
    return list(torch.autograd.grad(loss, params))


def _plain(x: dict, kd_fn, alpha: float, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = x["hidden"] @ x["weight"].t()
    if x["bias"] is not None:
        logits = logits + x["bias"]
    kd = kd_fn(logits)
    ce = hard_label_ce(logits, x["labels"])
    return kd_objective(kd, ce, alpha, weights=weights), kd


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [5, 64])
@pytest.mark.parametrize("weighted", [False, True])
def test_dense_teacher_head_equals_plain_loss_and_gradient(temperature: float, chunk: int, weighted: bool) -> None:
    x = _inputs(0)
    w = x["row_weights"] if weighted else None
    t_logits = x["t_hidden"] @ x["t_weight"].t()
    plain, plain_kd = _plain(x, lambda s: kd_divergence(s, t_logits, "forward-kl", temperature), 0.7, w)
    plain_grads = _grads(plain, x)
    for teacher in (t_logits, TeacherHead(x["t_hidden"], x["t_weight"])):
        fused, kd_rows, ce_rows = fused_head_kd_loss(
            x["hidden"],
            x["weight"],
            x["bias"],
            teacher,
            x["labels"],
            alpha=0.7,
            temperature=temperature,
            row_weights=w,
            chunk_rows=chunk,
        )
        assert abs(float(fused.detach()) - float(plain.detach())) < TOL
        assert torch.allclose(kd_rows, plain_kd.detach(), atol=TOL, rtol=0)
        assert float(ce_rows[3]) == 0.0  # ignored label
        for a, b in zip(_grads(fused, x), plain_grads, strict=True):
            assert torch.allclose(a, b, atol=TOL, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [K, V])
def test_topk_teacher_equals_plain_topk_loss_and_gradient(tail: bool, temperature: float, k: int) -> None:
    x = _inputs(1, bias=False)
    t_logits = x["t_hidden"] @ x["t_weight"].t()
    lse = torch.logsumexp(t_logits, dim=-1) if tail else None
    values, indices = t_logits.topk(k, dim=-1)  # k == V: no tail bucket even with the log-sum-exp

    def kd_fn(s: torch.Tensor) -> torch.Tensor:
        return topk_kd_divergence(s, values, indices, "forward-kl", temperature, teacher_logsumexp=lse)

    plain, plain_kd = _plain(x, kd_fn, 0.5, None)
    fused, kd_rows, _ = fused_head_kd_loss(
        x["hidden"],
        x["weight"],
        None,
        TopKTeacher(values, indices, lse),
        x["labels"],
        alpha=0.5,
        temperature=temperature,
        chunk_rows=7,
    )
    assert abs(float(fused.detach()) - float(plain.detach())) < TOL
    assert torch.allclose(kd_rows, plain_kd.detach(), atol=TOL, rtol=0)
    for a, b in zip(_grads(fused, x), _grads(plain, x), strict=True):
        assert torch.allclose(a, b, atol=TOL, rtol=0), (a - b).abs().max()


def test_gradient_scales_with_the_incoming_gradient_and_float32_runs() -> None:
    x = _inputs(2)
    teacher = x["t_hidden"] @ x["t_weight"].t()
    loss, _, _ = fused_head_kd_loss(x["hidden"], x["weight"], x["bias"], teacher, x["labels"], alpha=0.3, temperature=2)
    (g1,) = torch.autograd.grad(loss, [x["hidden"]])
    loss, _, _ = fused_head_kd_loss(x["hidden"], x["weight"], x["bias"], teacher, x["labels"], alpha=0.3, temperature=2)
    (g3,) = torch.autograd.grad(3.0 * loss, [x["hidden"]])
    assert torch.allclose(3.0 * g1, g3, atol=1e-12)
    h32 = x["hidden"].detach().float().requires_grad_()
    w32 = x["weight"].detach().float().requires_grad_()
    loss32, _, _ = fused_head_kd_loss(h32, w32, None, teacher.float(), x["labels"], alpha=0.3, temperature=2)
    loss32.backward()
    assert h32.grad is not None and h32.grad.dtype == torch.float32 and torch.isfinite(h32.grad).all()


def test_rejects_bad_shapes_and_settings() -> None:
    x = _inputs(3)
    teacher = torch.zeros(N, V, dtype=torch.float64)
    with pytest.raises(ValueError, match="hidden"):
        fused_head_kd_loss(x["hidden"][:, :4], x["weight"], None, teacher, x["labels"], alpha=0.5, temperature=1)
    with pytest.raises(ValueError, match="alpha"):
        fused_head_kd_loss(x["hidden"], x["weight"], None, teacher, x["labels"], alpha=1.5, temperature=1)
    with pytest.raises(ValueError, match="labels"):
        fused_head_kd_loss(x["hidden"], x["weight"], None, teacher, x["labels"][:3], alpha=0.5, temperature=1)
