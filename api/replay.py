"""Which examples a scheduled run trains and evaluates on: fresh data plus replay, as a plan.

Pure and standard-library only, so the operator, the trainer side and `kdistill schedule run`
share it. The plan names every replayed line, so writing it down (plan.json beside the run's
data, or on the job) is enough to rebuild the run's data exactly.

- Fresh data: every training example of the newest `window` partitions.
- Replay: `fraction` of the run's training examples, drawn without replacement from the
  `partitions` partitions just before the window (uniformly over their pooled examples, seeded
  by the schedule's seed and the run's name). The count is the whole number R that puts
  R / (fresh + R) closest to `fraction`; when the older partitions hold fewer examples, all of
  them are used and the plan says how many were wanted.
- Eval: the fresh partitions' eval sets (the newest eval data) and those of the replay's
  partitions (the older eval data), whatever the fraction, so forgetting is measured even
  without replay.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Partition:
    name: str
    train: int  # examples in its train.jsonl
    eval: int  # examples in its eval.jsonl


@dataclass(frozen=True)
class RunDataPlan:
    run: str
    seed: int
    fraction: float
    fresh: tuple[str, ...]
    replay: dict[str, tuple[int, ...]] = field(default_factory=dict)  # partition -> train line numbers (0-based)
    eval_new: tuple[str, ...] = ()
    eval_old: tuple[str, ...] = ()
    fresh_examples: int = 0
    replay_wanted: int = 0

    @property
    def replay_examples(self) -> int:
        return sum(len(lines) for lines in self.replay.values())

    @property
    def replay_fraction(self) -> float:
        """The share of replayed examples in the run's training set."""
        total = self.fresh_examples + self.replay_examples
        return self.replay_examples / total if total else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunDataPlan:
        raw: dict[str, Any] = json.loads(text)
        return cls(
            run=raw["run"],
            seed=raw["seed"],
            fraction=raw["fraction"],
            fresh=tuple(raw["fresh"]),
            replay={k: tuple(v) for k, v in raw["replay"].items()},
            eval_new=tuple(raw["eval_new"]),
            eval_old=tuple(raw["eval_old"]),
            fresh_examples=raw["fresh_examples"],
            replay_wanted=raw["replay_wanted"],
        )


def replay_count(fresh: int, fraction: float) -> int:
    """The whole number R for which R / (fresh + R) is closest to `fraction` (ties: the smaller)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or fresh == 0:
        return 0
    exact = fraction * fresh / (1.0 - fraction)
    low, high = math.floor(exact), math.ceil(exact)
    return min((low, high), key=lambda r: (abs(r / (fresh + r) - fraction), r))


def plan_run_data(
    partitions: Sequence[Partition], *, window: int, fraction: float, replay_partitions: int, seed: int, run: str
) -> RunDataPlan:
    """The data of run `run` from `partitions` (sorted by name, newest last)."""
    if not partitions:
        raise ValueError("no partitions to train on")
    names = [p.name for p in partitions]
    if names != sorted(names) or len(set(names)) != len(names):
        raise ValueError("partitions must be sorted by name, each name once")
    fresh = list(partitions[-window:])
    older = list(partitions[: len(partitions) - len(fresh)][-replay_partitions:])
    fresh_examples = sum(p.train for p in fresh)
    if fresh_examples == 0:
        raise ValueError(f"the newest partitions ({', '.join(p.name for p in fresh)}) hold no training examples")
    wanted = replay_count(fresh_examples, fraction)
    pool = sum(p.train for p in older)
    drawn = sorted(random.Random(f"{seed}:{run}").sample(range(pool), min(wanted, pool)))
    replay: dict[str, tuple[int, ...]] = {}
    start = 0
    for p in older:
        lines = tuple(i - start for i in drawn if start <= i < start + p.train)
        if lines:
            replay[p.name] = lines
        start += p.train
    return RunDataPlan(
        run=run,
        seed=seed,
        fraction=fraction,
        fresh=tuple(p.name for p in fresh),
        replay=replay,
        eval_new=tuple(p.name for p in fresh if p.eval),
        eval_old=tuple(p.name for p in older if p.eval),
        fresh_examples=fresh_examples,
        replay_wanted=wanted,
    )
