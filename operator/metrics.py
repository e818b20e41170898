"""Prometheus metrics of the operator (its own registry, served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kdistill.api import PHASES

REGISTRY = CollectorRegistry(auto_describe=True)

JOBS = Gauge("kdistill_jobs", "DistillationJobs by phase.", ["phase"], registry=REGISTRY)
RESTARTS = Counter(
    "kdistill_gang_restarts_total", "Gang restarts, by kind (failure or eviction).", ["kind"], registry=REGISTRY
)
FAILURES = Counter("kdistill_job_failures_total", "Jobs that ended Failed, by reason.", ["reason"], registry=REGISTRY)
RECONCILE = Histogram(
    "kdistill_reconcile_duration_seconds",
    "Time of one reconcile pass of one job.",
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
RECONCILE_ERRORS = Counter("kdistill_reconcile_errors_total", "Reconcile passes that raised.", registry=REGISTRY)
API_REQUESTS = Counter(
    "kdistill_api_requests_total",
    "Kubernetes API calls made by reconcile passes, by verb.",
    ["verb"],
    registry=REGISTRY,
)
API_ERRORS = Counter(
    "kdistill_api_errors_total",
    "Failed Kubernetes API calls, by verb and HTTP code.",
    ["verb", "code"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("kdistill_queue_depth", "Jobs waiting for a reconcile.", registry=REGISTRY)
SCHEDULE_RECONCILE = Histogram(
    "kdistill_schedule_reconcile_duration_seconds",
    "Time of one reconcile pass of one DistillationSchedule.",
    registry=REGISTRY,
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0),
)
SCHEDULE_RUNS = Counter(
    "kdistill_schedule_runs_total",
    "Scheduled runs, by what the schedule did at a run time: start, replace (the active run deleted "
    "first) or too-late (past startingDeadlineSeconds).",
    ["action"],
    registry=REGISTRY,
)
SCHEDULE_DECISIONS = Counter(
    "kdistill_schedule_decisions_total",
    "Finished scheduled runs, by the promotion decision: promoted, refused (the gate) or failed (the run).",
    ["decision"],
    registry=REGISTRY,
)
GOODPUT = Gauge(
    "kdistill_job_goodput",
    "Productive training seconds (status.productiveSeconds, reported by rank 0) over the wall seconds since the "
    "job's startTime, per job; work lost to a restart does not count.",
    ["namespace", "job"],
    registry=REGISTRY,
)
LEADER = Gauge("kdistill_leader", "1 while this replica holds the leader lease.", registry=REGISTRY)


def set_phases(counts: dict[str, int]) -> None:
    for phase in PHASES:
        JOBS.labels(phase=phase).set(counts.get(phase, 0))
