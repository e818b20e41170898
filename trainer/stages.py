"""The run as a plan of phases: the distillation stages in order, then the QAT phase.

Pure logic: which phase a step belongs to, its objectives and its temperature. The temperature
schedule runs once over all distillation stages (start → end); the QAT phase uses ``end``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from kdistill.api import DistillationJobSpec

PhaseKind = Literal["distill", "qat-reduced", "qat-fake-quant"]


@dataclass(frozen=True)
class Phase:
    name: str
    kind: PhaseKind
    start: int  # first global step (0-based) of the phase
    steps: int
    objectives: tuple[str, ...]
    attention_rank: int = 0

    @property
    def end(self) -> int:
        return self.start + self.steps


def build_plan(
    spec: DistillationJobSpec, qat_split: Callable[[int, float], tuple[int, int]] | None = None
) -> list[Phase]:
    """Phases in order; ``qat_split`` divides qatSteps into reduced-precision and fake-quant steps."""
    plan: list[Phase] = []
    at = 0
    for stage in spec.distillation.stages:
        plan.append(Phase(stage.name, "distill", at, stage.steps, tuple(stage.objectives), stage.attention_rank))
        at += stage.steps
    q = spec.quantization
    if q.mode == "qat-int8" and q.qat_steps > 0:
        if qat_split is None:
            raise ValueError("a qat-int8 plan needs the QAT phase split")
        reduced, fake = qat_split(q.qat_steps, q.reduced_precision_fraction)
        if reduced:
            plan.append(Phase("qat-reduced-precision", "qat-reduced", at, reduced, ("logits",)))
            at += reduced
        if fake:
            plan.append(Phase("qat-fake-quant", "qat-fake-quant", at, fake, ("logits",)))
    return plan


def total_steps(plan: list[Phase]) -> int:
    return plan[-1].end if plan else 0


def phase_at(plan: list[Phase], step: int) -> Phase:
    for phase in plan:
        if phase.start <= step < phase.end:
            return phase
    raise IndexError(f"step {step} is outside the plan ({total_steps(plan)} steps)")


def distill_steps(plan: list[Phase]) -> int:
    return sum(p.steps for p in plan if p.kind == "distill")


def temperature(spec: DistillationJobSpec, plan: list[Phase], step: int, schedule_fn: Callable[..., float]) -> float:
    t = spec.distillation.temperature
    if phase_at(plan, step).kind != "distill":
        return t.end
    # The last distillation step runs at exactly ``end``.
    return schedule_fn(step, max(distill_steps(plan) - 1, 1), t.schedule, t.start, t.end)
