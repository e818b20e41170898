"""Per-sample weights from the teacher's confidence (uncertainty weighting).

w = 1 - (H / log V)^beta, where H is the teacher's predictive entropy (averaged over the valid
tokens of a sequence), so a confident teacher (low H) gives weights near 1 and a teacher that
is close to uniform gives weights near 0: samples the teacher knows well carry its knowledge
best. Weights are then scaled so that their mean over the batch is 1, which keeps the loss
scale (and so the learning rate's meaning) the same with and without weighting.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _token_entropy(logits: Tensor) -> Tensor:
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


@torch.no_grad()
def sample_entropy_weights(teacher_logits: Tensor, beta: float, mask: Tensor | None = None) -> Tensor:
    """Weights [B] from teacher logits [B, V] or [B, L, V] (with an optional [B, L] token mask).

    Samples without any valid token get weight 0 and are left out of the normalisation: the mean
    over the samples that have at least one valid token is 1. If every sample has weight 0 (a
    uniform teacher everywhere) the weights fall back to 1.
    """
    w, present = raw_entropy_weights(teacher_logits, beta, mask)
    return normalise_weights(w, present, int(present.sum()), float(w.sum()))


@torch.no_grad()
def raw_entropy_weights(teacher_logits: Tensor, beta: float, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(1 - (H / log V)^beta`` per sample, 0 for samples without a valid token; which samples
    have one)``, before the normalisation (``normalise_weights``). A batch split over data ranks
    sums the counts and totals over them first."""
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    if teacher_logits.dim() not in (2, 3):
        raise ValueError(f"teacher logits must be [B, V] or [B, L, V], got {tuple(teacher_logits.shape)}")
    vocab = teacher_logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"entropy weighting needs at least 2 classes, got {vocab}")
    batch = teacher_logits.shape[0]
    if teacher_logits.dim() == 2:
        if mask is not None:
            raise ValueError("a token mask only applies to [B, L, V] logits")
        entropy = _token_entropy(teacher_logits)
        present = torch.ones(batch, dtype=torch.bool, device=teacher_logits.device)
    else:
        length = teacher_logits.shape[1]
        m = torch.ones(batch, length, device=teacher_logits.device) if mask is None else mask.float()
        if m.shape != (batch, length):
            raise ValueError(f"mask must be [B, L]={batch, length}, got {tuple(m.shape)}")
        # One sample at a time: the [L, V] log-probs of one sample are the only full-vocab temporary.
        per_token = torch.stack([_token_entropy(teacher_logits[b]) for b in range(batch)])
        counts = m.sum(dim=1)
        present = counts > 0
        entropy = (per_token * m).sum(dim=1) / counts.clamp(min=1)
    ratio = (entropy / math.log(vocab)).clamp(0.0, 1.0)
    w = torch.where(present, 1.0 - ratio.pow(beta), torch.zeros_like(ratio))
    return w, present


def normalise_weights(w: Tensor, present: Tensor, n_present: int, total: float) -> Tensor:
    """Scale raw weights so that their mean over the ``n_present`` samples with a valid token
    (whose raw weights sum to ``total``) is 1; all-zero weights fall back to 1."""
    if n_present == 0 or total <= 0:
        return present.float() if n_present else torch.ones_like(w)
    return w * (n_present / total)
