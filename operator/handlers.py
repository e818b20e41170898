"""Thin kopf handlers: kopf watches (with server and client timeouts) and probes; every
event only puts a job key on the work queue. The event handlers are coroutines on purpose:
the queue is an asyncio structure and must only be touched from kopf's event
loop. All logic lives in reconciler.py / state.py.

No change-detection handlers (on.create/update/delete) and no daemons or timers are used:
those make kopf add finalizers and annotations to every job. Here ownerReferences remove
the children, so a job needs no finalizer at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import kopf

from . import metrics, names
from .login import connection_info
from .observe import NodeView, PodView
from .reconciler import Key, Reconciler
from .scheduler import ScheduleReconciler
from .settings import Settings
from .workqueue import WorkQueue

log = logging.getLogger("kdistill.operator")


@dataclass
class Runtime:
    """What the handlers share; passed to kopf.run as its memo."""

    settings: Settings
    reconciler: Reconciler
    leader: Any = None  # LeaseElector or None
    queue: WorkQueue[Key] | None = None
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    jobs: set[Key] = field(default_factory=set)
    node_jobs: dict[str, set[Key]] = field(default_factory=dict)
    pod_nodes: dict[Key, tuple[str, Key]] = field(default_factory=dict)
    node_ready: dict[str, str] = field(default_factory=dict)
    pod_signatures: dict[Key, PodView] = field(default_factory=dict)
    job_signatures: dict[Key, tuple[Any, bool]] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    failures: dict[Key, int] = field(default_factory=dict)
    last_pass: float = field(default_factory=time.monotonic)
    # DistillationSchedules: their own queue and one worker (a pass per run time, not per event).
    scheduler: ScheduleReconciler | None = None
    schedules: set[Key] = field(default_factory=set)
    schedule_queue: WorkQueue[Key] | None = None
    schedule_generations: dict[Key, Any] = field(default_factory=dict)
    # The phase each scheduled job was last seen in: a change wakes its schedule.
    scheduled_job_phases: dict[Key, str] = field(default_factory=dict)


def _runtime(memo: Any) -> Runtime:
    return memo.runtime  # type: ignore[no-any-return]


@kopf.on.login()
def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
    """The same server and user as our REST client: --kubeconfig, else in-cluster, else $KUBECONFIG."""
    return connection_info(_runtime(memo).reconciler.kube.api.configuration)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    rt = _runtime(memo)
    s = rt.settings
    settings.watching.server_timeout = s.watch_server_timeout
    settings.watching.client_timeout = s.watch_client_timeout
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = s.request_timeout
    settings.posting.enabled = False  # our Events are written by the reconciler, one per fact
    settings.peering.standalone = True  # the Lease (leader.py) decides who acts
    try:
        await asyncio.get_running_loop().run_in_executor(None, rt.reconciler.prime_nodes)
    except Exception as exc:  # the passes then LIST nodes themselves: slower, still right
        log.warning("could not list nodes at start: %s", exc)
    rt.queue = WorkQueue[Key]()
    rt.pool = concurrent.futures.ThreadPoolExecutor(max_workers=s.workers, thread_name_prefix="reconcile")
    for i in range(s.workers):
        rt.tasks.append(asyncio.create_task(_worker(rt), name=f"reconcile-worker-{i}"))
    rt.tasks.append(asyncio.create_task(_resync(rt), name="resync"))
    if rt.scheduler is not None:
        rt.schedule_queue = WorkQueue[Key]()
        rt.tasks.append(asyncio.create_task(_schedule_worker(rt), name="schedule-worker"))
    log.info("operator started: %s", "cluster-wide" if not s.namespaces else ",".join(s.namespaces))


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    rt = _runtime(memo)
    for task in rt.tasks:
        task.cancel()
    await asyncio.gather(*rt.tasks, return_exceptions=True)
    if rt.pool is not None:
        rt.pool.shutdown(wait=True, cancel_futures=True)


async def _drain(
    queue: WorkQueue[Key],
    known: set[Key],
    reconcile: Callable[[Key], float | None],
    forget: Callable[[Key], None],
    failures: dict[Key, int],
    *,
    pool: concurrent.futures.ThreadPoolExecutor | None,
    what: str,
    log_field: str,
    after_pass: Callable[[], None] = lambda: None,
) -> None:
    """Take keys off ``queue`` one at a time and run ``reconcile`` in the pool: a pass that asks
    to look again is requeued after that many seconds, a failed one after an exponential backoff
    (0.5 s doubling to 60 s). A key no longer in ``known`` (deleted) is forgotten instead."""
    loop = asyncio.get_running_loop()
    while True:
        key = await queue.get()
        try:
            if key not in known:
                forget(key)
                continue
            again = await loop.run_in_executor(pool, reconcile, key)
            failures.pop(key, None)
            if again is not None:
                queue.add_after(key, again)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            n = failures[key] = failures.get(key, 0) + 1
            delay = min(0.5 * 2 ** (n - 1), 60.0)
            log.exception(
                "%s failed (attempt %d); retrying in %.1fs", what, n, delay, extra={log_field: f"{key[0]}/{key[1]}"}
            )
            queue.add_after(key, delay)
        finally:
            after_pass()
            queue.done(key)


async def _worker(rt: Runtime) -> None:
    """One of the job reconcile workers (they share the queue; a key is never in two at once)."""
    assert rt.queue is not None
    queue = rt.queue

    def after_pass() -> None:
        rt.last_pass = time.monotonic()
        metrics.QUEUE_DEPTH.set(len(queue))

    await _drain(
        queue,
        rt.jobs,
        rt.reconciler.reconcile,
        rt.reconciler.forget,
        rt.failures,
        pool=rt.pool,
        what="reconcile",
        log_field="job",
        after_pass=after_pass,
    )


async def _schedule_worker(rt: Runtime) -> None:
    """Schedule passes, one at a time; each asks when to look again (the next run time)."""
    assert rt.schedule_queue is not None and rt.scheduler is not None
    await _drain(
        rt.schedule_queue,
        rt.schedules,
        rt.scheduler.reconcile,
        rt.scheduler.forget,
        {},
        pool=rt.pool,
        what="schedule pass",
        log_field="schedule",
    )


async def _resync(rt: Runtime) -> None:
    """A periodic look at every job, so a missed event delays a reaction but never loses it."""
    assert rt.queue is not None
    while True:
        await asyncio.sleep(rt.settings.resync_seconds)
        for key in list(rt.jobs):
            rt.queue.add(key)
        if rt.schedule_queue is not None:
            for key in list(rt.schedules):
                rt.schedule_queue.add(key)


def _enqueue_schedule(rt: Runtime, key: Key) -> None:
    if rt.schedule_queue is not None:
        rt.schedule_queue.add(key)


def _enqueue(rt: Runtime, key: Key) -> None:
    if rt.queue is not None:
        rt.queue.add(key)
        metrics.QUEUE_DEPTH.set(len(rt.queue))


@kopf.on.event(names.GROUP, "v1alpha1", "distillationjobs")
async def job_event(
    type: str | None, name: str, namespace: str | None, meta: Any, labels: Any, status: Any, memo: Any, **_: Any
) -> None:
    if namespace is None:
        return  # kopf's type allows a cluster-scoped object; the watched kinds are all namespaced
    rt = _runtime(memo)
    key = (namespace, name)
    schedule = labels.get(names.LABEL_SCHEDULE)
    if schedule:
        # A scheduled run that changes phase (or goes) wakes its schedule: it judges finished runs.
        phase = "Deleted" if type == "DELETED" else str((status or {}).get("phase") or "")
        if rt.scheduled_job_phases.get(key) != phase:
            rt.scheduled_job_phases[key] = phase
            _enqueue_schedule(rt, (namespace, schedule))
        if type == "DELETED":
            rt.scheduled_job_phases.pop(key, None)
    if type == "DELETED":
        rt.jobs.discard(key)
        rt.job_signatures.pop(key, None)
        if rt.queue is not None:
            rt.queue.forget(key)
        rt.reconciler.forget(key)
        return
    # A pass acts on the spec (generation) and on deletion; status writes (ours, which would
    # only echo each pass once more, and rank 0's progress) need none. Time-based looks are
    # requeues, and the resync covers anything missed.
    signature = (meta.get("generation"), bool(meta.get("deletionTimestamp")))
    if key in rt.jobs and rt.job_signatures.get(key) == signature:
        return
    rt.jobs.add(key)
    rt.job_signatures[key] = signature
    _enqueue(rt, key)


@kopf.on.event(names.GROUP, "v1alpha1", "distillationschedules")
async def schedule_event(type: str | None, name: str, namespace: str | None, meta: Any, memo: Any, **_: Any) -> None:
    if namespace is None:
        return
    rt = _runtime(memo)
    key = (namespace, name)
    if type == "DELETED":
        rt.schedules.discard(key)
        rt.schedule_generations.pop(key, None)
        if rt.scheduler is not None:
            rt.scheduler.forget(key)
        return
    # Only the spec matters (our own status writes would echo each pass); run times are requeues.
    generation = meta.get("generation")
    if key in rt.schedules and rt.schedule_generations.get(key) == generation:
        return
    rt.schedules.add(key)
    rt.schedule_generations[key] = generation
    _enqueue_schedule(rt, key)


@kopf.on.event("", "v1", "pods", labels={names.LABEL_MANAGED_BY: names.MANAGER, names.LABEL_ROLE: names.ROLE_WORKER})
async def pod_event(
    type: str | None, body: Any, name: str, namespace: str | None, labels: Any, memo: Any, **_: Any
) -> None:
    if namespace is None:
        return
    rt = _runtime(memo)
    job = labels.get(names.LABEL_JOB)
    if not job:
        return
    key = (namespace, job)
    pod_key = (namespace, name)
    view = rt.reconciler.pod_tracker.seen(namespace, dict(body), deleted=type == "DELETED")
    if rt.queue is not None and view.index is not None:
        # A disrupted pod goes into the job's status at once: the memory survives an operator restart.
        record = rt.reconciler.pod_tracker.to_record(namespace, view)
        if record is not None and not await asyncio.to_thread(
            rt.reconciler.record_departure, namespace, job, view.index, record
        ):
            rt.reconciler.pod_tracker.forget_record(namespace, view)
    old = rt.pod_nodes.pop(pod_key, None)
    if old is not None:
        rt.node_jobs.get(old[0], set()).discard(key)
    node = (body.get("spec") or {}).get("nodeName")
    if type != "DELETED" and node:
        rt.pod_nodes[pod_key] = (node, key)
        rt.node_jobs.setdefault(node, set()).add(key)
    # Only what a pass decides on: scheduling and readiness updates of a pod change nothing there
    # (a lost node is the node watch's business), and at scale they were most of the passes.
    signature = None if type == "DELETED" else replace(view, node=None)
    if type != "DELETED" and rt.pod_signatures.get(pod_key) == signature:
        return
    previous = rt.pod_signatures.pop(pod_key, None)
    if signature is not None:
        rt.pod_signatures[pod_key] = signature
    if previous is None and signature is not None and _fresh(signature):
        return  # the pass that created it looks again by itself (and a restart lists every job)
    _enqueue(rt, key)


def _fresh(pod: PodView) -> bool:
    """A pod as it was just created: Pending, with nothing to report yet."""
    return (
        pod.phase == "Pending"
        and not pod.deleting
        and pod.terminated is None
        and not pod.waiting_reason
        and pod.unschedulable is None
        and not pod.disruption
    )


@kopf.on.event("apps", "v1", "deployments", labels={names.LABEL_MANAGED_BY: names.MANAGER})
async def deployment_event(namespace: str | None, annotations: Any, memo: Any, **_: Any) -> None:
    job = annotations.get(names.ANNOTATION_SOURCE_JOB)
    if job and namespace is not None:
        _enqueue(_runtime(memo), (namespace, job))


async def workload_event(namespace: str | None, labels: Any, memo: Any, **_: Any) -> None:
    """A Kueue Workload of a job changed (admitted, evicted): look at its job. Registered by
    main.run only with --kueue, so an operator without Kueue needs no RBAC on workloads."""
    job = labels.get(names.LABEL_JOB)
    if job and namespace is not None:
        _enqueue(_runtime(memo), (namespace, job))


def register_kueue() -> None:
    from . import kueue

    kopf.on.event(kueue.GROUP, kueue.VERSION, "workloads", labels={names.LABEL_MANAGED_BY: names.MANAGER})(
        workload_event
    )


@kopf.on.event("", "v1", "nodes")
async def node_event(type: str | None, name: str, body: Any, memo: Any, **_: Any) -> None:
    """A node's Ready flipped, or it is gone: look at the jobs with pods there."""
    rt = _runtime(memo)
    view = None if type == "DELETED" else NodeView.from_dict(dict(body))
    rt.reconciler.node_cache[name] = view
    ready = "Gone" if view is None else view.ready
    if rt.node_ready.get(name) == ready:
        return  # heartbeats: nothing a job cares about changed
    rt.node_ready[name] = ready
    if type == "DELETED":
        rt.node_ready.pop(name, None)
    for key in list(rt.node_jobs.get(name, ())):
        _enqueue(rt, key)
        if rt.queue is not None:
            # NotReady counts as lost only after the detection delay: look again then.
            rt.queue.add_after(key, rt.settings.notready_seconds + 0.2)


@kopf.on.probe(id="queue")
async def probe_queue(memo: Any, **_: Any) -> int:
    rt = _runtime(memo)
    return len(rt.queue) if rt.queue is not None else 0


@kopf.on.probe(id="jobs")
async def probe_jobs(memo: Any, **_: Any) -> int:
    return len(_runtime(memo).jobs)


@kopf.on.probe(id="leader")
async def probe_leader(memo: Any, **_: Any) -> bool:
    rt = _runtime(memo)
    return rt.leader is None or bool(rt.leader.leading)


@kopf.on.probe(id="seconds_since_last_pass")
async def probe_last_pass(memo: Any, **_: Any) -> float:
    return round(time.monotonic() - _runtime(memo).last_pass, 1)
