"""The byte budget's plan of the top-k ramp: pure arithmetic over shapes, no processes."""

from __future__ import annotations

import pytest

from kdistill.trainer.parallel.compression import INDEX_SPAN, TopKState
from kdistill.trainer.parallel.compression_budget import plan_bytes, plan_ramp_from, shapes_of

# A small GPT-like student: two matrices, one larger than a span, and 1-D tensors.
SHAPES = shapes_of([3 * INDEX_SPAN + 100, 4096, 256, 256], [False, False, True, True])


def test_shapes_cut_top_k_tensors_into_spans_and_count_the_whole_ones_apart() -> None:
    assert dict(SHAPES.spans) == {INDEX_SPAN: 3, 100: 1, 4096: 1}
    assert (SHAPES.whole, SHAPES.total, SHAPES.tensors) == (512, 3 * INDEX_SPAN + 100 + 4096 + 512, 4)


def test_plan_counts_warm_up_dense_and_compressed_steps_like_the_hook() -> None:
    state = TopKState(fraction=0.01, warmup_steps=3, ramp_steps=0)
    sent, dense = plan_bytes(state, SHAPES, 10)
    assert dense == 10 * 4 * SHAPES.total
    # Each compressed step: 2-byte values of the whole-sent and kept entries, 2-byte offsets of the
    # kept ones (ceil(1% of each span), at least one), and at most 2 bytes of padding per tensor.
    kept = 3 * 656 + 1 + 41
    assert sent == 3 * 4 * SHAPES.total + 7 * (2 * (512 + kept) + 2 * kept + 2 * 4)


def test_momentum_with_accumulation_plans_one_message_per_step() -> None:
    one = plan_bytes(TopKState(fraction=0.01, warmup_steps=2, ramp_steps=0, momentum=0.9), SHAPES, 10)
    two = plan_bytes(TopKState(fraction=0.01, warmup_steps=4, ramp_steps=0, momentum=0.9, accumulation=2), SHAPES, 20)
    # The warm-up sends every micro-batch (twice as many); the compressed steps one message each.
    assert two[1] == 2 * one[1]
    assert two[0] - one[0] == 2 * 4 * SHAPES.total


def test_the_start_is_the_densest_that_fits_the_budget() -> None:
    state = TopKState(fraction=0.01, warmup_steps=10, ramp_steps=100)
    plan = plan_ramp_from(state, SHAPES, 400, 0.05)
    assert plan.within_budget and 0.01 < plan.ramp_from < 1.0
    assert plan.sent <= 0.05 * plan.dense and plan.ratio >= 20
    denser = TopKState(fraction=0.01, warmup_steps=10, ramp_steps=100, ramp_from=plan.ramp_from * 1.01)
    assert plan_bytes(denser, SHAPES, 400)[0] > 0.05 * plan.dense
    # A larger budget buys a denser start, up to all entries.
    assert plan_ramp_from(state, SHAPES, 400, 0.1).ramp_from > plan.ramp_from
    assert plan_ramp_from(state, SHAPES, 400, 1.0).ramp_from == 1.0
    # A longer run spreads the warm-up's bytes thinner: the same budget starts denser.
    longer = TopKState(fraction=0.01, warmup_steps=10, ramp_steps=500)
    assert plan_ramp_from(longer, SHAPES, 2000, 0.05).ramp_from > plan.ramp_from


@pytest.mark.parametrize(
    ("state", "steps"),
    [
        (TopKState(fraction=0.01, warmup_steps=30, ramp_steps=10), 400),  # the warm-up alone is 7.5%
        (TopKState(fraction=0.1, warmup_steps=10, ramp_steps=100), 400),  # topK alone is 10%
    ],
)
def test_a_budget_warm_up_and_top_k_exceed_ramps_from_top_k(state: TopKState, steps: int) -> None:
    plan = plan_ramp_from(state, SHAPES, steps, 0.05)
    assert (plan.ramp_from, plan.within_budget) == (state.fraction, False)
    assert plan.sent > 0.05 * plan.dense


def test_without_a_ramp_the_start_is_top_k() -> None:
    plan = plan_ramp_from(TopKState(fraction=0.01, warmup_steps=10, ramp_steps=0), SHAPES, 400, 0.05)
    assert plan.ramp_from == 0.01 and plan.within_budget
