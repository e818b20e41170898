"""Collating tokenized examples into padded tensors with a padding mask.

Padding is on the right. For causal-lm, ``labels`` are the input ids with -100 on padding: the
models shift them themselves, and -100 is the ignore index of every loss. For
sequence-classification, ``labels`` is one class id per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import TokenizedExample
from .sampling import Task

IGNORE_INDEX = -100


def padding_efficiency(batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / padded slots over batches given as lists of lengths (1.0 = no padding)."""
    real = sum(sum(b) for b in batches)
    slots = sum(len(b) * max(b) for b in batches if b)
    return real / slots if slots else 1.0


def collate(
    batch: Sequence[TokenizedExample], pad_id: int, task: Task, *, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [B, L], ``labels`` and ``example_ids`` [B] int64."""
    if not batch:
        raise ValueError("collate: empty batch")
    if task not in ("causal-lm", "sequence-classification"):
        raise ValueError(f"unknown task {task!r}: expected 'causal-lm' or 'sequence-classification'")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if any(not ex.input_ids for ex in batch):
        raise ValueError("collate: an example has no tokens")
    longest = max(len(ex.input_ids) for ex in batch)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
    example_ids = torch.tensor([ex.index for ex in batch], dtype=torch.long)
    if task == "causal-lm":
        # Mask by attention, not by pad_id: the pad id may also be a real token (e.g. eos as pad).
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    else:
        missing = [ex.index for ex in batch if ex.label is None]
        if missing:
            raise ValueError(f"collate: sequence-classification examples without a label: {missing[:5]}")
        labels = torch.tensor([ex.label for ex in batch], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "example_ids": example_ids}
