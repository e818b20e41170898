"""`kdistill schedule run`: a DistillationSchedule's rounds on this machine, with the same rules.

Round i of N sees the partitions of the folder up to the (P - N + i)-th (P partitions in all),
so N rounds walk over the newest N partitions as if one arrived before each round: the round's
folder OUTPUT/<round>/partitions holds links to the partitions it sees. Each round:

1. writes a DistillationJob from the template with `data.runData` as the operator's scheduler
   does: the trainer plans the round's data (the newest `window` partitions as fresh data,
   `replay.fraction` drawn from older ones), writes it to OUTPUT/<round>/data/ with plan.json,
   and scores the champion (the promoted student) on the same eval data (trainer/run_data.py,
   trainer/run_scores.py);
2. runs it through `kdistill run` (a subprocess; warmStart lastPromoted starts the student from
   the promoted student's full-precision weights);
3. decides with the promotion gate (operator/schedule_logic.py) on the run's metrics;
4. records the decision in the history and in OUTPUT/status.json, as the schedule's status.

Rounds are named `<schedule>-<round>`; outputs go to OUTPUT/<round name>/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from kdistill.api import DistillationJob, DistillationSchedule
from kdistill.api.metadata import STUDENT_DIR
from kdistill.api.schedule import DistillationScheduleStatus, HistoryEntry, PromotedRef
from kdistill.api.spec import DistillationJobSpec, RunData, Student
from kdistill.operator.schedule_logic import gate_decision, history_entry, scores_from_metrics

TRAIN = "train.jsonl"
RUN_COMMAND = (sys.executable, "-P", "-m", "kdistill.cli.main", "run")


class ScheduleRunError(RuntimeError):
    """The rounds cannot start (no partitions, too few of them)."""


def partition_names(folder: Path) -> list[str]:
    """The partitions of `folder`: subfolders holding train.jsonl, sorted by name."""
    if not folder.is_dir():
        raise ScheduleRunError(f"{folder}: the partition folder does not exist")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / TRAIN).is_file())
    if not names:
        raise ScheduleRunError(f"{folder}: no partitions (subfolders with {TRAIN})")
    return names


def link_partitions(folder: Path, names: list[str], view: Path) -> Path:
    """`view` holding a link to each of `names` in `folder`: the partitions a round sees."""
    view.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = view / name
        if not link.exists():
            link.symlink_to((folder / name).resolve(), target_is_directory=True)
    return view


@dataclass
class Champion:
    job: str
    version: int
    retention: float
    out: Path  # the job's output folder


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_rounds(
    schedule: DistillationSchedule,
    folder: Path,
    runs: int,
    output: Path,
    echo: Callable[[str], None],
    base_dir: Path,
) -> DistillationScheduleStatus:
    """Run `runs` rounds of `schedule` over the partitions in `folder`; return the status.
    Relative model paths in the template are relative to `base_dir` (the schedule file's folder)."""
    spec = schedule.spec
    template = spec.job_template
    names = partition_names(folder)
    if len(names) < runs:
        raise ScheduleRunError(f"{folder}: {len(names)} partition(s) for {runs} round(s); need one per round")
    status = DistillationScheduleStatus()
    champion: Champion | None = None

    for i in range(1, runs + 1):
        name = f"{schedule.metadata.name}-{i}"
        run_out = output / name
        view = link_partitions(folder, names[: len(names) - runs + i], run_out / "partitions")
        data = run_out / "data"
        job_spec = _absolute_models(
            template.job_spec(str((data / "train.jsonl").resolve()), str((data / "eval-new.jsonl").resolve())),
            base_dir,
        )
        run_data = RunData(
            partitions=str(view.resolve()),
            window=spec.data.window,
            replay_fraction=spec.data.replay.fraction,
            replay_partitions=spec.data.replay.partitions,
            seed=spec.data.seed,
            run=name,
            champion=str(champion.out.resolve()) if champion else None,
        )
        job_spec = job_spec.model_copy(update={"data": job_spec.data.model_copy(update={"run_data": run_data})})
        if spec.warm_start == "lastPromoted" and champion is not None:
            job_spec = job_spec.model_copy(
                update={"student": Student(model=str((champion.out / STUDENT_DIR).resolve()))}
            )
        job = DistillationJob.model_validate(
            {"metadata": {"name": name, **template.metadata.model_dump()}, "spec": job_spec.to_wire()}
        )
        job_file = run_out / "job.yaml"
        job_file.write_text(yaml.safe_dump(job.to_wire(), sort_keys=False))
        status.last_schedule_time = _now()
        echo(f"{name}: training on partitions up to {names[len(names) - runs + i - 1]}")
        code = _run_job(job_file, run_out)
        result = json.loads((run_out / "result.json").read_text()) if code == 0 else {}
        if code == 0:
            plan = result.get("runData") or {}
            echo(
                f"{name}: fresh {', '.join(plan.get('fresh', []))} ({plan.get('freshExamples')} examples), replay "
                f"{plan.get('replayExamples')} from {len(plan.get('replayPartitions', []))} older partition(s) "
                f"({plan.get('replayFraction')})"
            )
        scores = scores_from_metrics(result.get("metrics") or {})
        if code != 0:
            entry = HistoryEntry(
                job=name,
                time=_now(),
                promoted=False,
                reason=f"refused: the run failed (exit {code}); see {run_out / 'run.log'}",
            )
        elif scores is None:
            status.last_successful_time = _now()
            entry = HistoryEntry(
                job=name,
                time=_now(),
                promoted=False,
                reason="refused: the run reports no eval metrics to compare (data.eval of the newest partitions)",
            )
        else:
            status.last_successful_time = _now()
            decision = gate_decision(spec.promotion.gate, scores)
            version = (champion.version + 1 if champion else 1) if decision.promote else None
            entry = history_entry(name, _now(), decision, version)
            if decision.promote and version is not None:
                champion = Champion(name, version, decision.retention, run_out)
                status.promoted = PromotedRef(job=name, version=version, retention=decision.retention)
        status.history.append(entry)
        echo(f"{name}: {entry.reason}")
        (output / "status.json").write_text(json.dumps(status.to_wire(), indent=2) + "\n")
    return status


def _absolute_models(spec: DistillationJobSpec, base_dir: Path) -> DistillationJobSpec:
    """The spec with relative teacher/student paths made absolute: each round's job file lives in
    its own output folder, against which `kdistill run` would resolve them."""

    def fix(uri: str | None) -> str | None:
        if uri is None or "://" in uri or Path(uri).expanduser().is_absolute():
            return uri
        return str((base_dir / uri).resolve())

    teacher = spec.teacher.model_copy(update={"model": fix(spec.teacher.model)})
    student = spec.student.model_copy(update={"model": fix(spec.student.model)})
    return spec.model_copy(update={"teacher": teacher, "student": student})


def _run_job(job_file: Path, out: Path) -> int:
    """`kdistill run` on the round's job, its output in `out` and its log in out/run.log."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "run.log").open("w") as log:
        proc = subprocess.run(
            [*RUN_COMMAND, str(job_file), "--output", str(out), "--log-format", "json"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc.returncode


def history_table(status: DistillationScheduleStatus) -> str:
    """The history as a fixed-width table, one row per round."""
    header = ("JOB", "PROMOTED", "VERSION", "RETENTION", "CHALLENGER", "SERVING", "FORGETTING")
    rows = [header]

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for e in status.history:
        rows.append(
            (
                e.job,
                "yes" if e.promoted else "no",
                "-" if e.version is None else str(e.version),
                fmt(e.retention),
                fmt(e.challenger_metric),
                fmt(e.serving_metric),
                fmt(e.forgetting),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += [f"{e.job}: {e.reason}" for e in status.history]
    return "\n".join(lines)
