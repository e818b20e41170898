"""The compiled chunk function of the fused head + loss gives what the eager one gives."""

from __future__ import annotations

import pytest
import torch

from kdistill.trainer import compile as kd_compile
from kdistill.trainer.fused_head_loss import TeacherHead, TopKTeacher, fused_head_kd_loss


def _loss(teacher: object, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    loss, kd, ce = fused_head_kd_loss(hidden, weight, None, teacher, labels, alpha=0.7, temperature=2.0, chunk_rows=24)
    grads = torch.autograd.grad(loss, [hidden, weight])
    return [loss.detach(), kd, ce, *grads]


def test_compiled_chunks_equal_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(64, 16, generator=g)).requires_grad_()
    labels = torch.randint(64, (50,), generator=g)
    t_hidden, t_weight = torch.randn(50, 8, generator=g), torch.randn(64, 8, generator=g)
    values, indices = (t_hidden @ t_weight.t()).topk(16, dim=-1)
    lse = (t_hidden @ t_weight.t()).logsumexp(-1)
    teachers = [TeacherHead(t_hidden, t_weight), TopKTeacher(values, indices, lse)]
    monkeypatch.setenv("KDISTILL_COMPILE", "0")
    eager = [_loss(t, hidden, weight, labels) for t in teachers]
    monkeypatch.setenv("KDISTILL_COMPILE", "1")
    compiled = [_loss(t, hidden, weight, labels) for t in teachers]
    for want, got in zip(eager, compiled, strict=True):
        for a, b in zip(want, got, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_switch_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDISTILL_COMPILE", raising=False)
    assert not kd_compile.compile_enabled()
    monkeypatch.setenv("KDISTILL_COMPILE", "yes")
    with pytest.raises(ValueError, match="KDISTILL_COMPILE"):
        kd_compile.compile_enabled()
