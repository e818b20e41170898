"""The ``sequence`` objective (sequence-level KD): cross-entropy on teacher-written completions.

Each example is a prompt followed by one of the teacher's completions, tokenized with the
*student's* tokenizer (text is the interface, so the teacher's vocabulary does not matter). The
loss is the mean next-token cross-entropy over the completion's tokens only: the prompt is
context, not a target, as in supervised fine-tuning. A token that straddles the prompt's end
counts as prompt. No end-of-sequence token is appended: a completion cut at maxNewTokens did
not end there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batching import collate
from .data import TokenizedExample
from .losses import hard_label_ce
from .objective import IGNORE_INDEX, trained_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompletionExample(TokenizedExample):
    prompt_tokens: int = 0  # leading tokens that are context only


def _prompt_tokens(offsets: Sequence[Sequence[int]], prompt_chars: int) -> int:
    """Leading tokens that start inside the prompt (special tokens have empty spans at 0)."""
    for i, (start, end) in enumerate(offsets):
        if start >= prompt_chars and end > start:
            return i
    return len(offsets)


def tokenize_completions(
    records: Iterable[dict[str, Any]], tokenizer: Any, max_length: int, *, chunk: int = 512
) -> list[CompletionExample]:
    """prompt + completion as token ids, truncated to ``max_length``, with the prompt's length.

    An example whose completion falls wholly past ``max_length`` (or is empty) has nothing to
    train on and is dropped with a count in the log."""
    rows = list(records)
    out: list[CompletionExample] = []
    dropped = 0
    fast = bool(getattr(tokenizer, "is_fast", False))
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        texts = [r["prompt"] + r["completion"] for r in part]
        if fast:
            enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
            cuts = [_prompt_tokens(o, len(r["prompt"])) for o, r in zip(enc["offset_mapping"], part, strict=True)]
        else:  # no character offsets: the prompt tokenized on its own
            enc = tokenizer(texts, truncation=True, max_length=max_length)
            prompt_enc = tokenizer([r["prompt"] for r in part], truncation=True, max_length=max_length)
            cuts = [len(ids) for ids in prompt_enc["input_ids"]]
        for ids, cut in zip(enc["input_ids"], cuts, strict=True):
            if cut >= len(ids):
                dropped += 1
                continue
            out.append(CompletionExample(index=len(out), input_ids=list(ids), label=None, prompt_tokens=cut))
    if dropped:
        log.warning(
            "dropped %d of %d generated examples with no completion tokens within maxSeqLength", dropped, len(rows)
        )
    return out


def collate_completions(batch: Sequence[CompletionExample], pad_id: int) -> dict[str, torch.Tensor]:
    """A padded causal-LM batch whose labels are -100 on the prompt (and on padding)."""
    out = collate(batch, pad_id, "causal-lm")
    labels = out["labels"]
    for i, ex in enumerate(batch):
        labels[i, : ex.prompt_tokens] = IGNORE_INDEX
    return out


def completion_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token CE over the completion tokens of a batch (logits [B, L, V])."""
    valid = trained_rows(labels)
    rows = logits[:, :-1][valid].float()
    ce = hard_label_ce(rows, labels[:, 1:][valid]).mean()
    return ce, {"ce": float(ce.detach())}
