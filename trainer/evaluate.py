"""Evaluation: accuracy for classification, perplexity for causal-lm, and retention."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class EvalResult:
    metric: str  # "accuracy" or "perplexity"
    value: float
    loss: float  # mean cross-entropy per token (causal-lm) or per sample
    count: int  # tokens or samples scored


def higher_is_better(metric: str) -> bool:
    return metric == "accuracy"


def retention(metric: str, teacher: float, student: float) -> float:
    """Student score over teacher score; for perplexity (lower is better) teacher / student."""
    if higher_is_better(metric):
        return student / teacher if teacher > 0 else 0.0
    return teacher / student if student > 0 else 0.0


def score(teacher: EvalResult | None, student: EvalResult | None) -> dict[str, Any]:
    """The metrics block of result.json and the artifact: both scores and the retention."""
    if teacher is None or student is None:
        return {}
    return {
        "metric": teacher.metric,
        "teacher": teacher.value,
        "student": student.value,
        "retention": retention(teacher.metric, teacher.value, student.value),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]] | Any,
    task: str,
    device: torch.device,
    autocast: Callable[[], Any] | None = None,
) -> EvalResult:
    """Score ``model`` on collated batches (``input_ids``, ``attention_mask``, ``labels``)."""
    was_training = model.training
    model.eval()
    total_loss = 0.0
    count = 0
    correct = 0
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
        return EvalResult("perplexity", math.exp(min(mean, 700.0)), mean, count)
    return EvalResult("accuracy", correct / count, mean, count)
