"""The interface between the training loop and a flow, and the checkpoint state both save.

A flow owns the student as it is trained (whole, or split over ranks) and answers four things:
run one micro-batch forward and backward (``micro_step``), write and read checkpoints (``save``,
``restore``), and hand over the trained student (``final_student``). Around them it names the
parameters the optimizer steps and clips their gradients, since both depend on how the student
is laid out. The loop owns everything else: the plan, the optimizer, the schedule, the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..checkpoint import CheckpointInfo, CheckpointManager
from ..stages import Phase

Batch = dict[str, torch.Tensor]


@dataclass
class CheckpointState:
    """Everything a checkpoint holds besides the student's weights and optimizer state."""

    manager: CheckpointManager
    aux: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    scheduler: Any  # LambdaLR
    sampler: Any  # BatchSampler
    meta: dict[str, Any]  # tokens_seen, train_seconds

    def write(
        self,
        *,
        step: int,
        phase: Phase,
        temperature: float,
        model: nn.Module,
        optimizer: Any,
        extra: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Write one checkpoint with ``model`` and ``optimizer`` (the whole student's views)."""
        return self.manager.save(
            step=step,
            stage=phase.name,
            temperature=temperature,
            model=model,
            aux=self.aux,
            optimizer=optimizer,
            scheduler=self.scheduler,
            sampler=self.sampler.state_dict(),
            meta=self.meta,
            extra=extra,
        )


class TrainingFlow(Protocol):
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The student's trainable parameters by name, as the optimizer steps them."""
        ...

    @property
    def foreach_optimizer(self) -> bool | None:
        """The optimizer's ``foreach`` setting (None: torch's default)."""
        ...

    def micro_step(self, batch: Batch, phase: Phase, temperature: float, accum: int) -> tuple[float, dict[str, float]]:
        """Forward and backward of one micro-batch, gradients scaled by 1/accum; returns the
        micro-batch's loss and its named parts (the same numbers on every flow)."""
        ...

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> None: ...

    def save(self, step: int, phase: Phase, temperature: float, state: CheckpointState) -> Path | None:
        """Collective where the flow is: every rank calls it; the writer returns the path."""
        ...

    def restore(self, info: CheckpointInfo, state: CheckpointState) -> None: ...

    def enter_fake_quant(self) -> None:
        """Start QAT's fake-quant phase: INT8 fake quantization of the student's backbone Linear
        layers, in place (the loop moves the optimizer state when Parameters change)."""
        ...

    def finish(self, optimizer: torch.optim.Optimizer) -> None:
        """Collective end of training: after it ``final_student`` is complete on the writer."""
        ...

    def final_student(self) -> nn.Module:
        """The trained student, whole, as trained (fake-quant wrappers included after QAT)."""
        ...
