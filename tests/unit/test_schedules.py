"""Temperature schedules and the learning-rate multiplier: endpoints, shape, monotonicity."""

from __future__ import annotations

import itertools
import math

import pytest

from kdistill.trainer.schedules import lr_multiplier, temperature_at


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(("start", "end"), [(5.0, 1.0), (1.0, 4.0)])
def test_temperature_endpoints_and_monotonicity(schedule: str, start: float, end: float) -> None:
    total = 40
    temps = [temperature_at(s, total, schedule, start, end) for s in range(total + 5)]  # type: ignore[arg-type]
    assert temps[0] == start
    assert temps[total] == end and temps[total + 4] == end  # past the end stays at end
    pairs = list(itertools.pairwise(temps[: total + 1]))
    if start > end:
        assert all(a > b for a, b in pairs)
    else:
        assert all(a < b for a, b in pairs)
    assert all(min(start, end) <= t <= max(start, end) for t in temps)


def test_linear_and_cosine_shapes() -> None:
    assert temperature_at(5, 20, "linear", 5.0, 1.0) == pytest.approx(4.0)
    assert temperature_at(10, 20, "cosine", 5.0, 1.0) == pytest.approx(3.0)  # midpoint is the mean
    # Cosine is flat at the start: its first step moves less than the linear one.
    assert 5.0 - temperature_at(1, 100, "cosine", 5.0, 1.0) < 5.0 - temperature_at(1, 100, "linear", 5.0, 1.0)
    quarter = 1.0 + 4.0 * 0.5 * (1 + math.cos(math.pi / 4))
    assert temperature_at(25, 100, "cosine", 5.0, 1.0) == pytest.approx(quarter)


def test_constant_and_degenerate_totals() -> None:
    assert [temperature_at(s, 10, "constant", 2.0, 2.0) for s in (0, 5, 10, 99)] == [2.0] * 4
    assert temperature_at(0, 0, "linear", 5.0, 1.0) == 1.0  # no steps: already at the end


def test_temperature_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown temperature schedule 'exp'"):
        temperature_at(0, 10, "exp", 5.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be >= 0"):
        temperature_at(-1, 10, "linear", 5.0, 1.0)
    with pytest.raises(ValueError, match="temperature end"):
        temperature_at(0, 10, "linear", 5.0, 0.0)


def test_lr_warmup_then_cosine_to_min_ratio() -> None:
    warmup, total = 10, 50
    m = [lr_multiplier(s, warmup, total, 0.1) for s in range(total + 5)]
    assert m[0] == pytest.approx(0.1)  # first step runs at 1/warmup of the peak, not 0
    assert all(a < b for a, b in itertools.pairwise(m[:warmup]))  # linear warmup
    assert m[warmup - 1] == 1.0 and m[warmup] == 1.0
    assert all(a > b for a, b in itertools.pairwise(m[warmup : total + 1]))  # cosine decay
    assert m[total] == pytest.approx(0.1) and m[total + 4] == pytest.approx(0.1)
    mid = warmup + (total - warmup) // 2
    assert m[mid] == pytest.approx(0.1 + 0.9 * 0.5)


def test_lr_without_warmup_and_bad_input() -> None:
    assert lr_multiplier(0, 0, 10, 0.0) == 1.0
    assert lr_multiplier(10, 0, 10, 0.0) == pytest.approx(0.0)
    # Warmup longer than the run: the run only warms up.
    assert lr_multiplier(4, 100, 5) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="min_ratio"):
        lr_multiplier(0, 1, 10, 1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_multiplier(0, -1, 10)
