"""Distillation losses against direct formulas, gradchecks, chunking and top-k tail handling."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.profiler import ProfilerActivity, profile

from kdistill.trainer.losses import (
    hard_label_ce,
    kd_divergence,
    kd_objective,
    topk_kd_divergence,
    weighted_mean,
)

KINDS = ["forward-kl", "reverse-kl", "jsd"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # These tensors are tiny: intra-op threads only add wake-up latency (large on a busy machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logits(n: int, v: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    return s, t


def _direct(p: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    """Divergence between probability rows p (teacher) and q (student), written out term by term."""
    out = []
    for pr, qr in zip(p.tolist(), q.tolist(), strict=True):
        if kind == "forward-kl":
            out.append(sum(a * math.log(a / b) for a, b in zip(pr, qr, strict=True) if a > 0))
        elif kind == "reverse-kl":
            out.append(sum(b * math.log(b / a) for a, b in zip(pr, qr, strict=True) if b > 0))
        else:
            m = [(a + b) / 2 for a, b in zip(pr, qr, strict=True)]
            kl_pm = sum(a * math.log(a / c) for a, c in zip(pr, m, strict=True) if a > 0)
            kl_qm = sum(b * math.log(b / c) for b, c in zip(qr, m, strict=True) if b > 0)
            out.append(0.5 * kl_pm + 0.5 * kl_qm)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_divergence_matches_direct_formula_with_t_squared(kind: str, temperature: float) -> None:
    s, t = _logits(5, 11, seed=1)
    got = kd_divergence(s, t, kind, temperature)  # type: ignore[arg-type]
    p = torch.softmax(t / temperature, dim=-1)
    q = torch.softmax(s / temperature, dim=-1)
    want = _direct(p, q, kind) * temperature**2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_divergences_are_zero_on_equal_logits_and_positive_otherwise() -> None:
    s, t = _logits(4, 9, seed=2)
    for kind in KINDS:
        assert torch.allclose(kd_divergence(t, t, kind, 3.0), torch.zeros(4, dtype=torch.float64), atol=1e-12)  # type: ignore[arg-type]
        assert bool((kd_divergence(s, t, kind, 3.0) > 0).all())  # type: ignore[arg-type]
    # JSD is bounded by log 2 before the T² factor.
    assert bool((kd_divergence(s * 50, t * 50, "jsd", 1.0) <= math.log(2) + 1e-12).all())


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_values_and_grads(kind: str) -> None:
    s0, t0 = _logits(23, 17, seed=3)
    results = []
    for chunk in (1, 4, 23, 1024):
        s = s0.clone().requires_grad_(True)
        t = t0.clone().requires_grad_(True)
        out = kd_divergence(s, t, kind, 2.0, chunk_rows=chunk)  # type: ignore[arg-type]
        (out * torch.arange(23, dtype=torch.float64)).sum().backward()
        assert s.grad is not None and t.grad is not None
        results.append((out.detach(), s.grad, t.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_kd_divergence(kind: str) -> None:
    s, t = _logits(5, 6, seed=4)
    s.requires_grad_(True)
    t.requires_grad_(True)
    # chunk_rows=2 runs the checkpointed path, over three chunks.
    assert gradcheck(lambda a, b: kd_divergence(a, b, kind, 1.7, chunk_rows=2), (s, t), fast_mode=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_topk_with_and_without_tail(kind: str) -> None:
    s, t = _logits(4, 9, seed=5)
    values, indices = t.topk(4, dim=-1)
    lse = t.logsumexp(dim=-1)
    s.requires_grad_(True)
    values.requires_grad_(True)
    assert gradcheck(
        lambda a, v: topk_kd_divergence(a, v, indices, kind, 2.0, chunk_rows=3, teacher_logsumexp=lse),  # type: ignore[arg-type]
        (s, values),
        fast_mode=True,
    )
    assert gradcheck(
        lambda a, v: topk_kd_divergence(a, v, indices, kind, 2.0, chunk_rows=3), (s, values), fast_mode=True
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("with_lse", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_forward_kl_closed_form_gradient(with_lse: bool, temperature: float) -> None:
    # A frozen teacher's cached values take _TopKForwardKL (closed-form backward); values that
    # require grad take the autograd path. Both must give the same numbers and gradients, and the
    # closed form must pass gradcheck against finite differences (chunked and unchunked).
    s0, t = _logits(7, 13, seed=15)
    values, idx = t.topk(5, dim=-1)
    lse = t.logsumexp(dim=-1) if with_lse else None
    w = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    outs = []
    for values_grad in (False, True):
        s = s0.clone().requires_grad_(True)
        v = values.clone().requires_grad_(values_grad)
        out = topk_kd_divergence(s, v, idx, "forward-kl", temperature, chunk_rows=4, teacher_logsumexp=lse)
        (out * w).sum().backward()
        assert s.grad is not None
        outs.append((out.detach(), s.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-10, atol=1e-12)
    # Not trivially zero: the tail positions get gradient too when the tail is modelled.
    tail = torch.ones_like(s0, dtype=torch.bool).scatter_(-1, idx, False)
    assert bool((outs[0][1][tail].abs() > 0).any()) == with_lse
    for chunk in (3, 1024):
        s = s0.clone().requires_grad_(True)
        assert gradcheck(
            lambda a, c=chunk: topk_kd_divergence(
                a, values, idx, "forward-kl", temperature, chunk_rows=c, teacher_logsumexp=lse
            ),
            (s,),
        )


def test_topk_rejects_repeated_indices() -> None:
    s, t = _logits(2, 6, seed=16)
    with pytest.raises(ValueError, match="distinct"):
        topk_kd_divergence(s, t[:, :3], torch.tensor([[0, 1, 2], [4, 1, 4]]), "forward-kl", 1.0)


def test_gradcheck_ce_and_objective() -> None:
    s, _ = _logits(6, 5, seed=6)
    s.requires_grad_(True)
    labels = torch.tensor([0, 4, -100, 2, 1, -100])
    assert gradcheck(lambda a: hard_label_ce(a, labels, chunk_rows=4), (s,))
    kd = torch.rand(6, dtype=torch.float64, requires_grad=True)
    ce = torch.rand(6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64) + 0.5
    mask = torch.tensor([1.0, 1, 0, 1, 1, 0], dtype=torch.float64)
    assert gradcheck(lambda a, b: kd_objective(a, b, 0.3, mask=mask, weights=w), (kd, ce))


@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_k_equal_vocab_equals_full(kind: str) -> None:
    s, t = _logits(6, 13, seed=7)
    # Shuffled order: bucket order must not matter.
    perm = torch.stack([torch.randperm(13, generator=torch.Generator().manual_seed(i)) for i in range(6)])
    values = t.gather(-1, perm)
    full = kd_divergence(s, t, kind, 2.0)  # type: ignore[arg-type]
    with_lse = topk_kd_divergence(s, values, perm, kind, 2.0, teacher_logsumexp=t.logsumexp(-1))  # type: ignore[arg-type]
    without = topk_kd_divergence(s, values, perm, kind, 2.0)  # type: ignore[arg-type]
    torch.testing.assert_close(with_lse, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(without, full, rtol=1e-10, atol=1e-12)


def _coarsen(logits: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exact k+1 bucket probabilities: the chosen tokens, then everything else summed."""
    p = torch.softmax(logits / temperature, dim=-1)
    top = p.gather(-1, idx)
    return torch.cat([top, 1 - top.sum(-1, keepdim=True)], dim=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_tail_bucket_is_exact_at_t1(kind: str) -> None:
    s, t = _logits(5, 20, seed=8)
    values, idx = t.topk(6, dim=-1)
    got = topk_kd_divergence(s, values, idx, kind, 1.0, teacher_logsumexp=t.logsumexp(-1))  # type: ignore[arg-type]
    want = _direct(_coarsen(t, idx, 1.0), _coarsen(s, idx, 1.0), kind)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # The tail is not ignored: dropping the lse (renormalised top-k) gives a different value.
    assert not torch.allclose(topk_kd_divergence(s, values, idx, kind, 1.0), got)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_student_tail_of_a_peaked_student_in_fp32_matches_fp64(kind: str) -> None:
    # The student's tail is log(1 - top mass) from two log-sum-exps: check it where that
    # subtraction is hardest, a student whose top-k holds all but ~1e-3 of its mass.
    s, t = _logits(6, 256, seed=11)
    values, idx = t.topk(16, dim=-1)
    s = s.scatter(-1, idx, s.gather(-1, idx) + 12.0)  # the student piles its mass on the teacher's top-k
    tail = _coarsen(s, idx, 1.0)[:, -1]
    assert bool(((tail > 1e-5) & (tail < 1e-2)).all())
    want = _direct(_coarsen(t, idx, 1.0), _coarsen(s, idx, 1.0), kind)
    got = topk_kd_divergence(
        s.float(),
        values.float(),
        idx,
        kind,
        1.0,  # type: ignore[arg-type]
        teacher_logsumexp=t.logsumexp(-1).float(),
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-6)


def test_student_tail_below_rounding_stays_finite_with_finite_gradients() -> None:
    # A student tail far below fp32 resolution is floored (~1e-6), never log(0).
    s, t = _logits(4, 64, seed=12)
    values, idx = t.topk(8, dim=-1)
    s = s.float().scatter(-1, idx, 60.0).requires_grad_(True)
    for kind in KINDS:
        got = topk_kd_divergence(
            s,
            values.float(),
            idx,
            kind,
            1.0,  # type: ignore[arg-type]
            teacher_logsumexp=t.logsumexp(-1).float(),
        )
        (grad,) = torch.autograd.grad(got.sum(), s)
        assert bool(torch.isfinite(got).all()) and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("kind", KINDS)
def test_topk_tail_is_exact_at_any_t_when_the_tail_is_flat(kind: str) -> None:
    s, t = _logits(4, 16, seed=9)
    k = 5
    idx = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(10 + i))[:k] for i in range(4)])
    flat = torch.full_like(t, -1.0)
    t_flat = flat.scatter(-1, idx, t.gather(-1, idx) + 3.0)  # the tail tokens share one logit
    values = t_flat.gather(-1, idx)
    got = topk_kd_divergence(s, values, idx, kind, 3.0, teacher_logsumexp=t_flat.logsumexp(-1))  # type: ignore[arg-type]
    want = _direct(_coarsen(t_flat, idx, 3.0), _coarsen(s, idx, 3.0), kind) * 9.0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_topk_without_lse_renormalises_over_the_top_k() -> None:
    s, t = _logits(3, 12, seed=11)
    values, idx = t.topk(4, dim=-1)
    got = topk_kd_divergence(s, values, idx, "forward-kl", 2.0)
    want = _direct(torch.softmax(values / 2, -1), torch.softmax(s.gather(-1, idx) / 2, -1), "forward-kl") * 4
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_topk_tail_survives_fp16_rounding_of_cached_values() -> None:
    # A peaked teacher whose fp16 top-k mass rounds to >= exp(lse): the tail must stay finite.
    s, t = _logits(4, 30, seed=12)
    t = t.float()
    t[:, 0] += 40.0
    values, idx = t.topk(3, dim=-1)
    values = values.half().float() + 1e-3
    s32 = s.float().requires_grad_(True)
    for kind in KINDS:
        out = topk_kd_divergence(s32, values, idx, kind, 2.0, teacher_logsumexp=t.logsumexp(-1))  # type: ignore[arg-type]
        out.sum().backward()
        assert bool(torch.isfinite(out).all()) and s32.grad is not None and bool(torch.isfinite(s32.grad).all())
        s32.grad = None


def test_hard_label_ce_matches_direct_and_zeroes_ignored_rows() -> None:
    s, _ = _logits(5, 7, seed=13)
    labels = torch.tensor([3, -100, 0, 6, -100])
    got = hard_label_ce(s, labels, chunk_rows=2)
    logp = torch.log_softmax(s, dim=-1)
    want = torch.tensor([-logp[0, 3], 0.0, -logp[2, 0], -logp[3, 6], 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="out of range"):
        hard_label_ce(s, torch.tensor([0, 1, 2, 7, 0]))


def test_weighted_means_per_token_and_per_sample() -> None:
    rows = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    assert float(weighted_mean(rows)) == pytest.approx(22.0)
    assert float(weighted_mean(rows, mask)) == pytest.approx(2.5)
    w = torch.tensor([3.0, 1.0, 0.0, 0.0, 5.0])
    assert float(weighted_mean(rows, mask, w)) == pytest.approx((3 * 1 + 1 * 2) / 4)
    # Per token: a sample weight expanded over that sample's tokens weighs each of its tokens.
    per_token = torch.tensor([1.0, 1.0, 1.0, 10.0])  # sample A has 3 tokens, sample B 1
    sample_w = torch.tensor([0.5, 1.5])
    token_w = sample_w.repeat_interleave(torch.tensor([3, 1]))
    assert float(weighted_mean(per_token, weights=token_w)) == pytest.approx((1.5 + 15.0) / 3.0)
    # Masked-out rows may hold NaN without poisoning the mean; no valid row gives 0 with a graph.
    nan_rows = torch.tensor([1.0, float("nan")], requires_grad=True)
    assert float(weighted_mean(nan_rows, torch.tensor([1.0, 0.0])).detach()) == 1.0
    empty = weighted_mean(nan_rows.detach().nan_to_num().requires_grad_(True), torch.zeros(2))
    assert float(empty.detach()) == 0.0
    empty.backward()


def test_kd_objective_mixes_by_alpha() -> None:
    kd = torch.tensor([1.0, 3.0, 5.0])
    ce = torch.tensor([2.0, 2.0, 8.0])
    mask = torch.tensor([1.0, 1.0, 0.0])
    assert float(kd_objective(kd, ce, 0.7, mask=mask)) == pytest.approx(0.7 * 2.0 + 0.3 * 2.0)
    assert float(kd_objective(kd, ce, 1.0)) == pytest.approx(3.0)
    assert float(kd_objective(kd, ce, 0.0)) == pytest.approx(4.0)
    w = torch.tensor([1.0, 3.0, 1.0])
    assert float(kd_objective(kd, ce, 0.5, weights=w)) == pytest.approx(0.5 * 15 / 5 + 0.5 * 16 / 5)
    with pytest.raises(ValueError, match="alpha"):
        kd_objective(kd, ce, 1.5)


def test_bad_inputs_raise_clear_errors() -> None:
    s, t = _logits(3, 5, seed=14)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        kd_divergence(s, t, "kl", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        kd_divergence(s, t, "jsd", 0.0)
    with pytest.raises(ValueError, match="equal shapes"):
        kd_divergence(s, t[:, :4], "jsd", 1.0)
    with pytest.raises(ValueError, match="out of range"):
        topk_kd_divergence(s, t[:, :2], torch.tensor([[0, 5]] * 3), "jsd", 1.0)
    with pytest.raises(ValueError, match="teacher_logsumexp"):
        topk_kd_divergence(s, t[:, :2], torch.tensor([[0, 1]] * 3), "jsd", 1.0, teacher_logsumexp=torch.zeros(2))


def test_empty_batch_gives_empty_rows_and_backward_works() -> None:
    s = torch.zeros(0, 8, requires_grad=True)
    out = kd_divergence(s, torch.zeros(0, 8), "forward-kl", 2.0)
    assert out.shape == (0,)
    kd_objective(out, hard_label_ce(s, torch.zeros(0, dtype=torch.long)), 0.5).backward()
    assert s.grad is not None and s.grad.shape == (0, 8)


def _peak_bytes(fn: object) -> int:
    """Peak of live tensor memory while ``fn`` runs, from the profiler's allocation records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()  # type: ignore[operator]
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_chunking_bounds_peak_memory_of_forward_and_backward() -> None:
    n, v = 256, 2048
    s0, t = (x.float() for x in _logits(n, v, seed=15))
    one = n * v * 4  # bytes of one [N, V] float32 tensor

    def step(chunk: int, kind: str = "reverse-kl") -> None:
        s = s0.clone().requires_grad_(True)  # counts 1x; its gradient another 1x
        kd_divergence(s, t, kind, 2.0, chunk_rows=chunk).sum().backward()  # type: ignore[arg-type]

    unchunked = _peak_bytes(lambda: step(n))
    chunked = _peak_bytes(lambda: step(16))
    # Unchunked, autograd keeps both log-softmaxes, the teacher probs and their products (> 5x);
    # chunked, only the logits, their gradient and one chunk's temporaries are live.
    assert unchunked > 5 * one
    assert chunked < 2.6 * one
    # Forward KL from a frozen teacher saves only log p_s and p_t for its closed-form backward.
    assert _peak_bytes(lambda: step(n, "forward-kl")) < 4.5 * one
    assert _peak_bytes(lambda: step(16, "forward-kl")) < 2.6 * one
    # The same result either way.
    a = s0.clone().requires_grad_(True)
    b = s0.clone().requires_grad_(True)
    kd_divergence(a, t, "forward-kl", 2.0, chunk_rows=n).sum().backward()
    kd_divergence(b, t, "forward-kl", 2.0, chunk_rows=16).sum().backward()
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, b.grad)


def test_no_grad_path_matches_grad_path() -> None:
    s, t = _logits(9, 6, seed=16)
    with torch.no_grad():
        plain = kd_divergence(s, t, "reverse-kl", 1.5, chunk_rows=4)
    tracked = kd_divergence(s.clone().requires_grad_(True), t, "reverse-kl", 1.5, chunk_rows=4)
    torch.testing.assert_close(plain, tracked.detach())
    ref = (
        F.kl_div(torch.log_softmax(t / 1.5, -1), torch.log_softmax(s / 1.5, -1), log_target=True, reduction="none").sum(
            -1
        )
        * 1.5**2
    )
    torch.testing.assert_close(plain, ref)


def test_forward_kl_closed_form_gradient_matches_autograd() -> None:
    """A frozen teacher takes the closed-form backward; a teacher with grad the autograd path."""
    torch.manual_seed(3)
    s = (torch.randn(9, 13, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(9, 13, dtype=torch.float64) * 3
    w = torch.rand(9, dtype=torch.float64)
    assert gradcheck(lambda a: kd_divergence(a, t, "forward-kl", 1.7, chunk_rows=4), (s,), fast_mode=True)
    fused = kd_divergence(s, t, "forward-kl", 1.7)
    (g_fused,) = torch.autograd.grad((fused * w).sum(), s)
    t_grad = t.clone().requires_grad_()
    reference = kd_divergence(s, t_grad, "forward-kl", 1.7)
    (g_ref,) = torch.autograd.grad((reference * w).sum(), s)
    torch.testing.assert_close(fused, reference.detach(), rtol=0, atol=0)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-10, atol=1e-12)
    # fp32 student logits, chunked and checkpointed, against the direct formula's gradient.
    s32 = s.detach().float().requires_grad_()
    direct = (F.softmax(t.float() / 1.7, -1) * (F.log_softmax(t.float() / 1.7, -1) - F.log_softmax(s32 / 1.7, -1))).sum(
        -1
    ) * 1.7**2
    (g_direct,) = torch.autograd.grad(direct.sum(), s32)
    (g_chunked,) = torch.autograd.grad(kd_divergence(s32, t.float(), "forward-kl", 1.7, chunk_rows=2).sum(), s32)
    torch.testing.assert_close(g_chunked, g_direct, rtol=1e-5, atol=1e-6)
