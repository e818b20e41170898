"""Evaluation: accuracy for classification, perplexity and bits per byte for causal-lm, and retention.

Bits per byte is the causal LM's summed negative log-likelihood in bits over the UTF-8 bytes of
the tokens it was scored on (every token but each text's first, which has no context). Unlike
perplexity, which is per token, it does not depend on how a tokenizer cuts the text, so models
with different tokenizers compare on it; a student with its own tokenizer is scored by it
(metric ``bits-per-byte``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class EvalResult:
    metric: str  # "accuracy", "perplexity" or "bits-per-byte"
    value: float
    loss: float  # mean cross-entropy per token (causal-lm) or per sample
    count: int  # tokens or samples scored
    bits_per_byte: float | None = None  # causal-lm, when the batches carry ``scored_bytes``

    def by_bits_per_byte(self) -> EvalResult:
        """The same evaluation with bits per byte as its metric (models with other tokenizers)."""
        if self.bits_per_byte is None:
            raise ValueError("this evaluation has no bits per byte (no scored_bytes in its batches)")
        return replace(self, metric="bits-per-byte", value=self.bits_per_byte)


def higher_is_better(metric: str) -> bool:
    return metric == "accuracy"


def retention(metric: str, teacher: float, student: float) -> float:
    """Student score over teacher score; for perplexity and bits per byte (lower is better)
    teacher / student."""
    if higher_is_better(metric):
        return student / teacher if teacher > 0 else 0.0
    return teacher / student if student > 0 else 0.0


def score(teacher: EvalResult | None, student: EvalResult | None) -> dict[str, Any]:
    """The metrics block of result.json and the artifact: both scores and the retention."""
    if teacher is None or student is None:
        return {}
    out: dict[str, Any] = {
        "metric": teacher.metric,
        "teacher": teacher.value,
        "student": student.value,
        "retention": retention(teacher.metric, teacher.value, student.value),
    }
    if teacher.bits_per_byte is not None and student.bits_per_byte is not None:
        out["teacherBitsPerByte"] = teacher.bits_per_byte
        out["studentBitsPerByte"] = student.bits_per_byte
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]] | Any,
    task: str,
    device: torch.device,
    autocast: Callable[[], Any] | None = None,
) -> EvalResult:
    """Score ``model`` on collated batches (``input_ids``, ``attention_mask``, ``labels``, and for
    bits per byte ``scored_bytes``: [B] bytes each row is scored on)."""
    was_training = model.training
    model.eval()
    total_loss = 0.0
    count = 0
    correct = 0
    scored_bytes: int | None = 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            labels = batch["labels"].to(device)
            if autocast is not None:
                with autocast():
                    logits = model(input_ids=ids, attention_mask=mask).logits
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
            logits = logits.float()
            if task == "causal-lm":
                targets = labels[:, 1:]
                valid = targets != -100
                rows = logits[:, :-1][valid]
                total_loss += float(nn.functional.cross_entropy(rows, targets[valid], reduction="sum"))
                count += int(valid.sum())
                in_batch = batch.get("scored_bytes")
                scored_bytes = None if in_batch is None or scored_bytes is None else scored_bytes + int(in_batch.sum())
            else:
                total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                count += int(labels.numel())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluation data has nothing to score")
    mean = total_loss / count
    if task == "causal-lm":
        bpb = total_loss / math.log(2) / scored_bytes if scored_bytes else None
        return EvalResult("perplexity", math.exp(min(mean, 700.0)), mean, count, bpb)
    return EvalResult("accuracy", correct / count, mean, count)
