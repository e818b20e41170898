"""A schedule's canary, pass by pass: start it, judge it on its servers' metrics, promote or roll back.

The rules are pure functions elsewhere (canary_logic: the replica split and the verdict;
canary_builders: the Deployments); this module reads the cluster, scrapes the servers over HTTP
and applies what they decide. The canary's state lives in the schedule's `status.canary`, so an
operator restart goes on where the last one stopped:

- Starting: the canary Deployment `<serving>-canary` runs the challenger beside the champion
  under the one Service; once every canary pod is ready, analysis starts.
- Analysing: each pass scrapes every canary pod's /metrics (pod IP, serving port) and judges the
  counts since the pods started (a new pod starts from zero, so the canary's window needs no
  baseline); the champion's pods are scraped too, once at the start of the analysis (kept in
  memory) and at each pass, to discount the client errors both serve alike.
- Promoting: the stable Deployment rolls to the challenger's model; once its rollout is complete
  the canary Deployment is deleted, so the challenger serves throughout.
- A rollback deletes the canary Deployment; the champion's Deployment is never touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kdistill.api.schedule import CanaryStatus, DistillationSchedule, HistoryEntry, PromotedRef

from . import canary_builders, canary_logic, metrics, names, server_metrics
from .kube import Kube
from .observe import DeploymentView, parse_time
from .schedule_jobs import adopt_by_schedule, serving_job
from .schedule_logic import GateDecision
from .settings import Settings
from .state import fmt_time

log = logging.getLogger("kdistill.operator")

# A canary whose pods are not all ready this long after analysisSeconds would have ended is rolled back.
READY_GRACE_SECONDS = 300.0
# How often a running canary is looked at (and its servers scraped); the scheduler waits half a
# second more, as after every pass (2.5 s between the end of one pass and the next).
CANARY_RECHECK_SECONDS = 2.0
# Each server's /metrics must answer within this, or the pod counts as unread for the pass.
SCRAPE_TIMEOUT_SECONDS = 2.0

Manifest = dict[str, Any]
Key = tuple[str, str]


@dataclass
class Outcome:
    """What a canary pass leaves: a decision for the history (when it ended), the promoted
    student, and the canary's status (None once it ended)."""

    entry: HistoryEntry | None
    promoted: dict[str, Any] | None
    canary: dict[str, Any] | None


class CanaryRunner:
    def __init__(self, kube: Kube, settings: Settings, event: Any) -> None:
        self.kube = kube
        self.settings = settings
        self.event = event  # (body, type, reason, message, log) -> None
        # The champion pods' counters when the analysis started, per schedule.
        self._baselines: dict[Key, dict[str, canary_logic.Scrape]] = {}

    def forget(self, key: Key) -> None:
        self._baselines.pop(key, None)

    # -- starting --------------------------------------------------------------------------

    def start(
        self,
        schedule: DistillationSchedule,
        body: Manifest,
        job: str,
        version: int,
        gate: GateDecision,
        stable: Manifest,
        now: datetime,
        slog: Any,
    ) -> dict[str, Any]:
        """The canary Deployment for `job` beside `stable`; returns status.canary."""
        canary = schedule.spec.promotion.canary
        champions = int((stable.get("spec") or {}).get("replicas") or 1)
        split = canary_logic.canary_replicas(champions, canary.weight)
        dep = canary_builders.canary_deployment(serving_job(schedule, job), self.settings, stable, split.canary)
        for obj in adopt_by_schedule([dep], body):
            self.kube.apply(obj)
        message = (
            f"{job} serves beside the champion: {split.canary} canary pod(s) and {split.champion} champion pod(s), "
            f"{split.share:.0%} of the traffic (weight {canary.weight}%), judged for {canary.analysis_seconds} s"
        )
        slog.info("canary started: %s", message)
        self.event(body, "Normal", "CanaryStarted", message, slog)
        return CanaryStatus(
            job=job,
            version=version,
            state="Starting",
            start_time=fmt_time(now),
            replicas=split.canary,
            share=round(split.share, 4),
            gate=gate.reason,
            retention=gate.retention,
            serving_metric=gate.serving_metric,
            challenger_metric=gate.challenger_metric,
            forgetting=gate.forgetting,
        ).to_wire()

    # -- each pass -------------------------------------------------------------------------

    def advance(
        self,
        key: Key,
        schedule: DistillationSchedule,
        body: Manifest,
        status: dict[str, Any],
        promoted: dict[str, Any] | None,
        now: datetime,
        slog: Any,
    ) -> Outcome:
        cs = CanaryStatus.model_validate(status)
        ns = schedule.namespace
        serving = names.schedule_serving(schedule.metadata.name, schedule.spec.job_template.spec.serving.name)
        stable = self.kube.get("apps/v1", "Deployment", ns, serving)
        canary_dep = self.kube.get("apps/v1", "Deployment", ns, canary_builders.canary_name(serving))
        spec = schedule.spec.promotion.canary

        if cs.state == "Promoting":
            view = DeploymentView.from_dict(stable) if stable is not None else None
            if view is None or not (view.available and view.model_path == names.model_path(ns, cs.job)):
                return Outcome(None, promoted, cs.to_wire())  # the stable Deployment is still rolling
            self.kube.delete("apps/v1", "Deployment", ns, canary_builders.canary_name(serving))
            self.forget(key)
            reason = f"{cs.gate}; canary: {cs.verdict}"
            entry = self._entry(cs, now, promoted=True, reason=reason)
            self.event(body, "Normal", "Promoted", f"{cs.job} is version {cs.version}: {reason}", slog)
            metrics.SCHEDULE_DECISIONS.labels(decision="promoted").inc()
            slog.info("%s promoted after its canary: %s", cs.job, cs.verdict)
            new = PromotedRef(job=cs.job, version=cs.version, retention=entry.retention).to_wire()
            return Outcome(entry, new, None)

        if stable is None or canary_dep is None:
            gone = "the serving Deployment" if stable is None else "the canary Deployment"
            return self._roll_back(key, body, cs, serving, ns, promoted, now, f"{gone} is gone", slog)

        started = parse_time(cs.start_time) or now
        if cs.state == "Starting":
            if DeploymentView.from_dict(canary_dep).available:
                cs.state = "Analysing"
                cs.analysis_start_time = fmt_time(now)
                self._baselines[key] = self._scrape(ns, canary_builders.stable_selector(stable), stable).scrapes
                slog.info("canary %s ready: analysis starts", cs.job)
            elif (now - started).total_seconds() > spec.analysis_seconds + READY_GRACE_SECONDS:
                why = f"its pods were not ready within {spec.analysis_seconds + READY_GRACE_SECONDS:.0f} s"
                return self._roll_back(key, body, cs, serving, ns, promoted, now, why, slog)
            else:
                return Outcome(None, promoted, cs.to_wire())

        analysis_start = parse_time(cs.analysis_start_time) or now
        elapsed = (now - analysis_start).total_seconds()
        canary_now = self._scrape(ns, canary_builders.canary_selector(stable), stable)
        champion_window = None
        baseline = self._baselines.get(key)
        if baseline is not None:
            champion_now = self._scrape(ns, canary_builders.stable_selector(stable), stable)
            champion_window = canary_logic.window(baseline, champion_now.scrapes)
        window = canary_logic.total(canary_now.scrapes.values())
        verdict = canary_logic.verdict(window, spec, elapsed, champion_window=champion_window)
        unread = f" ({len(canary_now.failed)} canary pod(s) unread)" if canary_now.failed else ""
        cs.verdict = verdict.reason + unread
        if verdict.decision == "wait":
            return Outcome(None, promoted, cs.to_wire())
        if verdict.decision == "rollback":
            return self._roll_back(key, body, cs, serving, ns, promoted, now, cs.verdict, slog)
        change = canary_builders.promote(serving_job(schedule, cs.job), self.settings, stable)
        for obj in adopt_by_schedule(change.apply, body):
            self.kube.apply(obj)
        cs.state = "Promoting"
        slog.info("canary %s passed (%s); the stable Deployment rolls to it", cs.job, cs.verdict)
        return Outcome(None, promoted, cs.to_wire())

    # -- helpers ---------------------------------------------------------------------------

    def _scrape(self, ns: str, selector: str, stable: Manifest) -> server_metrics.PodScrapes:
        port = canary_builders.container_port(stable) or 8080
        urls = []
        for pod in self.kube.list("v1", "Pod", ns, selector):
            ip = (pod.get("status") or {}).get("podIP")
            if ip and not pod["metadata"].get("deletionTimestamp"):
                urls.append(f"http://{ip}:{port}")
        return server_metrics.scrape_all(urls, timeout=SCRAPE_TIMEOUT_SECONDS)

    def _roll_back(
        self,
        key: Key,
        body: Manifest,
        cs: CanaryStatus,
        serving: str,
        ns: str,
        promoted: dict[str, Any] | None,
        now: datetime,
        why: str,
        slog: Any,
    ) -> Outcome:
        self.kube.delete("apps/v1", "Deployment", ns, canary_builders.canary_name(serving))
        self.forget(key)
        reason = f"refused: canary rolled back: {why} (gate: {cs.gate.removeprefix('promoted: ')})"
        entry = self._entry(cs, now, promoted=False, reason=reason)
        self.event(body, "Warning", "RolledBack", f"{cs.job}: {reason}", slog)
        metrics.SCHEDULE_DECISIONS.labels(decision="rolled-back").inc()
        slog.warning("canary %s rolled back: %s", cs.job, why)
        return Outcome(entry, promoted, None)

    @staticmethod
    def _entry(cs: CanaryStatus, now: datetime, *, promoted: bool, reason: str) -> HistoryEntry:
        return HistoryEntry(
            job=cs.job,
            time=fmt_time(now),
            version=cs.version if promoted else None,
            retention=cs.retention,
            serving_metric=cs.serving_metric,
            challenger_metric=cs.challenger_metric,
            forgetting=cs.forgetting,
            promoted=promoted,
            reason=reason,
        )
