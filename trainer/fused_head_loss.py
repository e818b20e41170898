"""The student's LM head and the logits objective fused and chunked: the [N, V] logits are never
materialised at once, for the student or for the teacher.

For rows of the student's last hidden state ``h`` [N, H], its output head ``W`` [V, H] (and bias),
labels and a teacher target, the objective is

    loss = Σ_i c_kd_i · T²·KL(p_i ‖ softmax(z_i / T)) + Σ_i c_ce_i · CE(z_i, y_i),   z = h·Wᵀ + b,

with ``c_kd = alpha·w/Σw`` and ``c_ce = (1 - alpha)·w/Σw`` (``w``: per-row weights, 1 by default),
which is ``losses.kd_objective(kd_divergence(...), hard_label_ce(...), alpha, weights=w)`` for
forward KL. The gradient with respect to a row's logits has a closed form,
``dz = c_kd·T·(softmax(z/T) - target) + c_ce·(softmax(z) - onehot(y))``, so each chunk of rows
computes its logits, its loss terms and ``dz`` at once, and turns ``dz`` into the gradients of
``h``, ``W`` and ``b`` with two matmuls while the chunk is still in cache. The forward therefore
already holds every gradient (as Liger-Kernel's fused linear cross-entropy does); the backward
only scales them by the incoming gradient. Peak extra memory: one chunk of [rows, V] temporaries
plus the gradients of ``h`` and ``W``, instead of several [N, V] tensors kept for autograd.

Teacher targets, per row:
- ``Tensor`` [N, V]: teacher logits;
- ``TeacherHead``: the teacher's hidden rows and output head, whose logits are computed chunk by
  chunk too (a live teacher then never materialises its [N, V] logits either);
- ``TopKTeacher``: the teacher cache's top-k logits (+ log-sum-exp for the tail bucket), the
  bucket distributions of ``losses.topk_kd_divergence``; the target of the gradient is
  ``p_b`` at a top-k token and ``p_tail·π_j/q_tail`` elsewhere (see ``losses._TopKForwardKL``).

Equality with the plain path (values and gradients, float64) is tested in
tests/unit/test_fused_head_loss.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import teacher_bucket_logprobs

IGNORE_INDEX = -100
# Rows per chunk: [256, V] float32 temporaries are 2 MiB at V = 2048 and stay near the cache,
# while 256-row matmuls against the head still run at full speed.
DEFAULT_CHUNK_ROWS = 256


@dataclass(frozen=True)
class TeacherHead:
    """A teacher's logits as ``hidden·weightᵀ + bias``, computed a chunk at a time."""

    hidden: Tensor  # [N, Ht]
    weight: Tensor  # [V, Ht]
    bias: Tensor | None = None


@dataclass(frozen=True)
class TopKTeacher:
    """The teacher cache's rows: top-k logits at T = 1, their token ids, and log Σ exp(all)."""

    values: Tensor  # [N, k]
    indices: Tensor  # [N, k] int64
    logsumexp: Tensor | None = None  # [N]; None: no tail bucket (renormalised over the top-k)


Teacher: TypeAlias = "Tensor | TeacherHead | TopKTeacher"


def _teacher_chunk(
    teacher: Teacher, lo: int, hi: int, dtype: torch.dtype, vocab: int
) -> tuple[str, tuple[Tensor, ...]]:
    if isinstance(teacher, Tensor):
        return "dense", (teacher[lo:hi].to(dtype),)
    if isinstance(teacher, TeacherHead):
        logits = teacher.hidden[lo:hi].to(dtype) @ teacher.weight.to(dtype).t()
        if teacher.bias is not None:
            logits = logits + teacher.bias.to(dtype)
        return "dense", (logits,)
    # k == V leaves no tail: the buckets are the whole vocabulary (as in topk_kd_divergence).
    tail = teacher.logsumexp if teacher.values.shape[-1] < vocab else None
    lse = tail[lo:hi].to(dtype) if tail is not None else None
    parts = (teacher.values[lo:hi].to(dtype), teacher.indices[lo:hi])
    return ("topk-tail", (*parts, lse)) if lse is not None else ("topk", parts)


def _kd_and_grad(z_t: Tensor, log_s: Tensor, kind: str, args: tuple[Tensor, ...], t: float) -> tuple[Tensor, Tensor]:
    """Per-row KL(teacher ‖ student) (no T²) and d KL / d(z/T), for one chunk."""
    s = log_s.exp()
    if kind == "dense":
        log_p = F.log_softmax(args[0] / t, dim=-1)
        p = log_p.exp()
        return (p * (log_p - log_s)).sum(-1), s - p
    values, idx = args[0], args[1]
    vocab = z_t.shape[-1]
    if kind == "topk":
        log_p = F.log_softmax(values / t, dim=-1)
        log_q = F.log_softmax(z_t.gather(-1, idx), dim=-1)
        p = log_p.exp()
        grad = torch.zeros_like(z_t).scatter_(-1, idx, log_q.exp() - p)
        return (p * (log_p - log_q)).sum(-1), grad
    log_p = teacher_bucket_logprobs(values, args[2], vocab, t)  # [c, k+1]
    p = log_p.exp()
    log_top = log_s.gather(-1, idx)
    log_tail = torch.logsumexp(log_s.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)
    log_q = torch.cat([log_top, log_tail], dim=-1)
    kd = (p * (log_p - log_q)).sum(-1)
    # Tail tokens: target p_tail·π_j/q_tail; top-k tokens: target p_b.
    target = s * (log_p[:, -1:] - log_tail).exp()
    target.scatter_(-1, idx, p[:, :-1])
    return kd, s - target


def _chunk_terms(
    z: Tensor, kind: str, args: tuple[Tensor, ...], labels: Tensor, c_kd: Tensor, c_ce: Tensor, t: float
) -> tuple[Tensor, Tensor, Tensor]:
    """kd [c] (with T²), ce [c] and dz [c, V] of one chunk of student logits ``z``."""
    z_t = z / t
    log_s = F.log_softmax(z_t, dim=-1)
    kd, g_kd = _kd_and_grad(z_t, log_s, kind, args, t)
    kd = kd * (t * t)
    ignored = labels == IGNORE_INDEX
    y = labels.masked_fill(ignored, 0).unsqueeze(-1)
    log_s1 = log_s if t == 1.0 else F.log_softmax(z, dim=-1)
    ce = (-log_s1.gather(-1, y).squeeze(-1)).masked_fill(ignored, 0.0)
    g_ce = log_s1.exp()
    g_ce.scatter_add_(-1, y, torch.full_like(y, -1, dtype=g_ce.dtype))
    # d(T²·KL)/dz = T·(s - target); rows with an ignored label contribute no CE gradient.
    dz = g_kd.mul_((c_kd * t).unsqueeze(-1)).add_(g_ce.mul_(c_ce.masked_fill(ignored, 0.0).unsqueeze(-1)))
    return kd, ce, dz


def _chunk_fn() -> Any:
    """``_chunk_terms``, compiled when ``compile.py`` says so (one fused loop per chunk instead of
    ~15 passes over [rows, V]); eager otherwise."""
    from .compile import maybe_compiled

    return maybe_compiled(_chunk_terms)


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        c_kd: Tensor,
        c_ce: Tensor,
        labels: Tensor,
        teacher: Teacher,
        temperature: float,
        chunk_rows: int,
        out_rows: list[Tensor],
    ) -> Tensor:
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        n = hidden.shape[0]
        grad_h = torch.empty((n, hidden.shape[1]), dtype=dtype)
        grad_w = torch.zeros_like(w)
        grad_b = torch.zeros_like(b) if b is not None else None
        kd_all = torch.empty(n, dtype=dtype)
        ce_all = torch.empty(n, dtype=dtype)
        chunk_terms = _chunk_fn()
        for lo in range(0, n, chunk_rows):
            hi = min(lo + chunk_rows, n)
            h = hidden[lo:hi].to(dtype)
            z = h @ w.t()
            if b is not None:
                z = z + b
            kind, args = _teacher_chunk(teacher, lo, hi, dtype, w.shape[0])
            kd, ce, dz = chunk_terms(z, kind, args, labels[lo:hi], c_kd[lo:hi], c_ce[lo:hi], temperature)
            kd_all[lo:hi], ce_all[lo:hi] = kd, ce
            torch.mm(dz, w, out=grad_h[lo:hi])
            grad_w.addmm_(dz.t(), h)
            if grad_b is not None:
                grad_b.add_(dz.sum(0))
        ctx.save_for_backward(grad_h, grad_w, *(() if grad_b is None else (grad_b,)))
        ctx.has_bias = grad_b is not None
        ctx.dtypes = (hidden.dtype, weight.dtype)
        out_rows.extend([kd_all, ce_all])
        return (c_kd * kd_all).sum() + (c_ce * ce_all).sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_h = (saved[0] * grad).to(h_dtype)
        grad_w = (saved[1] * grad).to(w_dtype)
        grad_b = (saved[2] * grad).to(w_dtype) if ctx.has_bias else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def fused_head_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: Teacher,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float,
    row_weights: Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[Tensor, Tensor, Tensor]:
    """``alpha·mean(T²·KL) + (1 - alpha)·mean(CE)`` over the rows, through the head; returns the
    loss (differentiable in ``hidden``, ``weight``, ``bias``) and the per-row KD and CE values
    (detached). Rows whose label is -100 add KD but no CE, as ``losses.hard_label_ce`` gives 0."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n = hidden.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must be [N]={n}, got {tuple(labels.shape)}")
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = torch.ones(n, dtype=dtype) if row_weights is None else row_weights.detach().to(dtype)
    total = w.sum()
    if n == 0 or float(total) <= 0:
        zero = (hidden.sum() + weight.sum()) * 0.0
        empty = torch.zeros(n, dtype=dtype)
        return zero, empty, empty
    c_kd = w * (alpha / total)
    c_ce = w * ((1.0 - alpha) / total)
    rows: list[Tensor] = []
    loss = _FusedHeadLoss.apply(hidden, weight, bias, c_kd, c_ce, labels, teacher, temperature, chunk_rows, rows)
    return loss, rows[0], rows[1]
