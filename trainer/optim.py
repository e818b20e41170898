"""The optimizer and learning-rate schedule of a run, built from named parameters."""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from kdistill.api.spec import Distillation

from .schedules import lr_multiplier

NamedParams = list[tuple[str, nn.Parameter]]


def in_group_order(named: NamedParams) -> NamedParams:
    """``named`` in the optimizer's parameter order: the decayed group (matrices) first, then the
    undecayed one (biases and norms, 1-D). Optimizer state is indexed by this order."""
    return [(n, p) for n, p in named if p.ndim >= 2] + [(n, p) for n, p in named if p.ndim < 2]


def build_optimizer(
    named: NamedParams, distillation: Distillation, total_steps: int, *, foreach: bool | None = None
) -> tuple[Optimizer, LambdaLR]:
    """AdamW with no weight decay on biases and norms (as usual for transformers), and the
    warm-up/decay schedule over ``total_steps``."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    optimizer = AdamW(
        [{"params": decay, "weight_decay": distillation.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=distillation.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        foreach=foreach,
    )
    warmup = distillation.warmup_steps
    scheduler = LambdaLR(optimizer, lambda s: lr_multiplier(s, warmup, total_steps))
    return optimizer, scheduler
