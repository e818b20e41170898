"""`kdistill schedule run`: a DistillationSchedule's rounds on this machine, with the same rules.

Round i of N sees the partitions of the folder up to the (P - N + i)-th (P partitions in all),
so N rounds walk over the newest N partitions as if one arrived before each round. Each round:

1. plans its data (api/replay.py): the newest `window` partitions as fresh data, `replay.fraction`
   drawn from older ones; writes train.jsonl, eval-new.jsonl, eval-old.jsonl and plan.json;
2. runs the job template with that data through `kdistill run` (a subprocess; warmStart
   lastPromoted starts the student from the promoted student's full-precision weights);
3. scores the challenger and the champion (the promoted student) as served (INT8) on the newest
   and the older eval data, and decides with the promotion gate (operator/schedule_logic.py);
4. records the decision in the history and in OUTPUT/status.json, as the schedule's status.

Rounds are named `<schedule>-<round>`; outputs go to OUTPUT/<round name>/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from kdistill.api import DistillationJob, DistillationSchedule
from kdistill.api.metadata import STUDENT_DIR, STUDENT_INT8_DIR
from kdistill.api.replay import Partition, RunDataPlan, plan_run_data
from kdistill.api.schedule import DistillationScheduleStatus, HistoryEntry, PromotedRef
from kdistill.api.spec import DistillationJobSpec, Student
from kdistill.operator.schedule_logic import Scores, gate_decision

TRAIN, EVAL = "train.jsonl", "eval.jsonl"
RUN_COMMAND = (sys.executable, "-P", "-m", "kdistill.cli.main", "run")


class ScheduleRunError(RuntimeError):
    """The rounds cannot start (no partitions, too few of them, an unsupported task)."""


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
        raise ScheduleRunError(f"{folder}: the partition folder does not exist")
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / TRAIN).is_file()):
        out.append(Partition(sub.name, sum(1 for _ in _lines(sub / TRAIN)), sum(1 for _ in _lines(sub / EVAL))))
    if not out:
        raise ScheduleRunError(f"{folder}: no partitions (subfolders with {TRAIN})")
    return out


@dataclass(frozen=True)
class RunFiles:
    train: Path
    eval_new: Path
    eval_old: Path | None


def write_run_data(plan: RunDataPlan, folder: Path, out: Path) -> RunFiles:
    """The run's data files under `out`, built from `folder` as `plan` says; plan.json beside them."""
    out.mkdir(parents=True, exist_ok=True)
    train = out / "train.jsonl"
    with train.open("w", encoding="utf-8") as f:
        for name in plan.fresh:
            for line in _lines(folder / name / TRAIN):
                f.write(line + "\n")
        for name, wanted in plan.replay.items():
            keep = set(wanted)
            for i, line in enumerate(_lines(folder / name / TRAIN)):
                if i in keep:
                    f.write(line + "\n")

    def concat(names: tuple[str, ...], path: Path) -> Path | None:
        if not names:
            return None
        with path.open("w", encoding="utf-8") as f:
            for name in names:
                for line in _lines(folder / name / EVAL):
                    f.write(line + "\n")
        return path

    eval_new = concat(plan.eval_new, out / "eval-new.jsonl")
    if eval_new is None:
        raise ScheduleRunError(f"the newest partitions ({', '.join(plan.fresh)}) have no {EVAL}")
    (out / "plan.json").write_text(plan.to_json() + "\n")
    return RunFiles(train, eval_new, concat(plan.eval_old, out / "eval-old.jsonl"))


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
    from kdistill.trainer.console import quiet_import_notices
    from kdistill.trainer.model_scoring import score_artifact

    quiet_import_notices()
    spec = schedule.spec
    template = spec.job_template
    if template.spec.distillation.cross_tokenizer is not None:
        raise ScheduleRunError(
            "kdistill schedule run compares students in perplexity; a student with its own tokenizer "
            "(distillation.crossTokenizer) is scored in bits per byte"
        )
    if template.spec.task != "causal-lm":
        raise ScheduleRunError(
            f"kdistill schedule run compares students across runs for causal-lm jobs; the template's task is "
            f"{template.spec.task}"
        )
    partitions = list_partitions(folder)
    if len(partitions) < runs:
        raise ScheduleRunError(f"{folder}: {len(partitions)} partition(s) for {runs} round(s); need one per round")
    status = DistillationScheduleStatus()
    champion: Champion | None = None
    data = template.spec.data

    def score(run_out: Path, eval_file: Path | None) -> float | None:
        if eval_file is None:
            return None
        result = score_artifact(
            run_out / STUDENT_INT8_DIR, eval_file, text_field=data.text_field, max_seq_length=data.max_seq_length
        )
        return result.value

    for i in range(1, runs + 1):
        name = f"{schedule.metadata.name}-{i}"
        visible = partitions[: len(partitions) - runs + i]
        plan = plan_run_data(
            visible,
            window=spec.data.window,
            fraction=spec.data.replay.fraction,
            replay_partitions=spec.data.replay.partitions,
            seed=spec.data.seed,
            run=name,
        )
        run_out = output / name
        files = write_run_data(plan, folder, run_out / "data")
        job_spec = _absolute_models(
            template.job_spec(str(files.train.resolve()), str(files.eval_new.resolve())), base_dir
        )
        if spec.warm_start == "lastPromoted" and champion is not None:
            job_spec = job_spec.model_copy(
                update={"student": Student(model=str((champion.out / STUDENT_DIR).resolve()))}
            )
        job = DistillationJob.model_validate(
            {"metadata": {"name": name, **template.metadata.model_dump()}, "spec": job_spec.to_wire()}
        )
        job_file = run_out / "job.yaml"
        job_file.write_text(yaml.safe_dump(job.to_wire(), sort_keys=False))
        echo(
            f"{name}: fresh {', '.join(plan.fresh)} ({plan.fresh_examples} examples), replay "
            f"{plan.replay_examples} from {len(plan.replay)} older partition(s) ({plan.replay_fraction:.3f})"
        )
        status.last_schedule_time = _now()
        code = _run_job(job_file, run_out)
        metrics = json.loads((run_out / "result.json").read_text())["metrics"] if code == 0 else {}
        if code != 0:
            entry = HistoryEntry(
                job=name,
                time=_now(),
                promoted=False,
                reason=f"refused: the run failed (exit {code}); see {run_out / 'run.log'}",
            )
        elif metrics.get("metric") != "perplexity":
            # Students are scored outside the run in perplexity (trainer/model_scoring.py).
            status.last_successful_time = _now()
            entry = HistoryEntry(
                job=name,
                time=_now(),
                promoted=False,
                reason=f"refused: the run reports {metrics.get('metric')}, and students are compared across "
                "rounds in perplexity (causal-LM students with the teacher's tokenizer)",
            )
        else:
            status.last_successful_time = _now()
            scores = Scores(
                metric=metrics["metric"],
                teacher_new=metrics["teacher"],
                challenger_new=metrics["student"],
                champion_new=score(champion.out, files.eval_new) if champion else None,
                challenger_old=score(run_out, files.eval_old),
                champion_old=score(champion.out, files.eval_old) if champion else None,
            )
            decision = gate_decision(spec.promotion.gate, scores)
            version = (champion.version + 1 if champion else 1) if decision.promote else None
            entry = HistoryEntry(
                job=name,
                time=_now(),
                version=version,
                retention=decision.retention,
                serving_metric=decision.serving_metric,
                challenger_metric=decision.challenger_metric,
                forgetting=decision.forgetting,
                promoted=decision.promote,
                reason=decision.reason,
            )
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
