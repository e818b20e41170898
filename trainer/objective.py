"""The logits objective as pure functions: student rows and teacher targets in, loss out.

``logits_objective`` is what a single-process (or data-parallel) step optimises for the
``logits`` objective: ``alpha * KD + (1 - alpha) * CE`` over the rows that are trained on, with
the KD term taken against whatever the teacher targets hold (full logits, logits at the trained
rows only, or top-k values from the teacher cache), and optional per-sample entropy weights.
``token_objective`` is the same per-token loss for the model-parallel student, whose schedule
calls it on the last pipeline stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .losses import hard_label_ce, kd_divergence, kd_objective, topk_kd_divergence
from .weighting import sample_entropy_weights

if TYPE_CHECKING:
    from .targets import TeacherTargets

# KD losses see at most this many logits (rows x vocab) per chunk: 64 MiB of fp32. Below it the
# whole batch is one chunk and nothing is recomputed in the backward; above it (large
# vocabularies) rows are chunked and checkpointed.
LOSS_CHUNK_ELEMENTS = 1 << 24
IGNORE_INDEX = -100


def loss_chunk_rows(vocab: int) -> int:
    return max(256, LOSS_CHUNK_ELEMENTS // vocab)


def trained_rows(labels: torch.Tensor) -> torch.Tensor:
    """Causal-lm rows that are trained on: row i predicts token i+1, padding predicts nothing."""
    return labels[:, 1:] != IGNORE_INDEX


@dataclass(frozen=True)
class LogitsSettings:
    """The spec's knobs of the logits objective."""

    divergence: Any  # distillation.loss: forward-kl, reverse-kl or jsd
    alpha: float  # weight of KD against the hard-label CE
    entropy_beta: float | None = None  # data.uncertaintyWeighting.beta; None: weighting off


def bucket_logits(values: torch.Tensor, logsumexp: torch.Tensor | None) -> torch.Tensor:
    """Top-k logits plus one tail bucket holding the rest of the teacher's mass, as logits.

    Used for entropy weighting from cached teacher outputs: the entropy is then over k+1 buckets.
    """
    if logsumexp is None:
        return values
    top = torch.logsumexp(values, dim=-1)
    # log(exp(lse) - exp(top)) = lse + log1p(-exp(top - lse)), clamped where rounding left no tail.
    gap = (top - logsumexp).clamp(max=-1e-6)
    tail = logsumexp + torch.log1p(-torch.exp(gap))
    return torch.cat([values, tail.unsqueeze(-1)], dim=-1)


def _row_selector(task: str, valid: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps a per-position teacher tensor [B, L, ...] to the trained rows [N, ...]."""
    if task == "causal-lm":
        assert valid is not None
        return lambda t: t[:, :-1][valid]
    return lambda t: t[:, 0] if t.dim() == 3 else t


def _kd_rows(
    student_rows: torch.Tensor,
    targets: TeacherTargets,
    task: str,
    valid: torch.Tensor | None,
    temperature: float,
    settings: LogitsSettings,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row KD against the targets, and the teacher logits entropy weighting reads (or None
    when weighting is off and they would cost a copy)."""
    rows = _row_selector(task, valid)
    chunk = loss_chunk_rows(student_rows.shape[-1])
    weighting = settings.entropy_beta is not None
    if targets.logit_rows is not None:
        assert valid is not None
        kd = kd_divergence(student_rows, targets.logit_rows, settings.divergence, temperature, chunk_rows=chunk)
        if not weighting:
            return kd, None
        # Entropy weighting is per sample: lay the rows back out as [B, L-1, V].
        laid_out = targets.logit_rows.new_zeros((*valid.shape, targets.logit_rows.shape[-1]))
        laid_out[valid] = targets.logit_rows
        return kd, laid_out
    if targets.logits is not None:
        full = targets.logits
        kd = kd_divergence(student_rows, rows(full), settings.divergence, temperature, chunk_rows=chunk)
        return kd, (full[:, :-1] if task == "causal-lm" else full)
    assert targets.top_values is not None and targets.top_indices is not None
    lse = targets.logsumexp
    kd = topk_kd_divergence(
        student_rows,
        rows(targets.top_values),
        rows(targets.top_indices),
        settings.divergence,
        temperature,
        chunk_rows=chunk,
        # One value per position: a trailing axis lets the selector treat it as it treats the
        # [B, L, k] tensors (a classifier's cached entry is one position, [B, 1]).
        teacher_logsumexp=rows(lse.unsqueeze(-1)).squeeze(-1) if lse is not None else None,
    )
    if not weighting:  # only weighting reads the buckets
        return kd, None
    buckets = bucket_logits(targets.top_values, lse)
    return kd, (buckets[:, :-1] if task == "causal-lm" else buckets[:, 0])


def logits_objective(
    student_rows: torch.Tensor,
    labels: torch.Tensor,
    targets: TeacherTargets,
    *,
    task: str,
    temperature: float,
    settings: LogitsSettings,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``alpha * KD + (1 - alpha) * CE`` and its mean KD/CE parts.

    ``student_rows`` are the student's float logits at the trained rows: for a causal LM the
    positions ``trained_rows(labels)`` selects from ``logits[:, :-1]``, for classification one
    row per sample. ``labels`` is the batch's label tensor as collated.
    """
    if task == "causal-lm":
        valid: torch.Tensor | None = trained_rows(labels)
        label_rows = labels[:, 1:][valid]
    else:
        valid, label_rows = None, labels
    kd, entropy_source = _kd_rows(student_rows, targets, task, valid, temperature, settings)
    weights = None
    if settings.entropy_beta is not None:
        assert entropy_source is not None
        per_sample = sample_entropy_weights(
            entropy_source, settings.entropy_beta, valid.float() if valid is not None else None
        )
        weights = per_sample[:, None].expand_as(valid)[valid] if valid is not None else per_sample
    ce = hard_label_ce(student_rows, label_rows)
    loss = kd_objective(kd, ce, settings.alpha, weights=weights)
    return loss, {"kd": float(kd.detach().mean()), "ce": float(ce.detach().mean())}


def token_objective(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    settings: LogitsSettings,
    top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``alpha * KD + (1 - alpha) * CE`` shaped like ``labels``, and the float64 sums
    ``[KD over valid tokens, CE over valid tokens, valid tokens]`` for the step's report.

    ``labels`` are already shifted (position i is scored against token i+1) and -100 where
    nothing is predicted. ``teacher`` holds the teacher's logits per token, or with ``top_k``
    the teacher cache's entry per token packed as ``[k values, k vocabulary ids, log-sum-exp]``
    (ids as floats: exact below 2**24); then KD is taken over the top-k buckets and the tail, as
    the single-process objective does from the cache, on the predicted positions only.
    """
    vocab = student.shape[-1]
    s_rows, y = student.float().reshape(-1, vocab), labels.reshape(-1)
    chunk = loss_chunk_rows(vocab)
    if top_k is None:
        t_rows = teacher.float().reshape(-1, vocab)
        kd = kd_divergence(s_rows, t_rows, settings.divergence, temperature, chunk_rows=chunk)
    else:
        packed = teacher.float().reshape(-1, 2 * top_k + 1)
        rows = y != IGNORE_INDEX
        # Padded positions hold no cache entry (zeros): KD is computed where a token is predicted.
        kd_rows = topk_kd_divergence(
            s_rows[rows],
            packed[rows, :top_k],
            packed[rows, top_k : 2 * top_k].round().long(),
            settings.divergence,
            temperature,
            chunk_rows=chunk,
            teacher_logsumexp=packed[rows, 2 * top_k],
        )
        kd = torch.zeros(y.shape[0], dtype=kd_rows.dtype, device=kd_rows.device).masked_scatter(rows, kd_rows)
    ce = hard_label_ce(s_rows, y, chunk_rows=chunk)
    valid = (y != IGNORE_INDEX).to(torch.float64)
    sums = torch.stack([(kd.detach().double() * valid).sum(), (ce.detach().double() * valid).sum(), valid.sum()])
    return (settings.alpha * kd + (1.0 - settings.alpha) * ce).view_as(labels), sums.cpu()
