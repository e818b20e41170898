"""What a caller hands the trainer (``RunOptions``) and what it gets back after every step
(``StepReport``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .outputs import OutputLayout


@dataclass
class StepReport:
    step: int  # optimizer steps done
    total_steps: int
    stage: str
    loss: float
    parts: dict[str, float]
    temperature: float
    learning_rate: float
    tokens_per_second: float
    step_seconds: float
    checkpoint: str | None = None


@dataclass
class RunOptions:
    output: OutputLayout
    base_dir: Path
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    on_step: Callable[[StepReport], None] | None = None
    on_event: Callable[[str, dict[str, Any]], None] | None = None
    evaluate: bool = True

    @property
    def is_writer(self) -> bool:
        return self.rank == 0
