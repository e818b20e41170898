"""The on-policy loss: the generalised Jensen-Shannon divergence between the teacher and the
student on the student's own tokens, over the teacher's top-K tokens plus one tail bucket.

Definition (GKD, Agarwal et al. 2024, Eq. 1, with P the teacher and Q the student; the same
convention as TRL's ``GKDTrainer.generalized_jsd_loss``): for ``beta`` strictly between 0 and 1,
with the mixture M = beta·P + (1 - beta)·Q,

    JSD_beta(P ‖ Q) = beta·KL(P ‖ M) + (1 - beta)·KL(Q ‖ M),

and at the ends ``beta = 0`` is the forward KL(P ‖ Q) (mass-covering) and ``beta = 1`` the
reverse KL(Q ‖ P) (mode-seeking, MiniLLM's choice). JSD_beta/beta tends to the forward KL as
beta → 0 and JSD_beta/(1 - beta) to the reverse KL as beta → 1, so interior values are smaller
than either end's.

The distributions are over K + 1 buckets: the K tokens the teacher ranked highest at that
position (its ``top_ids``), and a tail holding the rest of each side's mass. The teacher's tail
is 1 - Σ exp(top_logprobs) (kept at least 1e-6, since log-probs rounded by a server can sum to
just over 1); the student's is exact, the log-sum-exp of its log-probs outside the K tokens.
With K equal to the vocabulary there is no tail and the result is the full-vocabulary
divergence. Everything is at temperature 1: the teacher's log-probs are what it serves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import _chunked

# The smallest teacher tail mass kept (as the loop's top-k buckets do, see objective.bucket_logits).
MIN_TAIL_MASS = 1e-6
# A served log-prob of -inf (a token the teacher masks) becomes this: its mass is 0 either way,
# and a finite log keeps 0·log terms and their gradients finite.
MIN_LOG_PROB = -1e4


def _check_beta(beta: float) -> None:
    if not (0.0 <= beta <= 1.0 and math.isfinite(beta)):
        raise ValueError(f"distillation.onPolicy.beta must be in [0, 1], got {beta}")


def teacher_bucket_log_probs(top_logprobs: Tensor, vocab: int) -> Tensor:
    """[N, K] teacher log-probs → [N, K+1] with the tail bucket (or [N, K] when K == vocab)."""
    top_logprobs = top_logprobs.clamp(min=MIN_LOG_PROB)
    if top_logprobs.shape[-1] == vocab:
        return top_logprobs
    top_mass = torch.logsumexp(top_logprobs, dim=-1).exp().clamp(max=1.0 - MIN_TAIL_MASS)
    return torch.cat([top_logprobs, torch.log1p(-top_mass).unsqueeze(-1)], dim=-1)


def student_bucket_log_probs(student_logits: Tensor, top_ids: Tensor) -> Tensor:
    """[N, V] student logits → [N, K+1] log-probs of the teacher's K tokens and the tail."""
    log_pi = F.log_softmax(student_logits, dim=-1)
    log_top = log_pi.gather(-1, top_ids)
    if top_ids.shape[-1] == student_logits.shape[-1]:
        return log_top
    # The tail's log-mass from its own terms: 1 - Σ top would round a small tail away.
    log_tail = torch.logsumexp(log_pi.scatter(-1, top_ids, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([log_top, log_tail], dim=-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ a·(log a - log b) per row. Both logs are finite (the teacher's are floored at
    ``MIN_LOG_PROB``), so a mass that underflows to 0 contributes 0 and no gradient is NaN."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def generalized_jsd_from_log_probs(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """Per-row JSD_beta between the teacher's and the student's log-distributions (last dim)."""
    _check_beta(beta)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def bucket_jsd(
    student_logits: Tensor, top_ids: Tensor, top_logprobs: Tensor, beta: float, *, chunk_rows: int = 1024
) -> Tensor:
    """Per-row JSD_beta over the teacher's top-K buckets and the tail. Returns [N].

    ``student_logits`` [N, V] are the student's logits for the N predicted tokens;
    ``top_ids``/``top_logprobs`` [N, K] the teacher's K most likely tokens there and their
    log-probs (distinct ids within a row). Rows are processed ``chunk_rows`` at a time and
    recomputed in the backward, so the extra memory is O(chunk_rows·V), not O(N·V).
    """
    _check_beta(beta)
    if student_logits.dim() != 2:
        raise ValueError(f"student logits must be [N, V], got {tuple(student_logits.shape)}")
    n, vocab = student_logits.shape
    if top_ids.shape != top_logprobs.shape or top_ids.dim() != 2 or top_ids.shape[0] != n:
        raise ValueError(
            f"teacher top_ids and top_logprobs must both be [N, K] with N={n}, got {tuple(top_ids.shape)} "
            f"and {tuple(top_logprobs.shape)}"
        )
    k = top_ids.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k must be between 1 and the student's vocabulary size {vocab}, got {k}")
    ids = top_ids.long()
    if n and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"teacher token ids out of the student's vocabulary [0, {vocab})")
    if n and k > 1 and bool((ids.sort(dim=-1).values.diff(dim=-1) == 0).any()):
        raise ValueError("teacher top ids must be distinct within each row (one bucket per token)")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32

    def rows(s: Tensor, idx: Tensor, lp: Tensor) -> Tensor:
        log_s = student_bucket_log_probs(s.to(dtype), idx)
        log_t = teacher_bucket_log_probs(lp.to(dtype), vocab)
        return generalized_jsd_from_log_probs(log_s, log_t, beta)

    return _chunked(rows, [student_logits, ids, top_logprobs], chunk_rows)


def completion_mask(prompt_lengths: Sequence[int], lengths: Sequence[int], width: int) -> Tensor:
    """[B, width-1] bool: row t of sequence b predicts token t+1, a completion token
    (prompt_length <= t+1 < length). The student's rows are ``logits[:, :-1][mask]``."""
    if len(prompt_lengths) != len(lengths):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(lengths)} sequences")
    positions = torch.arange(1, width)
    out = torch.zeros((len(lengths), width - 1), dtype=torch.bool)
    for b, (p, n) in enumerate(zip(prompt_lengths, lengths, strict=True)):
        if not 1 <= p <= n <= width:
            raise ValueError(f"sequence {b}: prompt length {p}, length {n}, width {width} (need 1 <= p <= n <= width)")
        out[b] = (positions >= p) & (positions < n)
    return out


def teacher_completion_rows(
    top_ids: Sequence[Tensor], top_logprobs: Sequence[Tensor], prompt_lengths: Sequence[int], lengths: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """The teacher's [N, K] rows at the completion tokens, in the order ``completion_mask`` picks
    the student's rows. Row t of a scored sequence is the teacher's distribution of token t."""
    ids = [t[p:n] for t, p, n in zip(top_ids, prompt_lengths, lengths, strict=True)]
    lps = [t[p:n] for t, p, n in zip(top_logprobs, prompt_lengths, lengths, strict=True)]
    return torch.cat(ids), torch.cat(lps)


def on_policy_loss(
    student_logits: Tensor,
    top_ids: Sequence[Tensor],
    top_logprobs: Sequence[Tensor],
    prompt_lengths: Sequence[int],
    lengths: Sequence[int],
    beta: float,
    *,
    chunk_rows: int = 1024,
) -> tuple[Tensor, int]:
    """The mean per-token JSD_beta over the completion tokens of a batch, and their count.

    ``student_logits`` [B, L, V] are the student's logits for B sequences laid out from position
    0 (right padding); sequence b's tokens are its first ``lengths[b]``, of which the first
    ``prompt_lengths[b]`` are the prompt. ``top_ids[b]``/``top_logprobs[b]`` [T_b, K] are the
    teacher's scores of sequence b (T_b >= lengths[b]). A batch without completion tokens gives
    a zero loss that still reaches the student's graph.
    """
    mask = completion_mask(prompt_lengths, lengths, student_logits.shape[1]).to(student_logits.device)
    rows = student_logits[:, :-1][mask]
    ids, lps = teacher_completion_rows(top_ids, top_logprobs, prompt_lengths, lengths)
    per_row = bucket_jsd(rows, ids.to(rows.device), lps.to(rows.device), beta, chunk_rows=chunk_rows)
    count = int(per_row.numel())
    if count == 0:
        return student_logits.sum() * 0.0, 0
    return per_row.mean(), count
