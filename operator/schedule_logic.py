"""What a DistillationSchedule does next, as pure functions: no I/O, no kopf, no clock.

The caller passes the time. `kdistill schedule run` uses the same functions locally.

Run times and missed runs
  A schedule's run times come from its cron in its time zone (api/cron.py). Each evaluation looks
  for the latest run time at or before now that is after the last one started (lastScheduleTime,
  or the schedule's creation). If there is one, that single run is due: earlier run times missed
  while the operator was down are counted, not started, so a restart after a long outage starts
  one job, not one per missed tick. With startingDeadlineSeconds set, a due run more than that
  late is not started. A run's job is named `<schedule>-<unix minutes of its run time>`, so two
  evaluations of the same tick (an operator restart between creating the job and writing
  lastScheduleTime) name the same job, and the API server refuses the second as AlreadyExists.

Concurrency
  A run due while a job of the schedule is active: Forbid does not start it and leaves the tick
  unconsumed (as a CronJob does), so it starts when the active job finishes, if still within
  startingDeadlineSeconds and no later tick has come; Replace deletes the active jobs and starts it.

History
  Finished jobs beyond successfulJobsHistoryLimit (succeeded) and failedJobsHistoryLimit (failed)
  are deleted, oldest first. The job whose student is promoted is never deleted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from kdistill.api.cron import Cron, last_at_or_before, next_after, runs_between, zone
from kdistill.api.schedule import Gate, HistoryEntry

# Cap on the missed run times counted in one decision (counting walks them one by one).
MISSED_COUNT_LIMIT = 10_000


def job_name(schedule: str, run_time: datetime) -> str:
    """`<schedule>-<unix minutes>` of a run time."""
    return f"{schedule}-{int(run_time.timestamp()) // 60}"


Action = Literal["wait", "start", "replace", "forbid", "too-late", "suspended"]


@dataclass(frozen=True)
class Decision:
    """What to do now, and when to look again."""

    action: Action
    next_time: datetime  # the next run time after now
    run_time: datetime | None = None  # the due run time (start, replace, forbid, too-late)
    job: str | None = None  # its job name
    missed: int = 0  # earlier run times since the last start that are not started
    delete: tuple[str, ...] = ()  # active jobs to delete first (replace)
    reason: str = ""


def decide(
    *,
    name: str,
    cron: Cron,
    time_zone: str,
    now: datetime,
    since: datetime,
    active: Sequence[str],
    concurrency_policy: Literal["Forbid", "Replace"],
    suspend: bool = False,
    starting_deadline_seconds: int | None = None,
) -> Decision:
    """The schedule's decision at `now`. `since` is lastScheduleTime, or the creation time of a
    schedule that never ran; `active` are the names of its running jobs."""
    tz = zone(time_zone)
    upcoming = next_after(cron, now, tz)
    if suspend:
        return Decision("suspended", upcoming, reason="spec.suspend is true")
    latest = last_at_or_before(cron, now, tz)
    if latest is None or latest <= since:
        return Decision("wait", upcoming)
    missed = len(runs_between(cron, since, latest - timedelta(microseconds=1), tz, limit=MISSED_COUNT_LIMIT))
    job = job_name(name, latest)
    late = (now - latest).total_seconds()
    if starting_deadline_seconds is not None and late > starting_deadline_seconds:
        return Decision(
            "too-late",
            upcoming,
            latest,
            job,
            missed,
            reason=f"the run of {latest.isoformat()} is {late:.0f}s late, past startingDeadlineSeconds "
            f"{starting_deadline_seconds}",
        )
    if active and concurrency_policy == "Forbid":
        return Decision(
            "forbid",
            upcoming,
            latest,
            job,
            missed,
            reason=f"concurrencyPolicy Forbid: {', '.join(active)} still running",
        )
    if active:
        return Decision("replace", upcoming, latest, job, missed, tuple(active), f"replaces {', '.join(active)}")
    return Decision("start", upcoming, latest, job, missed)


@dataclass(frozen=True)
class FinishedJob:
    name: str
    finished: datetime
    succeeded: bool


def jobs_to_delete(
    finished: Iterable[FinishedJob], successful_limit: int, failed_limit: int, keep: Iterable[str] = ()
) -> list[str]:
    """Names of finished jobs beyond the history limits, oldest first; `keep` (the promoted job)
    is never among them and does not count against its limit."""
    kept = set(keep)
    jobs = sorted((j for j in finished if j.name not in kept), key=lambda j: (j.finished, j.name))
    out: list[FinishedJob] = []
    for succeeded, limit in ((True, successful_limit), (False, failed_limit)):
        of_kind = [j for j in jobs if j.succeeded == succeeded]
        out += of_kind[: max(0, len(of_kind) - limit)]
    return [j.name for j in sorted(out, key=lambda j: (j.finished, j.name))]


# -- the promotion gate: champion against challenger -----------------------------------------

Metric = Literal["accuracy", "perplexity", "bits-per-byte"]
# For these, lower is better; quality is then the reciprocal, so that every ratio reads "higher is better".
LOWER_IS_BETTER = ("perplexity", "bits-per-byte")


def quality(metric: str, value: float) -> float:
    """A score where higher is better: accuracy as it is, perplexity and bits per byte inverted."""
    if metric in LOWER_IS_BETTER:
        return 1.0 / value if value > 0 else float("inf")
    return value


@dataclass(frozen=True)
class Scores:
    """Eval figures of one finished run, all in `metric`.

    new: the newest partitions' eval data; old: the older partitions' eval data (None when there
    are none yet). champion_*: the served student on the same data (None before the first promotion).
    """

    metric: str
    teacher_new: float
    challenger_new: float
    champion_new: float | None = None
    challenger_old: float | None = None
    champion_old: float | None = None


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    retention: float
    forgetting: float | None  # relative loss against the champion on old data; None without both
    serving_metric: float | None  # the champion's metric on the newest eval data
    challenger_metric: float
    failed: tuple[str, ...] = field(default=())  # the names of the checks that failed


def gate_decision(gate: Gate, scores: Scores) -> GateDecision:
    """Promote only if the challenger clears minRetention, scores at least the champion on the
    newest eval data within tolerance (relative, when mustBeatServing), and loses at most
    maxForgetting (relative) against the champion on the older eval data. Every failed check is
    named in the reason, with its figures; so is every passed one."""
    m = scores.metric
    q_new = quality(m, scores.challenger_new)
    retention = q_new / quality(m, scores.teacher_new)
    checks: list[tuple[str, bool, str]] = [
        (
            "minRetention",
            retention >= gate.min_retention,
            f"retention {retention:.4f} {'>=' if retention >= gate.min_retention else '<'} "
            f"minRetention {gate.min_retention:g}",
        )
    ]
    if scores.champion_new is not None and gate.must_beat_serving:
        floor = quality(m, scores.champion_new) * (1.0 - gate.tolerance)
        ok = q_new >= floor
        checks.append(
            (
                "mustBeatServing",
                ok,
                f"{m} {scores.challenger_new:.4f} against the served {scores.champion_new:.4f} on the newest data "
                f"({'within' if ok else 'beyond'} tolerance {gate.tolerance:g})",
            )
        )
    forgetting = None
    if scores.champion_old is not None and scores.challenger_old is not None:
        forgetting = max(0.0, 1.0 - quality(m, scores.challenger_old) / quality(m, scores.champion_old))
        ok = forgetting <= gate.max_forgetting
        checks.append(
            (
                "maxForgetting",
                ok,
                f"forgetting {forgetting:.4f} {'<=' if ok else '>'} maxForgetting {gate.max_forgetting:g} "
                f"({m} {scores.challenger_old:.4f} against the served {scores.champion_old:.4f} on older data)",
            )
        )
    failed = tuple(name for name, ok, _ in checks if not ok)
    if scores.champion_new is None:
        checks.append(("first", True, "no student served yet"))
    head = "promoted" if not failed else "refused"
    reason = f"{head}: " + "; ".join(text for _, _, text in checks)
    return GateDecision(
        promote=not failed,
        reason=reason,
        retention=retention,
        forgetting=forgetting,
        serving_metric=scores.champion_new,
        challenger_metric=scores.challenger_new,
        failed=failed,
    )


def scores_from_metrics(metrics: dict[str, object]) -> Scores | None:
    """A finished run's Scores from its metrics (result.json's, or status.metrics in wire names);
    None when the run reports no teacher and student figures to compare."""

    def number(key: str) -> float | None:
        value = metrics.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    metric, teacher, student = metrics.get("metric"), number("teacher"), number("student")
    if not isinstance(metric, str) or teacher is None or student is None:
        return None
    return Scores(
        metric=metric,
        teacher_new=teacher,
        challenger_new=student,
        champion_new=number("champion"),
        challenger_old=number("studentOlder"),
        champion_old=number("championOlder"),
    )


def history_entry(job: str, time: str, decision: GateDecision, version: int | None) -> HistoryEntry:
    """The status.history entry of a gate decision (`version` when promoted)."""
    return HistoryEntry(
        job=job,
        time=time,
        version=version,
        retention=decision.retention,
        serving_metric=decision.serving_metric,
        challenger_metric=decision.challenger_metric,
        forgetting=decision.forgetting,
        promoted=decision.promote,
        reason=decision.reason,
    )
