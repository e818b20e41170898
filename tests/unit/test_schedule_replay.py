"""Each scheduled run's data (api/replay.py): fresh window, replay at an exact fraction, eval sets,
and a plan that rebuilds the same data."""

from __future__ import annotations

import random

import pytest

from kdistill.api.replay import Partition, RunDataPlan, plan_run_data, replay_count


def parts(*sizes: int, eval_size: int = 10) -> list[Partition]:
    return [Partition(f"2026-11-{i + 1:02d}", n, eval_size) for i, n in enumerate(sizes)]


def test_replay_count_is_the_closest_whole_number() -> None:
    rng = random.Random(7)
    for _ in range(300):
        fresh = rng.randint(1, 400)
        fraction = rng.choice([0.0, 0.1, 0.2, 0.3, 0.5, 0.9, rng.random() * 0.9])
        r = replay_count(fresh, fraction)
        # fraction <= 0.9 asks for at most 9x the fresh examples; search well beyond.
        best = min(range(0, 12 * fresh), key=lambda x: (abs(x / (fresh + x) - fraction), x))
        assert r == best, (fresh, fraction)


def test_exact_fractions_on_round_numbers() -> None:
    assert replay_count(800, 0.2) == 200  # 200 / 1000
    assert replay_count(700, 0.3) == 300
    assert replay_count(900, 0.1) == 100
    assert replay_count(1000, 0.0) == 0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        replay_count(10, 1.0)


def test_window_replay_partitions_and_eval_sets() -> None:
    p = parts(100, 100, 100, 100, 800)
    plan = plan_run_data(p, window=1, fraction=0.2, replay_partitions=2, seed=3, run="s-1")
    assert plan.fresh == ("2026-11-05",)
    assert set(plan.replay) <= {"2026-11-03", "2026-11-04"}
    assert (plan.fresh_examples, plan.replay_examples, plan.replay_wanted) == (800, 200, 200)
    assert plan.replay_fraction == 0.2
    assert plan.eval_new == ("2026-11-05",) and plan.eval_old == ("2026-11-03", "2026-11-04")
    for name, lines in plan.replay.items():
        assert len(set(lines)) == len(lines) and all(0 <= i < 100 for i in lines), name

    wide = plan_run_data(p, window=2, fraction=0.0, replay_partitions=7, seed=3, run="s-1")
    assert wide.fresh == ("2026-11-04", "2026-11-05") and wide.replay == {} and wide.fresh_examples == 900
    # Forgetting is measured even without replay.
    assert wide.eval_old == ("2026-11-01", "2026-11-02", "2026-11-03")


def test_short_older_data_is_used_whole_and_the_plan_says_what_was_wanted() -> None:
    plan = plan_run_data(parts(30, 1000), window=1, fraction=0.5, replay_partitions=7, seed=0, run="s-2")
    assert (plan.replay_wanted, plan.replay_examples) == (1000, 30)
    assert plan.replay == {"2026-11-01": tuple(range(30))}


def test_the_first_run_has_no_older_data() -> None:
    plan = plan_run_data(parts(50), window=1, fraction=0.3, replay_partitions=7, seed=0, run="s-0")
    assert plan.replay == {} and plan.eval_old == () and plan.replay_wanted == 21


def test_draws_are_reproducible_and_differ_between_runs() -> None:
    p = parts(500, 500, 500, 1000)
    a = plan_run_data(p, window=1, fraction=0.25, replay_partitions=3, seed=1, run="s-100")
    assert plan_run_data(p, window=1, fraction=0.25, replay_partitions=3, seed=1, run="s-100") == a
    assert RunDataPlan.from_json(a.to_json()) == a
    b = plan_run_data(p, window=1, fraction=0.25, replay_partitions=3, seed=1, run="s-101")
    assert a.replay != b.replay and a.replay_examples == b.replay_examples == 333
    # Uniform over the pooled examples: every older partition contributes about a third.
    assert all(80 <= len(lines) <= 145 for lines in a.replay.values()) and len(a.replay) == 3


def test_bad_partition_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="no partitions"):
        plan_run_data([], window=1, fraction=0.1, replay_partitions=1, seed=0, run="r")
    with pytest.raises(ValueError, match="sorted by name"):
        plan_run_data(list(reversed(parts(5, 5))), window=1, fraction=0.1, replay_partitions=1, seed=0, run="r")
    with pytest.raises(ValueError, match="hold no training examples"):
        plan_run_data(parts(5, 0), window=1, fraction=0.1, replay_partitions=1, seed=0, run="r")
