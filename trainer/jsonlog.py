"""Progress as JSON lines on stdout, for logs that machines read (pods, CI, pipes)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from .options import StepReport


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def step_record(r: StepReport) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "event": "step",
        "stage": r.stage,
        "step": r.step,
        "totalSteps": r.total_steps,
        "loss": round(r.loss, 6),
        "parts": {k: round(v, 6) for k, v in r.parts.items()},
        "temperature": round(r.temperature, 4),
        "lr": r.learning_rate,
        "tokensPerSecond": round(r.tokens_per_second, 1),
        "stepSeconds": round(r.step_seconds, 4),
    }
    if r.checkpoint:
        rec["checkpoint"] = r.checkpoint
    return rec


def json_step_printer(every: int = 1) -> Callable[[StepReport], None]:
    def emit(r: StepReport) -> None:
        if _is_rank0() and (r.step % every == 0 or r.step == r.total_steps or r.checkpoint):
            print(json.dumps(step_record(r)), file=sys.stdout, flush=True)

    return emit


def json_event_printer() -> Callable[[str, dict[str, Any]], None]:
    def emit(name: str, fields: dict[str, Any]) -> None:
        if _is_rank0():
            print(json.dumps({"event": name, **fields}, default=str), file=sys.stdout, flush=True)

    return emit
