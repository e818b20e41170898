"""Distillation losses over rows of logits (tokens for causal-lm, samples for classification).

Every divergence is computed on temperature-softened distributions and multiplied by T², so
that its gradient scale does not shrink as T grows (Hinton et al., 2015).

Memory: a row's divergence needs log-probabilities over the whole vocabulary for both models.
For N rows that is several NxV float32 tensors, and autograd would keep them all until the
backward. Rows are therefore processed in chunks of ``chunk_rows``; when a gradient is needed
each chunk runs under ``torch.utils.checkpoint``, which keeps only the chunk's inputs (views of
the logits that exist anyway) and recomputes that one chunk's log-probabilities during the
backward. The peak extra memory is then O(chunk_rows x V) instead of O(N x V).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Divergence = Literal["forward-kl", "reverse-kl", "jsd"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)

_LOG_HALF = math.log(0.5)


def _check_kind(kind: str) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def _check_chunk(chunk_rows: int) -> None:
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")


def _plogp_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """Σ p·(log p - log q) per row. Inputs come from finite logits, so both logs are finite and a
    probability that underflows to 0 contributes 0 (no masking pass needed)."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def divergence_from_logprobs(log_s: Tensor, log_t: Tensor, kind: str) -> Tensor:
    """Per-row divergence between two normalised log-distributions over the last dim (no T² here)."""
    if kind == "forward-kl":  # KL(teacher ‖ student): mass-covering
        return _plogp_ratio(log_t, log_s)
    if kind == "reverse-kl":  # KL(student ‖ teacher): mode-seeking
        return _plogp_ratio(log_s, log_t)
    if kind == "jsd":
        log_m = torch.logaddexp(log_s, log_t) + _LOG_HALF
        return 0.5 * _plogp_ratio(log_t, log_m) + 0.5 * _plogp_ratio(log_s, log_m)
    raise ValueError(f"unknown divergence {kind!r}")


def _chunked(fn: Callable[..., Tensor], tensors: list[Tensor], chunk_rows: int) -> Tensor:
    """Apply a row-wise ``fn`` chunk by chunk; checkpoint chunks when autograd will need them."""
    n = tensors[0].shape[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if n == 0:
        # Keep the graph connected so that .backward() on an empty batch still works.
        return tensors[0].new_zeros(0, dtype=torch.float32) + 0.0 * tensors[0].sum()
    if n <= chunk_rows:
        # One chunk: checkpointing would recompute it without lowering the peak (the backward
        # rebuilds the same tensors), so run it plainly.
        return fn(*tensors)
    # torch.split has one backward node that concatenates the chunk gradients, instead of one
    # full-size zero-filled gradient per chunk as repeated slicing would give.
    parts = [t.split(chunk_rows, dim=0) for t in tensors]
    out = []
    for chunk in zip(*parts, strict=True):
        if needs_grad:
            out.append(checkpoint(fn, *chunk, use_reentrant=False))
        else:
            out.append(fn(*chunk))
    return torch.cat(out)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _ForwardKL(torch.autograd.Function):
    """Per-row T²·KL(softmax(t/T) ‖ softmax(s/T)) for a teacher without gradient.

    Autograd through log_softmax → subtract → exp·multiply → sum keeps several NxV temporaries and
    runs a backward kernel for each. The gradient has a closed form,
    d/ds T²·Σ p_t·(log p_t - log p_s) = T·(softmax(s/T) - p_t), so the backward is one fused
    expression over the two saved NxV tensors. The forward values are the same ops as the
    autograd path (bit for bit); gradients agree to rounding (tests/unit/test_losses.py).
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, t: Tensor, temperature: float) -> Tensor:
        log_s = F.log_softmax(s / temperature, dim=-1)
        log_t = F.log_softmax(t / temperature, dim=-1)
        p_t = log_t.exp()
        out = (p_t * (log_t - log_s)).sum(dim=-1) * (temperature * temperature)
        ctx.save_for_backward(log_s, p_t)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        log_s, p_t = ctx.saved_tensors
        grad_s = log_s.exp().sub_(p_t).mul_(grad.unsqueeze(-1) * ctx.temperature)
        return grad_s, None, None


def kd_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: Divergence,
    temperature: float,
    chunk_rows: int = 1024,
) -> Tensor:
    """Per-row T²·D(softmax(t/T), softmax(s/T)) for D in forward KL, reverse KL, JSD. Returns [N].

    Logits must be finite (a -inf logit would make 0·(-inf) terms NaN).
    """
    _check_kind(kind)
    _check_temperature(temperature)
    _check_chunk(chunk_rows)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be [N, V] with equal shapes, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = _compute_dtype(student_logits)
    scale = temperature * temperature
    if kind == "forward-kl" and not teacher_logits.requires_grad:
        # The common case (a frozen teacher): the closed-form gradient, see _ForwardKL.
        return _chunked(
            lambda s, t: _ForwardKL.apply(s.to(dtype), t.to(dtype), temperature),
            [student_logits, teacher_logits],
            chunk_rows,
        )

    def rows(s: Tensor, t: Tensor) -> Tensor:
        log_s = F.log_softmax(s.to(dtype) / temperature, dim=-1)
        log_t = F.log_softmax(t.to(dtype) / temperature, dim=-1)
        return divergence_from_logprobs(log_s, log_t, kind) * scale

    return _chunked(rows, [student_logits, teacher_logits], chunk_rows)


class _TopKForwardKL(torch.autograd.Function):
    """Per-row T²·KL(teacher buckets ‖ student buckets) over the top-k (+ tail) for a frozen teacher.

    The autograd path (gather, scatter of -inf over a copy of the logits, logsumexp, cat,
    log_softmax) runs a backward kernel per op, several over NxV. With π = softmax(s/T) over the
    vocabulary, a top-k bucket's student mass is q_b = π[idx_b] and the tail's is q_tail = the rest,
    so the gradient has a closed form:

        d/ds_j T²·Σ_b p_b·(log p_b - log q_b) = T·(π_j - target_j),
        target_j = p_b for j = idx_b, and p_tail·π_j / q_tail for j in the tail.

    Without a tail (distributions renormalised over the top-k) only the top-k logits enter:
    the gradient is T·(softmax(s_top/T) - p) at the top-k positions and 0 elsewhere.
    Indices must be distinct within a row (buckets are disjoint); ``topk_kd_divergence`` checks.
    Values agree with the autograd path to rounding (tests/unit/test_losses.py).
    """

    @staticmethod
    def forward(
        ctx: Any,
        s: Tensor,
        log_t: Tensor,
        idx: Tensor,
        temperature: float,
        with_tail: bool,
    ) -> Tensor:
        z = s / temperature
        if with_tail:
            log_pi = F.log_softmax(z, dim=-1)
            log_top = log_pi.gather(-1, idx)
            # The tail's log-mass, exactly (1 - Σ top would round away a small tail).
            log_tail = torch.logsumexp(log_pi.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)
            log_s = torch.cat([log_top, log_tail], dim=-1)
            ctx.save_for_backward(log_pi, log_t, log_tail, idx)
        else:
            log_s = F.log_softmax(z.gather(-1, idx), dim=-1)
            ctx.save_for_backward(log_s, log_t, idx)
            ctx.vocab = s.shape[-1]
        ctx.with_tail = with_tail
        ctx.temperature = temperature
        return (log_t.exp() * (log_t - log_s)).sum(dim=-1) * (temperature * temperature)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        scale = grad.unsqueeze(-1) * ctx.temperature
        if ctx.with_tail:
            log_pi, log_t, log_tail, idx = ctx.saved_tensors
            p = log_t.exp()
            # Tail positions: T·π_j·(1 - p_tail/q_tail); top-k positions: T·(π_j - p_b).
            tail_factor = 1.0 - (log_t[:, -1:] - log_tail).exp()
            pi = log_pi.exp()
            top = pi.gather(-1, idx).sub_(p[:, :-1]).mul_(scale)
            grad_s = pi.mul_(tail_factor * scale).scatter_(-1, idx, top)
        else:
            log_s, log_t, idx = ctx.saved_tensors
            top = log_s.exp().sub_(log_t.exp()).mul_(scale)
            grad_s = top.new_zeros((top.shape[0], ctx.vocab)).scatter_(-1, idx, top)
        return grad_s, None, None, None, None


def teacher_bucket_logprobs(
    teacher_values: Tensor, teacher_logsumexp: Tensor | None, vocab_size: int, temperature: float
) -> Tensor:
    """Teacher log-probs over the k top buckets (+ one tail bucket when the log-sum-exp is known).

    The cache holds the top-k logits and log Σ_all exp(z) at T = 1, which gives the tail's mass
    at T = 1 but not at T ≠ 1 (that needs the tail's individual logits). We spread the tail mass
    evenly over its V-k tokens, the maximum-entropy guess, and soften that: the tail bucket's
    logit at T is log(V-k) + (log tail_mass - log(V-k))/T. It is exact at T = 1 and when the
    tail is flat, and an upper bound on the true softened tail mass for T > 1.
    """
    values = teacher_values
    k = values.shape[-1]
    top = values / temperature
    if teacher_logsumexp is None:
        return F.log_softmax(top, dim=-1)
    tail_tokens = vocab_size - k
    if tail_tokens == 0:
        # No tail: the k buckets are the whole vocabulary.
        return F.log_softmax(top, dim=-1)
    lse = teacher_logsumexp.to(values.dtype)
    # log(1 - top_mass) with top_mass = exp(lse_top - lse); fp16 cached values can make the top
    # mass round to >= 1, so the tail keeps at least 1e-6 of the mass (as the loop's buckets do).
    top_frac = torch.exp(torch.logsumexp(values, dim=-1) - lse).clamp(max=1.0 - 1e-6)
    log_tail = lse + torch.log1p(-top_frac)
    log_n = math.log(tail_tokens)
    tail = log_n + (log_tail - log_n) / temperature
    return F.log_softmax(torch.cat([top, tail.unsqueeze(-1)], dim=-1), dim=-1)


def topk_kd_divergence(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    kind: Divergence,
    temperature: float,
    chunk_rows: int = 1024,
    *,
    teacher_logsumexp: Tensor | None = None,
) -> Tensor:
    """Per-row T²·divergence over the teacher's top-k buckets plus one tail bucket. Returns [N].

    With ``teacher_logsumexp`` the distributions are over k+1 buckets: the k teacher-chosen
    tokens and the tail (everything else). The student's tail is exact (log-sum-exp of its own
    logits outside the top-k, at T); the teacher's is estimated, see ``teacher_bucket_logprobs``.
    Without it nothing is known about the tail: both distributions are renormalised over the
    top-k tokens only (a zero teacher tail against a non-zero student tail would make reverse KL
    infinite). With k == V both forms equal ``kd_divergence``.
    """
    _check_kind(kind)
    _check_temperature(temperature)
    _check_chunk(chunk_rows)
    if student_logits.dim() != 2:
        raise ValueError(f"student logits must be [N, V], got {tuple(student_logits.shape)}")
    n, vocab = student_logits.shape
    if teacher_values.shape != teacher_indices.shape or teacher_values.dim() != 2 or teacher_values.shape[0] != n:
        raise ValueError(
            f"teacher values and indices must both be [N, k] with N={n}, got {tuple(teacher_values.shape)} "
            f"and {tuple(teacher_indices.shape)}"
        )
    k = teacher_values.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k must be between 1 and the vocabulary size {vocab}, got {k}")
    if teacher_indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher indices must be an integer tensor, got {teacher_indices.dtype}")
    if n and (int(teacher_indices.min()) < 0 or int(teacher_indices.max()) >= vocab):
        raise ValueError(f"teacher indices out of range [0, {vocab})")
    if teacher_logsumexp is not None and teacher_logsumexp.shape != (n,):
        raise ValueError(f"teacher_logsumexp must be [N]={n}, got {tuple(teacher_logsumexp.shape)}")
    dtype = _compute_dtype(student_logits)
    scale = temperature * temperature
    with_tail = teacher_logsumexp is not None and k < vocab
    indices = teacher_indices.long()
    if n and k > 1 and bool((indices.sort(dim=-1).values.diff(dim=-1) == 0).any()):
        raise ValueError("teacher indices must be distinct within each row (one bucket per token)")
    if (
        kind == "forward-kl"
        and not teacher_values.requires_grad
        and not (teacher_logsumexp is not None and teacher_logsumexp.requires_grad)
    ):
        # The common case (cached outputs of a frozen teacher): the closed-form gradient, see
        # _TopKForwardKL.

        def closed_form(s: Tensor, values: Tensor, idx: Tensor, *lse: Tensor) -> Tensor:
            log_t = teacher_bucket_logprobs(values.to(dtype), lse[0] if lse else None, vocab, temperature)
            return _TopKForwardKL.apply(s.to(dtype), log_t, idx, temperature, with_tail)

        tensors = [student_logits, teacher_values, indices]
        if teacher_logsumexp is not None:
            tensors.append(teacher_logsumexp)
        return _chunked(closed_form, tensors, chunk_rows)

    def rows(s: Tensor, values: Tensor, idx: Tensor, *lse: Tensor) -> Tensor:
        s = s.to(dtype) / temperature
        log_t = teacher_bucket_logprobs(values.to(dtype), lse[0] if lse else None, vocab, temperature)
        s_top = s.gather(-1, idx)
        if with_tail:
            s_tail = torch.logsumexp(s.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)
            log_s = F.log_softmax(torch.cat([s_top, s_tail], dim=-1), dim=-1)
        else:
            log_s = F.log_softmax(s_top, dim=-1)
        return divergence_from_logprobs(log_s, log_t, kind) * scale

    tensors = [student_logits, teacher_values, indices]
    if teacher_logsumexp is not None:
        tensors.append(teacher_logsumexp)
    return _chunked(rows, tensors, chunk_rows)


def hard_label_ce(student_logits: Tensor, labels: Tensor, ignore_index: int = -100, chunk_rows: int = 1024) -> Tensor:
    """Per-row cross-entropy with the hard labels at T = 1; 0 on rows labelled ``ignore_index``."""
    _check_chunk(chunk_rows)
    if student_logits.dim() != 2 or labels.shape != student_logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, V] and labels [N], got {tuple(student_logits.shape)} and {tuple(labels.shape)}"
        )
    vocab = student_logits.shape[1]
    valid = labels != ignore_index
    if bool(((labels[valid] < 0) | (labels[valid] >= vocab)).any()):
        raise ValueError(f"labels out of range [0, {vocab}) (ignore_index={ignore_index})")
    dtype = _compute_dtype(student_logits)
    labels = labels.long()

    def rows(s: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(s.to(dtype), y, ignore_index=ignore_index, reduction="none")

    return _chunked(rows, [student_logits, labels], chunk_rows)


def weighted_mean(per_row: Tensor, mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """Σ w·m·x / Σ w·m over rows; 0 (still attached to the graph) when no row counts."""
    if per_row.dim() != 1:
        raise ValueError(f"per_row must be [N], got {tuple(per_row.shape)}")
    w = torch.ones_like(per_row)
    for name, extra in (("mask", mask), ("weights", weights)):
        if extra is None:
            continue
        if extra.shape != per_row.shape:
            raise ValueError(f"{name} must have shape {tuple(per_row.shape)}, got {tuple(extra.shape)}")
        w = w * extra.to(per_row.dtype)
    denom = w.sum()
    if float(denom) <= 0:
        return (per_row * 0.0).sum()
    # Rows with zero weight may hold inf/NaN (e.g. ignored rows); keep them out of the sum.
    return torch.where(w > 0, per_row * w, torch.zeros_like(per_row)).sum() / denom


def kd_objective(
    kd_rows: Tensor,
    ce_rows: Tensor,
    alpha: float,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """alpha·mean(kd) + (1 - alpha)·mean(ce), both means weighted the same way."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * weighted_mean(kd_rows, mask, weights) + (1.0 - alpha) * weighted_mean(ce_rows, mask, weights)
