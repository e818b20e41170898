"""FrozenVarianceAdamW: AdamW until the freeze, then a variance that no longer moves for matrices,
so a gradient delivered late as one spike (error feedback) moves a weight as far as when spread."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.trainer.optim import FrozenVarianceAdamW, freeze_variance_step

Params = list[nn.Parameter]


def _pair(freeze_at: int) -> tuple[Params, Params, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    plain = torch.optim.AdamW(a, lr=0.01, weight_decay=0.1, foreach=False)
    frozen = FrozenVarianceAdamW(b, freeze_at=freeze_at, lr=0.01, weight_decay=0.1, foreach=False)
    return a, b, plain, frozen


def _step(params: list[nn.Parameter], opt: torch.optim.Optimizer, grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


def test_equals_adamw_before_the_freeze_then_matrices_keep_their_variance() -> None:
    a, b, plain, frozen = _pair(freeze_at=3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in a]
        _step(a, plain, grads)
        _step(b, frozen, grads)
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)
    v_matrix = frozen.state[b[0]]["exp_avg_sq"].clone()
    v_bias = frozen.state[b[1]]["exp_avg_sq"].clone()
    for _ in range(4):
        grads = [10 * torch.randn(p.shape, generator=gen) for p in a]
        _step(a, plain, grads)
        _step(b, frozen, grads)
    assert torch.equal(frozen.state[b[0]]["exp_avg_sq"], v_matrix)  # frozen
    assert not torch.equal(frozen.state[b[1]]["exp_avg_sq"], v_bias)  # 1-D: plain AdamW, still adapting
    assert int(frozen.state[b[0]]["step"]) == 7
    # After the freeze the larger gradients no longer shrink the matrix's steps as AdamW's do.
    assert not torch.allclose(b[0], a[0])


def test_a_delayed_spike_moves_a_weight_as_far_as_the_spread_gradient() -> None:
    """The failure it fixes: top-k with error feedback delivers 1/p steps of gradient at once.
    AdamW's variance takes the squared spike and shrinks the total move by ~sqrt(1/p)."""
    tau, g = 100, 0.5

    def total_move(opt_cls: type, spike: bool) -> float:
        w = nn.Parameter(torch.zeros(2, 2))
        kwargs = {"freeze_at": 10} if opt_cls is FrozenVarianceAdamW else {}
        opt = opt_cls([w], lr=0.01, weight_decay=0.0, foreach=False, **kwargs)
        for _ in range(10):  # dense warm-up: the true gradient every step
            w.grad = torch.full_like(w, g)
            opt.step()
        start = w.detach().clone()
        for i in range(tau + 50):  # then tau steps of gradient, spread or as one spike; momentum drains
            if spike:
                w.grad = torch.full_like(w, g * tau if i == tau - 1 else 0.0)
            else:
                w.grad = torch.full_like(w, g if i < tau else 0.0)
            opt.step()
        return float((start - w.detach()).mean())

    spread = total_move(FrozenVarianceAdamW, spike=False)
    assert spread == pytest.approx(total_move(torch.optim.AdamW, spike=False), rel=0.05)
    assert total_move(FrozenVarianceAdamW, spike=True) == pytest.approx(spread, rel=0.05)
    assert total_move(torch.optim.AdamW, spike=True) < 0.5 * spread


def test_zero_variance_entries_are_floored() -> None:
    w = nn.Parameter(torch.zeros(2, 50))
    opt = FrozenVarianceAdamW([w], freeze_at=1, lr=0.01, weight_decay=0.0, foreach=False)
    w.grad = torch.cat([torch.ones(1, 50), torch.zeros(1, 50)])  # row 1 unseen in the warm-up
    opt.step()
    w.grad = torch.ones(2, 50)
    opt.step()
    # Row 1 moves by a bounded step (its variance floored at 1e-4 of the mean: 1/sqrt(5e-5) ~ 141
    # times the step size at most), not by grad/eps.
    assert float(w.detach()[1].abs().max()) < 0.01 * 0.1 / (1 - 0.9**2) * 200


def test_freeze_step_counts_optimizer_steps() -> None:
    assert freeze_variance_step(10, 1) == 10
    # The hook counts micro-batches: optimizer step 3 holds its 9th to 12th, partly compressed.
    assert freeze_variance_step(10, 4) == 2
    assert freeze_variance_step(0, 1) == 1
    with pytest.raises(ValueError, match="freeze_at"):
        FrozenVarianceAdamW([nn.Parameter(torch.zeros(2, 2))], freeze_at=0)


def test_a_sent_momentum_replaces_the_first_moment() -> None:
    """Momentum compression: after the freeze a matrix's ``grad`` is already the momentum (the
    ranks' mean sent m = 0.9 m + 0.1 g). Fed the momentum of the same gradients, the optimizer
    takes the steps it takes when it forms that momentum itself; 1-D tensors keep their gradient."""
    _, b, _, frozen = _pair(freeze_at=3)
    c = [nn.Parameter(p.detach().clone()) for p in b]
    d = [nn.Parameter(p.detach().clone()) for p in b]
    sent = FrozenVarianceAdamW(c, freeze_at=3, grad_is_momentum=lambda p: True, lr=0.01, weight_decay=0.1)
    raw = FrozenVarianceAdamW(d, freeze_at=3, grad_is_momentum=lambda p: True, lr=0.01, weight_decay=0.1)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):  # the dense warm-up: plain AdamW on all
        grads = [torch.randn(p.shape, generator=gen) for p in b]
        for params, opt in ((b, frozen), (c, sent), (d, raw)):
            _step(params, opt, grads)
    m = frozen.state[b[0]]["exp_avg"].clone()
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in b]
        m = 0.9 * m + 0.1 * grads[0]
        _step(b, frozen, grads)
        _step(c, sent, [m, grads[1]])
        _step(d, raw, grads)  # the control: gradients taken for momenta
        torch.testing.assert_close(sent.state[c[0]]["exp_avg"], m, rtol=0, atol=0)
    for pb, pc in zip(b, c, strict=True):
        torch.testing.assert_close(pc, pb, rtol=1e-6, atol=1e-7)
    assert float((d[0] - b[0]).detach().abs().max()) > 1e-3


def test_the_frozen_update_runs_in_slices_and_equals_the_whole_tensor_update() -> None:
    """After the freeze a matrix's update runs over flat slices (temporaries of one slice, not of the
    parameter): the weights are those of the update over the whole tensor, bit for bit."""
    torch.manual_seed(0)
    start = [torch.randn(6, 50), torch.randn(50), torch.randn(3, 7).t()]  # the last one not contiguous
    runs = {}
    for slice_elements in (1 << 22, 7):
        params = [nn.Parameter(t.clone()) for t in start]
        opt = FrozenVarianceAdamW(
            params, freeze_at=2, lr=0.01, weight_decay=0.1, foreach=False, slice_elements=slice_elements
        )
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            _step(params, opt, [torch.randn(p.shape, generator=gen) for p in params])
        runs[slice_elements] = params
    for whole, sliced in zip(runs[1 << 22], runs[7], strict=True):
        assert torch.equal(whole, sliced)
    assert not torch.equal(runs[7][0], start[0])
