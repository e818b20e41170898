"""One reconcile pass of one DistillationSchedule: observe through the API, decide, act.

Like reconciler.py for jobs: synchronous, every fact read fresh from the API server (the
schedule, then its jobs by label), the decisions made by pure functions
(schedule_logic.decide, schedule_logic.gate_decision, schedule_logic.jobs_to_delete,
schedule_jobs.run_job). A pass (``_reconcile``, one method a step):

1. advances a canary in progress (``_advance_canary``): judged on its servers, then promoted or
   rolled back;
2. judges each finished run not yet in status.history, oldest first (``_judge_finished``): a
   Succeeded run goes through the promotion gate on its metrics; a promoted run rolls out as the
   schedule's serving Deployment (or as a canary beside it); a Failed run is recorded as refused.
   Each decision is an entry in status.history, an Event on the schedule and a count in
   kdistill_schedule_decisions_total;
3. starts the run that is due, if any (``_start_due``; deleting the active ones first under
   Replace);
4. writes the status (``_write_status``);
5. deletes finished runs beyond the history limits, never the promoted one
   (``_apply_history_limits``), and asks to look again at the next run time.

A run's job name comes from its run time, so an operator that restarts between creating a job
and writing lastScheduleTime finds the job (AlreadyExists) instead of starting a second one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kdistill.api import JobValidationError
from kdistill.api.cron import parse_cron
from kdistill.api.schedule import (
    SCHEDULE_KIND,
    DistillationSchedule,
    HistoryEntry,
    PromotedRef,
    parse_schedule,
)

from . import builders, metrics, names
from .canary_builders import set_model_name
from .events import post_event
from .kube import JOB, Kube
from .logs import ObjectLog
from .observe import parse_time
from .schedule_canary import CANARY_RECHECK_SECONDS, CanaryRunner
from .schedule_jobs import ScheduleBuildError, adopt_by_schedule, check_runnable, run_job, serving_job
from .schedule_logic import (
    Decision,
    FinishedJob,
    decide,
    gate_decision,
    history_entry,
    jobs_to_delete,
    scores_from_metrics,
)
from .settings import Settings
from .state import fmt_time

log = logging.getLogger("kdistill.operator")

SCHEDULE = ("kdistill.io/v1alpha1", SCHEDULE_KIND)
Key = tuple[str, str]
# status.history keeps this many newest decisions (the Events and the metric keep counting).
HISTORY_LIMIT = 50
# A schedule with running jobs is looked at again at least this often (job events also wake it).
ACTIVE_RECHECK_SECONDS = 30.0
# Longest wait between two looks at an idle schedule (a clock jump or a missed event heals by then).
IDLE_RECHECK_SECONDS = 300.0
FINISHED = ("Succeeded", "Failed")


@dataclass(frozen=True)
class RunView:
    """One of the schedule's jobs, as a pass needs it."""

    name: str
    phase: str
    finished: datetime | None
    metrics: dict[str, Any]
    reason: str  # the Failed condition's reason and message, for a failed run

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> RunView:
        status = body.get("status") or {}
        failed: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed"), {})
        return cls(
            name=body["metadata"]["name"],
            phase=str(status.get("phase") or "Pending"),
            finished=parse_time(status.get("completionTime")),
            metrics=dict(status.get("metrics") or {}),
            reason=f"{failed.get('reason', '')}: {failed.get('message', '')}".strip(": "),
        )


@dataclass
class _Pass:
    """What one pass reads of a schedule and changes: its runs, the status it found and the
    status patch it builds (history, promoted, canary and active as they stand so far)."""

    status: dict[str, Any]
    runs: list[RunView]
    history: list[dict[str, Any]]
    promoted: dict[str, Any] | None
    canary: dict[str, Any] | None
    active: list[str]
    patch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, body: dict[str, Any], runs: list[RunView]) -> _Pass:
        status = dict(body.get("status") or {})
        return cls(
            status=status,
            runs=runs,
            history=list(status.get("history") or []),
            promoted=status.get("promoted"),
            canary=status.get("canary"),
            active=sorted(r.name for r in runs if r.phase not in FINISHED),
        )


class ScheduleReconciler:
    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube = kube
        self.settings = settings
        self.canaries = CanaryRunner(kube, settings, self._event)
        # Run times already reported as too late (one Event each, not one per pass).
        self._reported_late: dict[Key, datetime] = {}

    def forget(self, key: Key) -> None:
        self._reported_late.pop(key, None)
        self.canaries.forget(key)

    def reconcile(self, key: Key, now: datetime | None = None) -> float | None:
        """One pass; returns seconds until the schedule wants another look."""
        started = time.monotonic()
        try:
            return self._reconcile(key, now or datetime.now(UTC))
        finally:
            metrics.SCHEDULE_RECONCILE.observe(time.monotonic() - started)

    def _reconcile(self, key: Key, now: datetime) -> float | None:
        namespace, name = key
        slog = ObjectLog(log, {"schedule": f"{namespace}/{name}"})
        body = self.kube.get(*SCHEDULE, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.forget(key)
            return None  # its jobs and serving objects go with it (ownerReferences)
        try:
            schedule = parse_schedule({k: v for k, v in body.items() if k != "status"}, f"{namespace}/{name}")
            schedule.metadata.namespace = namespace
            check_runnable(schedule)
        except (JobValidationError, ScheduleBuildError) as exc:
            slog.error("schedule cannot run: %s", exc)
            self._event(body, "Warning", "InvalidSpec", str(exc), slog)
            return None
        uid = body["metadata"]["uid"]
        runs = [
            RunView.from_dict(j)
            for j in self.kube.list(*JOB, namespace, names.schedule_selector(name))
            if any(ref.get("uid") == uid for ref in j["metadata"].get("ownerReferences") or [])
        ]
        p = _Pass.of(body, runs)
        if p.canary is not None:
            self._advance_canary(key, schedule, body, p, now, slog)
        self._judge_finished(schedule, body, p, now, slog)
        decision = self._start_due(key, schedule, body, p, now, slog)
        self._write_status(key, body, p)
        self._apply_history_limits(key, schedule, p, now, slog)
        wait = (decision.next_time - now).total_seconds()
        if p.active:
            wait = min(wait, ACTIVE_RECHECK_SECONDS)
        if p.canary is not None:
            wait = min(wait, CANARY_RECHECK_SECONDS)
        return max(0.5, min(wait + 0.5, IDLE_RECHECK_SECONDS))

    def _advance_canary(
        self, key: Key, schedule: DistillationSchedule, body: dict[str, Any], p: _Pass, now: datetime, slog: ObjectLog
    ) -> None:
        """A canary in progress goes on: judged on its servers, then promoted or rolled back."""
        assert p.canary is not None
        outcome = self.canaries.advance(key, schedule, body, p.canary, p.promoted, now, slog)
        if outcome.entry is not None:
            p.history.append(outcome.entry.to_wire())
        if outcome.promoted != p.promoted:
            p.promoted = p.patch["promoted"] = outcome.promoted
        if outcome.canary != p.canary:
            p.patch["canary"] = outcome.canary  # None (JSON null) removes it
        p.canary = outcome.canary

    def _judge_finished(
        self, schedule: DistillationSchedule, body: dict[str, Any], p: _Pass, now: datetime, slog: ObjectLog
    ) -> None:
        """Judge the runs that finished since the last pass, oldest first; one canary at a time,
        so a run finishing while a canary runs waits for it."""
        judged = {entry.get("job") for entry in p.history} | ({p.canary["job"]} if p.canary else set())
        for run in sorted((r for r in p.runs if r.phase in FINISHED and r.name not in judged), key=_finish_order):
            if p.canary is not None and run.phase == "Succeeded":
                break
            judgement = self._judge(schedule, body, run, p.promoted, now, slog)
            if run.phase == "Succeeded":
                p.patch["lastSuccessfulTime"] = fmt_time(run.finished or now)
            if isinstance(judgement, dict):  # a canary started
                p.canary = p.patch["canary"] = judgement
                continue
            p.history.append(judgement.to_wire())
            if judgement.promoted:
                p.promoted = PromotedRef(
                    job=run.name, version=judgement.version or 1, retention=judgement.retention
                ).to_wire()
                p.patch["promoted"] = p.promoted
        if len(p.history) != len(p.status.get("history") or []):
            p.patch["history"] = p.history[-HISTORY_LIMIT:]

    def _start_due(
        self, key: Key, schedule: DistillationSchedule, body: dict[str, Any], p: _Pass, now: datetime, slog: ObjectLog
    ) -> Decision:
        """Start the run that is due (deleting the active ones first under Replace), or say why not."""
        namespace, name = key
        since = parse_time(p.status.get("lastScheduleTime")) or parse_time(body["metadata"]["creationTimestamp"])
        assert since is not None
        spec = schedule.spec
        decision = decide(
            name=name,
            cron=parse_cron(spec.schedule),
            time_zone=spec.time_zone,
            now=now,
            since=since,
            active=p.active,
            concurrency_policy=spec.concurrency_policy,
            suspend=spec.suspend,
            starting_deadline_seconds=spec.starting_deadline_seconds,
        )
        if decision.action in ("start", "replace") and decision.run_time is not None:
            for job in decision.delete:
                slog.info("concurrencyPolicy Replace: deleting the active run %s", job)
                self.kube.delete(*JOB, namespace, job)
                p.active.remove(job)
            champion = (p.promoted or {}).get("job")
            created = self.kube.create(run_job(schedule, body, decision.run_time, champion))
            if created:
                missed = f" ({decision.missed} earlier run time(s) missed, not started)" if decision.missed else ""
                slog.info("started run %s for %s%s", decision.job, decision.run_time.isoformat(), missed)
                self._event(body, "Normal", "RunStarted", f"created {decision.job}{missed}", slog)
                metrics.SCHEDULE_RUNS.labels(action=decision.action).inc()
            else:
                slog.info("run %s exists already (an earlier pass created it)", decision.job)
            if decision.job is not None:
                p.active.append(decision.job)
            p.patch["lastScheduleTime"] = fmt_time(decision.run_time)
        elif decision.action == "too-late" and decision.run_time is not None:
            if self._reported_late.get(key) != decision.run_time:
                self._reported_late[key] = decision.run_time
                self._event(body, "Warning", "MissedRun", decision.reason, slog)
                metrics.SCHEDULE_RUNS.labels(action="too-late").inc()
        elif (
            decision.action == "forbid"
            and decision.run_time is not None
            and self._reported_late.get(key) != decision.run_time
        ):
            self._reported_late[key] = decision.run_time
            slog.info("run of %s waits: %s", decision.run_time.isoformat(), decision.reason)
        if sorted(p.active) != sorted(p.status.get("active") or []):
            p.patch["active"] = sorted(p.active)
        return decision

    def _write_status(self, key: Key, body: dict[str, Any], p: _Pass) -> None:
        """The pass's status patch, before any deletion: a decision is recorded before its run can go."""
        generation = body["metadata"].get("generation")
        if p.status.get("observedGeneration") != generation:
            p.patch["observedGeneration"] = generation
        if p.patch:
            self.kube.patch_status(*key, p.patch, resource=SCHEDULE)

    def _apply_history_limits(
        self, key: Key, schedule: DistillationSchedule, p: _Pass, now: datetime, slog: ObjectLog
    ) -> None:
        """Delete finished runs beyond the history limits; the promoted run and the canary's stay."""
        spec = schedule.spec
        finished = [
            FinishedJob(r.name, r.finished or now, r.phase == "Succeeded") for r in p.runs if r.phase in FINISHED
        ]
        keep = ([p.promoted["job"]] if p.promoted else []) + ([p.canary["job"]] if p.canary else [])
        for job in jobs_to_delete(finished, spec.successful_jobs_history_limit, spec.failed_jobs_history_limit, keep):
            slog.info("history limit: deleting %s", job)
            self.kube.delete(*JOB, key[0], job)

    # -- judging a finished run ------------------------------------------------------------

    def _judge(
        self,
        schedule: DistillationSchedule,
        body: dict[str, Any],
        run: RunView,
        promoted: dict[str, Any] | None,
        now: datetime,
        slog: ObjectLog,
    ) -> HistoryEntry | dict[str, Any]:
        """The run's history entry, or the status of the canary it starts (status.canary)."""
        at = fmt_time(now)
        if run.phase == "Failed":
            entry = HistoryEntry(
                job=run.name, time=at, promoted=False, reason=f"refused: the run failed ({run.reason})"
            )
            self._event(body, "Warning", "RunFailed", f"{run.name}: {entry.reason}", slog)
            metrics.SCHEDULE_DECISIONS.labels(decision="failed").inc()
            return entry
        scores = scores_from_metrics(run.metrics)
        if scores is None:
            entry = HistoryEntry(
                job=run.name,
                time=at,
                promoted=False,
                reason="refused: the run reports no eval metrics to compare (status.metrics)",
            )
            self._event(body, "Warning", "NotPromoted", f"{run.name}: {entry.reason}", slog)
            metrics.SCHEDULE_DECISIONS.labels(decision="refused").inc()
            return entry
        decision = gate_decision(schedule.spec.promotion.gate, scores)
        version = (int((promoted or {}).get("version") or 0) + 1) if decision.promote else None
        entry = history_entry(run.name, at, decision, version)
        if decision.promote and version is not None and promoted is not None:
            stable = self.kube.get("apps/v1", "Deployment", schedule.namespace, self._serving_name(schedule))
            if stable is not None:
                # A student is served: the challenger earns its place beside it first.
                return self.canaries.start(schedule, body, run.name, version, decision, stable, now, slog)
        if decision.promote:
            self._roll_out(schedule, body, run.name, slog)
            self._event(body, "Normal", "Promoted", f"{run.name} is version {version}: {decision.reason}", slog)
        else:
            self._event(body, "Normal", "NotPromoted", f"{run.name}: {decision.reason}", slog)
        metrics.SCHEDULE_DECISIONS.labels(decision="promoted" if decision.promote else "refused").inc()
        slog.info("%s: %s", run.name, decision.reason)
        return entry

    @staticmethod
    def _serving_name(schedule: DistillationSchedule) -> str:
        return names.schedule_serving(schedule.metadata.name, schedule.spec.job_template.spec.serving.name)

    def _roll_out(self, schedule: DistillationSchedule, body: dict[str, Any], job_name: str, slog: ObjectLog) -> None:
        """The promoted run becomes the schedule's serving Deployment (a rolling update), keeping
        the model it replaces in an annotation for a manual rollback."""
        job = serving_job(schedule, job_name)
        serving = names.serving(job_name, job.spec.serving.name)
        current = self.kube.get("apps/v1", "Deployment", schedule.namespace, serving)
        previous = None
        if current is not None:
            previous = (current["metadata"].get("annotations") or {}).get(names.ANNOTATION_MODEL_PATH)
        deployment = builders.serving_deployment(job, self.settings, previous)
        # Clients name the schedule's model, whichever run serves it (canaries and promotions keep it).
        set_model_name(deployment, schedule.metadata.name)
        objs = [deployment, builders.serving_service(job)]
        for obj in adopt_by_schedule(objs, body):
            self.kube.apply(obj)
        slog.info("serving %s now runs %s", serving, names.model_path(schedule.namespace, job_name))

    # -- writing -----------------------------------------------------------------------------

    def _event(self, body: dict[str, Any], type_: str, reason: str, message: str, slog: ObjectLog) -> None:
        post_event(self.kube, body, type_, reason, message, self.settings.identity, slog)


def _finish_order(run: RunView) -> tuple[datetime, str]:
    return (run.finished or datetime.max.replace(tzinfo=UTC), run.name)
