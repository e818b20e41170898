"""Scalar schedules: the distillation temperature and the learning-rate multiplier."""

from __future__ import annotations

import math
from typing import Literal, get_args

TemperatureSchedule = Literal["constant", "linear", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(TemperatureSchedule)


def _progress(step: int, total_steps: int) -> float:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    if total_steps == 0 or step >= total_steps:
        return 1.0
    return step / total_steps


def temperature_at(step: int, total_steps: int, schedule: TemperatureSchedule, start: float, end: float) -> float:
    """Temperature at ``step`` of ``total_steps``: ``start`` at step 0, ``end`` from total_steps on.

    ``constant`` stays at ``start``; ``linear`` interpolates; ``cosine`` follows a half cosine,
    flat at both ends, so the softest targets last a little longer early on.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown temperature schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    for name, value in (("start", start), ("end", end)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"temperature {name} must be a positive finite number, got {value}")
    p = _progress(step, total_steps)
    if schedule == "constant":
        return float(start)
    if schedule == "linear":
        return float(start + (end - start) * p) if p < 1.0 else float(end)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))) if p < 1.0 else float(end)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``.

    ``step`` counts optimizer steps already taken (LambdaLR's convention), so the first step runs
    at 1/warmup of the peak rather than at 0, and step ``warmup_steps - 1`` reaches the peak.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0 if step < max(total_steps, warmup_steps) else min_ratio
    p = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
