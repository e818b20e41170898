"""Teacher scoring: the log-probability of each token of a text under the model, with the model's
top-K alternatives at each position (``echo: true, max_tokens: 0, logprobs: K``).

Scoring requests share the causal-LM batcher with generation: the batch's scoring rows run as a few
right-padded forward passes of similar lengths (``length_groups``), one log-softmax in FP32 over
each. Position 0 has no prediction (nothing precedes it): its log-prob is NaN and its top-K ids -1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .batcher import length_groups
from .runtime import inference_mode

# Positions per log-softmax in ``score_batch``.
SCORE_CHUNK = 256


@dataclass
class TokenLogprobs:
    """Per-token log-probs of ``token_ids`` [T]: the token's own [T] and the top-K alternatives
    (ids [T, K], log-probs [T, K], most likely first). A row with no prediction holds NaN / -1."""

    token_ids: list[int]
    token_logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1])


@dataclass
class ScoreRequest:
    prompt_ids: list[int]
    top_k: int
    # Called on the worker thread once scored, so that a scoring request admitted into a running
    # generation batch is answered then rather than when the batch ends.
    on_done: Callable[[TokenLogprobs], None] | None = None


def rows_logprobs(logits: torch.Tensor, next_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Log-probs of ``next_ids`` [N] under ``logits`` [N, V] and the top-``k`` of each row (FP32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    own = logp.gather(-1, next_ids[:, None].long())[:, 0]
    top_lp, top_ids = torch.topk(logp, k, dim=-1) if k else (logp[:, :0], next_ids[:, None][:, :0])
    return own, top_ids.to(torch.int32), top_lp


def _first_row(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.full((1,), float("nan")),
        torch.full((1, k), -1, dtype=torch.int32),
        torch.full((1, k), float("nan")),
    )


@inference_mode
def score_batch(
    model: nn.Module, requests: list[ScoreRequest], pad_id: int, overhead_tokens: int
) -> list[TokenLogprobs]:
    """Every request's token log-probs, in order, from right-padded passes of similar lengths."""
    out: list[TokenLogprobs | None] = [None] * len(requests)
    for group in length_groups([len(r.prompt_ids) for r in requests], overhead_tokens):
        rows = [requests[i] for i in group]
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[j, : len(r.prompt_ids)] = 1
        padded = any(len(r.prompt_ids) != width for r in rows)
        logits = model(input_ids=ids, **({"attention_mask": mask} if padded else {})).logits
        for j, (i, r) in enumerate(zip(group, rows, strict=True)):
            n = len(r.prompt_ids)
            first = _first_row(r.top_k)
            parts = [first]
            # A few hundred positions at a time: the FP32 log-softmax of a long prompt over a large
            # vocabulary would otherwise be one [T, V] temporary beside the logits.
            for at in range(0, n - 1, SCORE_CHUNK):
                end = min(n - 1, at + SCORE_CHUNK)
                parts.append(rows_logprobs(logits[j, at:end], ids[j, at + 1 : end + 1], r.top_k))
            out[i] = TokenLogprobs(list(r.prompt_ids), *(torch.cat([p[c] for p in parts]) for c in range(3)))
    return [o for o in out if o is not None]
