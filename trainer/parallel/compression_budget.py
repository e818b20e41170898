"""Where the top-k ramp starts when the spec gives a byte budget instead of ``rampFrom``.

A job's compressed run sends, over its whole length, the dense warm-up, the ramp and then
``topK`` of every matrix each step (plus the 1-D tensors whole). At p = 0.01 the steady state
alone costs about 1% of plain all-reduce, so a budget of 1/20 leaves most of its bytes unspent
unless something spends them. The first compressed steps are where delay costs most (the loss
still falls fast and every entry matters), so the budget buys a denser ramp: its start is the
densest fraction, at most 1, whose planned bytes for the whole run stay within the budget.

The plan counts bytes exactly as ``compression.topk_hook`` does (2-byte values, 2-byte span
offsets, ``max(1, ceil(d * m))`` entries of every span of ``m`` entries, 1-D tensors sent whole,
micro-batches that keep their gradient local send nothing) plus an upper bound on the padding
of each message, so the bytes a run counts are never above the plan. It depends only on the
shapes and the spec, never on the data or the resume point: every rank of a data group (same
shapes) and every attempt of a job get the same start.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .compression import INDEX_SPAN, TopKState


@dataclass(frozen=True)
class BytePlan:
    ramp_from: float  # the fraction sent at the ramp's first step
    sent: int  # planned payload bytes of this rank over the whole run
    dense: int  # what plain all-reduce of the same gradients carries
    within_budget: bool  # False: warm-up and topK alone exceed the budget; the ramp starts at topK

    @property
    def ratio(self) -> float:
        """Plain all-reduce's bytes over the plan's (the "x fewer" figure)."""
        return self.dense / self.sent if self.sent else math.inf


@dataclass(frozen=True)
class SpanShapes:
    spans: Counter[int]  # span length -> how many spans of that length the top-k tensors have
    whole: int  # entries of the tensors sent whole (1-D)
    total: int  # all entries
    tensors: int  # tensors of either kind (an upper bound on messages padded per step)

    def payload(self, density: torch.Tensor, value_bytes: int) -> torch.Tensor:
        """Bytes one rank sends at each of the given densities (float64 tensor)."""
        kept = torch.zeros_like(density)
        for m, count in self.spans.items():
            kept += count * torch.clamp(torch.ceil(density * m), min=1, max=m)
        # Values of the whole-sent and kept entries, 2-byte offsets of the kept ones, and at most
        # 2 bytes of int32 padding per message (one message per bucket; never more than tensors).
        return (self.whole + kept) * value_bytes + 2 * kept + 2 * self.tensors


def shapes_of(numels: Iterable[int], whole: Iterable[bool]) -> SpanShapes:
    spans: Counter[int] = Counter()
    n_whole = total = tensors = 0
    for n, sent_whole in zip(numels, whole, strict=True):
        total += n
        tensors += 1
        if sent_whole:
            n_whole += n
            continue
        full, rest = divmod(n, INDEX_SPAN)
        if full:
            spans[INDEX_SPAN] += full
        if rest:
            spans[rest] += 1
    return SpanShapes(spans, n_whole, total, tensors)


def plan_bytes(state: TopKState, shapes: SpanShapes, micro_batches: int, element_size: int = 4) -> tuple[int, int]:
    """(planned bytes sent, bytes of plain all-reduce) of ``state``'s schedule over a run of
    ``micro_batches`` hook steps: dense warm-up, the ramp step by step, then ``fraction``."""
    dense_step = shapes.total * element_size
    value_bytes = 2 if state.half_values else 4
    warm = min(state.warmup_steps, micro_batches)
    ramp_end = min(state.warmup_steps + int(state.ramp_steps or 0), micro_batches)
    sent = float(warm * dense_step)
    if ramp_end > warm:
        steps = [s for s in range(warm, ramp_end) if not state.keeps_local(s)]
        density = torch.tensor([state.density(s) for s in steps], dtype=torch.float64)
        sent += float(shapes.payload(density, value_bytes).sum())
    n_rest = max(0, micro_batches - ramp_end)
    if state.momentum > 0 and state.accumulation > 1:  # only each step's last micro-batch sends
        n_rest = max(0, micro_batches // state.accumulation - ramp_end // state.accumulation)
    steady = float(shapes.payload(torch.tensor([state.fraction], dtype=torch.float64), value_bytes)[0])
    sent += n_rest * steady
    return math.ceil(sent), micro_batches * dense_step


def plan_ramp_from(
    state: TopKState, shapes: SpanShapes, micro_batches: int, budget: float, element_size: int = 4
) -> BytePlan:
    """The densest ramp start in [fraction, 1] whose whole run stays within ``budget`` of plain
    all-reduce's bytes (bisection: the planned bytes grow with the start). ``state`` gives the
    schedule (warm-up, ramp length, fraction, accumulation); its own ``ramp_from`` is ignored."""

    def bytes_at(start: float) -> tuple[int, int]:
        trial = TopKState(
            fraction=state.fraction,
            warmup_steps=state.warmup_steps,
            ramp_steps=state.ramp_steps,
            ramp_from=start,
            momentum=state.momentum,
            accumulation=state.accumulation,
            half_values=state.half_values,
        )
        return plan_bytes(trial, shapes, micro_batches, element_size)

    sent, dense = bytes_at(1.0)
    if sent <= budget * dense or not state.ramp_steps:
        start = 1.0 if state.ramp_steps else state.fraction
        sent, dense = bytes_at(start)
        return BytePlan(start, sent, dense, sent <= budget * dense)
    sent, dense = bytes_at(state.fraction)
    if sent > budget * dense:
        return BytePlan(state.fraction, sent, dense, False)
    low, high = state.fraction, 1.0
    for _ in range(30):  # to ~1e-9 of the interval: far below a span's one-entry step
        mid = (low + high) / 2
        if bytes_at(mid)[0] <= budget * dense:
            low = mid
        else:
            high = mid
    sent, dense = bytes_at(low)
    return BytePlan(low, sent, dense, True)
