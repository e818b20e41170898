"""A scheduled run's data files, built from the schedule's partition folder (data.runData).

A DistillationSchedule (in the operator, or `kdistill schedule run` locally) writes
`data.runData` into each run's job. Before training, every rank calls `ensure_run_data`:

- the first call plans the run (api/replay.py: the newest `window` partitions as fresh data, a
  `replayFraction` share drawn from older ones) and writes data.train, data.eval (the newest
  partitions' eval examples), eval-old.jsonl (the older partitions' eval examples, when there
  are any) and plan.json, in that order, each atomically; plan.json last, so its presence means
  the files are complete;
- a later call (a gang restart, another rank) finds plan.json for the same run and keeps the
  files: the run trains on the same examples even after newer partitions arrive.

Ranks that race on the first call write the same bytes (the plan is a pure function of the
partitions and the seed), each through its own temporary file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kdistill.api.failures import ExitCode
from kdistill.api.replay import Partition, RunDataPlan, plan_run_data
from kdistill.api.spec import DistillationJobSpec, RunData

from .errors import TrainerError
from .sources import resolve_source

TRAIN, EVAL = "train.jsonl", "eval.jsonl"
EVAL_OLD, PLAN = "eval-old.jsonl", "plan.json"


def _lines(path: Path) -> Iterator[str]:
    """The non-blank lines of a JSON-lines file, as written (newline stripped)."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\n")


def list_partitions(folder: Path) -> list[Partition]:
    """The partitions of `folder`: subfolders holding train.jsonl, sorted by name."""
    if not folder.is_dir():
        raise TrainerError(ExitCode.BAD_DATA, f"{folder}: the partition folder does not exist")
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / TRAIN).is_file()):
        out.append(Partition(sub.name, sum(1 for _ in _lines(sub / TRAIN)), sum(1 for _ in _lines(sub / EVAL))))
    if not out:
        raise TrainerError(ExitCode.BAD_DATA, f"{folder}: no partitions (subfolders with {TRAIN})")
    return out


def _write_lines(path: Path, lines: Iterator[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class RunFiles:
    train: Path
    eval_new: Path
    eval_old: Path | None
    plan: RunDataPlan


def write_run_data(plan: RunDataPlan, folder: Path, train: Path, eval_new: Path) -> RunFiles:
    """The run's files as `plan` says, from the partitions in `folder`; eval-old.jsonl and
    plan.json go beside `train`."""
    if not plan.eval_new:
        raise TrainerError(
            ExitCode.BAD_DATA, f"the newest partitions ({', '.join(plan.fresh)}) have no {EVAL}: nothing to evaluate on"
        )

    def train_lines() -> Iterator[str]:
        for name in plan.fresh:
            yield from _lines(folder / name / TRAIN)
        for name, wanted in plan.replay.items():
            keep = set(wanted)
            yield from (line for i, line in enumerate(_lines(folder / name / TRAIN)) if i in keep)

    def eval_lines(names: tuple[str, ...]) -> Iterator[str]:
        for name in names:
            yield from _lines(folder / name / EVAL)

    _write_lines(train, train_lines())
    _write_lines(eval_new, eval_lines(plan.eval_new))
    eval_old = train.with_name(EVAL_OLD) if plan.eval_old else None
    if eval_old is not None:
        _write_lines(eval_old, eval_lines(plan.eval_old))
    _write_lines(train.with_name(PLAN), iter([plan.to_json()]))
    return RunFiles(train, eval_new, eval_old, plan)


def read_plan(train: Path) -> RunDataPlan | None:
    """The plan written beside `train`, or None when there is none (or it does not parse)."""
    path = train.with_name(PLAN)
    try:
        return RunDataPlan.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError):
        return None


def ensure_run_data(spec: DistillationJobSpec, base_dir: Path) -> RunFiles | None:
    """Write the run's data files unless this run wrote them already; None without runData."""
    run = spec.data.run_data
    if run is None:
        return None
    assert spec.data.eval is not None  # the API requires it with runData
    train = resolve_source(spec.data.train, base_dir)
    eval_new = resolve_source(spec.data.eval, base_dir)
    done = read_plan(train)
    if done is not None and done.run == run.run and train.is_file() and eval_new.is_file():
        eval_old = train.with_name(EVAL_OLD)
        return RunFiles(train, eval_new, eval_old if eval_old.is_file() else None, done)
    return write_run_data(plan_for(run, base_dir), resolve_source(run.partitions, base_dir), train, eval_new)


def plan_for(run: RunData, base_dir: Path) -> RunDataPlan:
    """The run's plan over the partitions there are now."""
    folder = resolve_source(run.partitions, base_dir)
    try:
        return plan_run_data(
            list_partitions(folder),
            window=run.window,
            fraction=run.replay_fraction,
            replay_partitions=run.replay_partitions,
            seed=run.seed,
            run=run.run,
        )
    except ValueError as exc:
        raise TrainerError(ExitCode.BAD_DATA, f"{folder}: {exc}") from None


def plan_summary(plan: RunDataPlan) -> dict[str, object]:
    """What the run's log and result say about its data."""
    return {
        "fresh": list(plan.fresh),
        "freshExamples": plan.fresh_examples,
        "replayPartitions": list(plan.replay),
        "replayExamples": plan.replay_examples,
        "replayFraction": round(plan.replay_fraction, 4),
    }
