"""The job state machine: what is observed in, what to do out. Pure: no I/O, no clock.

Phases: Pending → Running → (Restarting → Pending → Running)* → Deploying → Succeeded, or
Failed; Suspended while `spec.suspend`; Queued while a job labelled `kueue.x-k8s.io/queue-name`
waits for Kueue to admit its Workload (first, and again after a preemption). Everything the
machine needs survives an operator restart because it lives in the API: the phase and counters in status, the gang
attempt (restarts + evictions + resumes) on the pods' labels, the backoff start in the
`Restarting` condition's lastTransitionTime, and pod creation times for the pending deadline.

The handlers apply a Decision in this order: status patch (with resourceVersion, so a stale
view cannot count a restart twice), then its events, then deletions, then creations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kdistill.api import DistillationJob
from kdistill.api.base import FLOAT_TOLERANCE
from kdistill.api.failures import Termination, parse_termination

from . import names
from .kueue import WorkloadView
from .observe import STUCK_WAITING, DeploymentView, NodeView, PodView, TeacherView, parse_time

TERMINAL = ("Succeeded", "Failed")
# While pods are going away, look again this soon.
POLL_SECONDS = 1.0

COND_TRAINING = "Training"
COND_RESTARTING = "Restarting"
COND_SUSPENDED = "Suspended"
COND_COMPLETE = "Complete"
COND_FAILED = "Failed"
COND_READY = "Ready"
COND_CLEANED = "TrainingObjectsDeleted"
# Kueue (a job labelled kueue.x-k8s.io/queue-name): True while its Workload is admitted.
COND_ADMITTED = "Admitted"
# While queued, look again at least this often (the Workload watch usually comes first).
KUEUE_POLL_SECONDS = 10.0
# The phases in which a gang may exist: an eviction in one of them is counted once.
GANG_PHASES = ("Pending", "Running", "Restarting")
COND_TEACHER_READY = "TeacherReady"
# Its reasons while False: the teacher is starting (the workers wait, the pending clock runs), it
# was ready and is not now (a running gang waits), or its objects are deleted (job over/suspended).
TEACHER_STARTING = "TeacherStarting"
TEACHER_UNAVAILABLE = "TeacherUnavailable"
TEACHER_STOPPED = "TeacherStopped"
# status.stage while the workers wait for the served teacher (the trainer writes it once it runs).
STAGE_WAITING_FOR_TEACHER = "WaitingForTeacher"
# The phases in which a served teacher runs; in any other it is deleted.
TEACHER_PHASES = ("Pending", "Running", "Restarting")
# While the workers wait for the teacher, look at least this often (the Deployment's own events
# usually come first).
TEACHER_POLL_SECONDS = 10.0


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    job: DistillationJob
    generation: int
    status: dict[str, Any]  # the job's status on the wire (camelCase)
    pods: list[PodView]
    nodes: dict[str, NodeView | None]  # None: the node no longer exists
    deployment: DeploymentView | None
    now: datetime
    notready_seconds: float = 30.0
    max_backoff_seconds: int = 3600
    # The final state of gang pods the watch saw deleted (name -> view): an evicted pod is often
    # gone before any LIST shows its DisruptionTarget condition (departures.py).
    departed: dict[str, PodView] = field(default_factory=dict)
    # Pods missing from the LIST whose DELETED event has not arrived yet: wait for it.
    unconfirmed: frozenset[str] = frozenset()
    # The served teacher's Deployment (teacher.serve.enabled); None when it does not exist.
    teacher: TeacherView | None = None
    # Kueue: the job's queue (its kueue.x-k8s.io/queue-name label, "" for none), whether the
    # operator runs with Kueue on, and the job's Workload (None while none exists).
    queue: str = ""
    kueue_enabled: bool = False
    workload: WorkloadView | None = None


@dataclass
class Decision:
    status: dict[str, Any] = field(default_factory=dict)  # merge patch of operator-owned fields
    create_attempt: int | None = None  # ensure training objects and missing pods of this gang attempt
    delete_pods: list[str] = field(default_factory=list)
    force_delete_pods: list[str] = field(default_factory=list)  # on lost nodes: grace period 0
    deploy: bool = False
    ensure_teacher: bool = False  # the teacher Deployment and Service must exist (and be current)
    delete_teacher: bool = False  # the job no longer needs its teacher: delete its Deployment and Service
    delete_training_objects: bool = False
    delete_job: bool = False
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    phase: str | None = None  # the phase after this decision
    # Kueue: create the Workload if it is missing; clear its reservation once an evicted gang is
    # gone (Kueue queues it again); mark it Finished once training is over (the quota is freed);
    # delete it while the job is suspended.
    ensure_workload: bool = False
    release_workload: bool = False
    finish_workload: bool = False
    delete_workload: bool = False

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.1)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def fmt_time(t: datetime) -> str:
    """RFC 3339 in UTC, to the second, as metav1.Time is."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def backoff_seconds(base: int, count: int, cap: int) -> float:
    """base, 2*base, 4*base, ... for the 1st, 2nd, 3rd restart; capped."""
    return float(min(base * (2 ** max(count - 1, 0)), cap))


class _Status:
    """The operator-owned status being built, diffed against what was observed."""

    def __init__(self, observed: dict[str, Any], now: datetime, generation: int) -> None:
        self.old = observed
        self.now = now
        self.generation = generation
        self.values: dict[str, Any] = {}
        self.conditions: list[dict[str, Any]] = [dict(c) for c in observed.get("conditions") or []]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, self.old.get(key, default))

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value

    def condition(self, type_: str, status: bool, reason: str, message: str, clock_on_reason: bool = False) -> None:
        """Set a condition. lastTransitionTime moves when the status flips, and with
        `clock_on_reason` also when the reason changes (a clock that restarts, e.g. TeacherReady)."""
        value = "True" if status else "False"
        message = message or reason  # every condition carries a message (`kubectl describe`, `kubectl wait`)
        for cond in self.conditions:
            if cond.get("type") == type_:
                if cond.get("status") != value or (clock_on_reason and cond.get("reason") != reason):
                    cond["lastTransitionTime"] = fmt_time(self.now)
                cond.update(status=value, reason=reason, message=message, observedGeneration=self.generation)
                return
        self.conditions.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": fmt_time(self.now),
                "observedGeneration": self.generation,
            }
        )

    def condition_since(self, type_: str) -> datetime | None:
        for cond in self.conditions:
            if cond.get("type") == type_ and cond.get("status") == "True":
                return parse_time(cond.get("lastTransitionTime"))
        return None

    def find(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.conditions if c.get("type") == type_), None)

    def has_condition(self, type_: str) -> bool:
        return any(c.get("type") == type_ and c.get("status") == "True" for c in self.conditions)

    def patch(self) -> dict[str, Any]:
        out = {k: v for k, v in self.values.items() if self.old.get(k) != v}
        if self.conditions != (self.old.get("conditions") or []):
            out["conditions"] = self.conditions
        return out


def decide(obs: Observed) -> Decision:
    st = _Status(obs.status, obs.now, obs.generation)
    d = Decision()
    old_phase = obs.status.get("phase")
    st.set("observedGeneration", obs.generation)
    if st.get("restarts") is None:
        st.set("restarts", 0)
    if st.get("evictions") is None:
        st.set("evictions", 0)

    phase = _step(obs, st, d, old_phase)
    # The attempt moves in the same patch as the restart that starts it, before the new gang's pods
    # exist: the old gang's fenced status patches (test /status/attempt) are refused from then on.
    if phase not in TERMINAL:
        st.set("attempt", _attempt(st))
    if phase in (*TERMINAL, "Deploying"):
        _training_over(obs, d)
    _teacher(obs, st, d, phase)
    d.phase = phase
    st.set("phase", phase)
    if phase != old_phase:
        warn = phase in ("Failed", "Restarting")
        d.events.insert(0, Event("Warning" if warn else "Normal", phase, f"phase {old_phase or '(new)'} -> {phase}"))
    if phase in TERMINAL and not st.get("completionTime"):
        st.set("completionTime", fmt_time(obs.now))
    _goodput(obs, st)
    d.status = st.patch()
    return d


# status.goodput holds this many decimals: it is written only when the rounded value moves.
GOODPUT_DECIMALS = 2


def goodput(productive_seconds: Any, start: datetime | None, end: datetime) -> float | None:
    """Productive training seconds (the trainer's) over the wall seconds from start to end; at most 1."""
    if not isinstance(productive_seconds, int | float) or start is None:
        return None
    wall = (end - start).total_seconds()
    if wall <= 0:
        return None
    return min(max(float(productive_seconds), 0.0) / wall, 1.0)


def _goodput(obs: Observed, st: _Status) -> None:
    end = parse_time(st.get("completionTime")) or obs.now
    value = goodput(obs.status.get("productiveSeconds"), parse_time(st.get("startTime")), end)
    if value is not None:
        st.set("goodput", round(value, GOODPUT_DECIMALS))


def _step(obs: Observed, st: _Status, d: Decision, phase: str | None) -> str:
    spec = obs.job.spec
    if phase in TERMINAL:
        return _finished(obs, st, d, phase)
    if phase == "Deploying":
        _delete_all(obs, d)
        return _deploying(obs, st, d)
    if obs.queue and not obs.kueue_enabled:
        return _fail(
            obs,
            st,
            d,
            "KueueNotEnabled",
            f"the job is labelled kueue.x-k8s.io/queue-name={obs.queue}, but the operator runs without --kueue "
            "(the chart's kueue.enabled)",
        )
    if spec.suspend:
        _delete_all(obs, d)
        if obs.queue and obs.workload is not None:
            d.delete_workload = True  # out of the queue while suspended; a new Workload on resume
            st.condition(COND_ADMITTED, False, "Suspended", "the Workload is deleted while the job is suspended")
        if phase != "Suspended":
            st.condition(COND_SUSPENDED, True, "SuspendRequested", "worker pods deleted; checkpoints kept")
            st.condition(COND_TRAINING, False, "Suspended", "spec.suspend is set: no worker runs")
        if any(not p.finished for p in obs.pods):
            d.requeue(POLL_SECONDS)
        return "Suspended"
    if phase == "Suspended":
        # A new gang attempt: a pod of the suspended gang that outlives the suspend (a partitioned
        # node) is then older than the fence, so it cannot write into the resumed run.
        st.set("resumes", int(st.get("resumes") or 0) + 1)
        st.condition(COND_SUSPENDED, False, "Resumed", "resuming from the newest checkpoint")
        phase = "Pending"
    if phase is None:
        st.condition(COND_TRAINING, False, "Created", "creating the worker gang")
        phase = "Pending"
    if obs.queue:
        waiting = _admission(obs, st, d, phase)
        if waiting is not None:
            return waiting
        if phase == "Queued":
            phase = "Pending"
    if phase == "Restarting":
        return _restarting(obs, st, d)
    return _training(obs, st, d, phase)


# -- Kueue admission ------------------------------------------------------------------------


def _training_over(obs: Observed, d: Decision) -> None:
    """Training is over (Deploying, Succeeded, Failed): Finished frees the Workload's quota."""
    if obs.queue and obs.workload is not None and not obs.workload.finished:
        d.finish_workload = True


def _admission(obs: Observed, st: _Status, d: Decision, phase: str) -> str | None:
    """ "Queued" while the job's Workload is not admitted (no gang runs then); None once it is.

    An evicted Workload (preempted, deactivated) stops the gang as a suspend does: the pods get
    SIGTERM and the trainer checkpoints and exits. The eviction is counted in `evictions`, never
    in `restarts`; once the pods are gone the reservation is cleared and Kueue queues it again."""
    wl = obs.workload
    live = any(not p.finished for p in obs.pods)
    if wl is not None and wl.admitted and not wl.evicted:
        if not st.has_condition(COND_ADMITTED):
            where = f"ClusterQueue {wl.cluster_queue}" + (f", flavors {', '.join(wl.flavors)}" if wl.flavors else "")
            st.condition(COND_ADMITTED, True, "Admitted", f"Workload {wl.name} admitted by {where}")
            d.events.append(Event("Normal", "Admitted", f"Workload {wl.name} admitted by {where}"))
        return None
    if wl is None:
        d.ensure_workload = True
        reason, message = "Pending", f"waiting for Kueue to admit the job in queue {obs.queue}"
    elif wl.evicted:
        reason = wl.evicted_reason or "Evicted"
        message = f"Workload {wl.name} evicted: {wl.evicted_message or reason}; the gang stops and the job requeues"
    else:
        reason = "Pending"
        message = wl.pending_message or f"Workload {wl.name} waits for quota in queue {obs.queue}"
    if phase in GANG_PHASES and (live or phase == "Running"):
        # A gang ran on this admission: its stop is an eviction (counted apart from maxRestarts).
        st.set("evictions", int(st.get("evictions") or 0) + 1)
        d.events.append(Event("Warning", "Evicted", message))
    st.condition(COND_ADMITTED, False, reason, message)
    st.condition(COND_TRAINING, False, "Queued", message)
    _delete_all(obs, d)
    if obs.pods:
        d.requeue(POLL_SECONDS)
    elif wl is not None and wl.evicted and wl.reserved:
        d.release_workload = True
    d.requeue(KUEUE_POLL_SECONDS)
    return "Queued"


# -- training -------------------------------------------------------------------------------


def _attempt(st: _Status) -> int:
    """The gang attempt: 0 for the first gang, +1 per restart, eviction or resume after a suspend
    (the pods' LABEL_ATTEMPT)."""
    return int(st.get("restarts") or 0) + int(st.get("evictions") or 0) + int(st.get("resumes") or 0)


def _node_lost(obs: Observed, pod: PodView) -> tuple[bool, float | None]:
    """(lost now, seconds until it would count as lost)."""
    if pod.node is None:
        return False, None
    if pod.node not in obs.nodes:
        return False, None
    node = obs.nodes[pod.node]
    if node is None:
        return True, None
    if node.ready == "True":
        return False, None
    if node.since is None:
        return True, None
    waited = (obs.now - node.since).total_seconds()
    if waited >= obs.notready_seconds:
        return True, None
    return False, obs.notready_seconds - waited


def _delete(obs: Observed, d: Decision, pods: list[PodView]) -> None:
    for pod in pods:
        lost, _ = _node_lost(obs, pod)
        if lost:
            # A lost node's kubelet never confirms a graceful delete: the pod would stay Terminating.
            if pod.name not in d.force_delete_pods:
                d.force_delete_pods.append(pod.name)
        elif not pod.deleting and pod.name not in d.delete_pods:
            d.delete_pods.append(pod.name)


def _delete_all(obs: Observed, d: Decision) -> None:
    _delete(obs, d, obs.pods)


def _restarting(obs: Observed, st: _Status, d: Decision) -> str:
    if obs.pods:
        _delete_all(obs, d)
        d.requeue(POLL_SECONDS)
        return "Restarting"
    since = st.condition_since(COND_RESTARTING) or obs.now
    count = _attempt(st)
    wait = backoff_seconds(obs.job.spec.failure_policy.backoff_seconds, count, obs.max_backoff_seconds)
    left = wait - (obs.now - since).total_seconds()
    if left > 0:
        d.requeue(left)
        return "Restarting"
    st.condition(COND_RESTARTING, False, "BackoffElapsed", f"recreating the gang after {wait:g}s")
    return _training(obs, st, d, "Pending")


@dataclass
class _Problem:
    kind: str  # permanent | failure | eviction | pending
    reason: str
    message: str


def _pod_problem(obs: Observed, pod: PodView) -> _Problem | None:
    """What, if anything, is wrong with one pod of the current gang."""
    if pod.phase == "Failed":
        if pod.evicted:
            return _Problem("eviction", "Evicted", f"{pod.name}: {pod.disruption}")
        end = pod.terminated
        term = parse_termination(end.message if end else None, end.exit_code if end else None)
        if not term.retryable:
            return _Problem("permanent", term.reason, f"{pod.name}: {term.message}".rstrip(": "))
        return _Problem("failure", term.reason, f"{pod.name}: {term.message}".rstrip(": "))
    lost, _ = _node_lost(obs, pod)
    if lost and not pod.finished:
        return _Problem("failure", "NodeLost", f"{pod.name}: node {pod.node} is NotReady or gone")
    if pod.deleting and not pod.finished:
        if pod.evicted:
            return _Problem("eviction", "Evicted", f"{pod.name}: {pod.disruption}")
        if pod.disruption == "DeletionByTaintManager":
            return _Problem("failure", "NodeLost", f"{pod.name}: evicted from a NotReady node")
        return _Problem("failure", "PodDeleted", f"{pod.name} was deleted")
    if pod.phase == "Pending" and pod.created is not None:
        timeout = obs.job.spec.failure_policy.pending_timeout_seconds
        if (obs.now - pod.created).total_seconds() >= timeout:
            if pod.waiting_reason in STUCK_WAITING:
                reason = "ImagePullBackOff" if "Image" in pod.waiting_reason else pod.waiting_reason
                return _Problem(
                    "pending", reason, f"{pod.name}: {pod.waiting_reason}: {pod.waiting_message} (Pending > {timeout}s)"
                )
            if pod.unschedulable is not None:
                return _Problem("pending", "Unschedulable", f"{pod.name}: {pod.unschedulable} (Pending > {timeout}s)")
            return _Problem("pending", "PendingTimeout", f"{pod.name} still Pending after {timeout}s")
    return None


def _missing_problem(obs: Observed, attempt: int, missing: list[int]) -> _Problem | None:
    """Why running workers are gone, from their last watched state; None: wait for the watch."""
    job = obs.job.metadata.name
    found: list[_Problem] = []
    for i in missing:
        name = names.worker_pod(job, i)
        last = obs.departed.get(name)
        if last is not None and last.attempt == attempt:
            if last.evicted:
                found.append(_Problem("eviction", "Evicted", f"{name}: {last.disruption}"))
            elif last.disruption == "DeletionByTaintManager":
                found.append(_Problem("failure", "NodeLost", f"{name}: evicted from a NotReady node"))
            else:
                pr = _pod_problem(obs, last)
                found.append(
                    pr
                    if pr is not None and pr.kind != "pending"
                    else _Problem("failure", "PodDeleted", f"{name} was deleted")
                )
        elif name in obs.unconfirmed:
            return None
        else:
            found.append(_Problem("failure", "PodDeleted", f"{name} disappeared"))
    # A failure outranks an eviction when both happened: it is the one that uses up maxRestarts.
    for kind in ("permanent", "failure"):
        for pr in found:
            if pr.kind == kind:
                return pr
    return found[0]


def _training(obs: Observed, st: _Status, d: Decision, phase: str) -> str:
    attempt = _attempt(st)
    stale = [p for p in obs.pods if p.attempt != attempt]
    if stale:
        # The previous gang must be gone before its names are reused.
        _delete(obs, d, stale)
        d.requeue(POLL_SECONDS)
        return phase
    nodes = obs.job.spec.parallelism.nodes
    gang = {p.index: p for p in obs.pods if p.index is not None and 0 <= p.index < nodes}
    problems = [pr for p in gang.values() if (pr := _pod_problem(obs, p))]
    for pr in problems:
        if pr.kind == "permanent":
            return _fail(obs, st, d, pr.reason, pr.message)
    rank0 = gang.get(0)
    if rank0 is not None and rank0.phase == "Succeeded":
        return _succeeded_training(obs, st, d, rank0)
    missing = [i for i in range(nodes) if i not in gang]
    if missing and phase == "Running":
        found = _missing_problem(obs, attempt, missing)
        if found is None:
            d.requeue(0.5)  # the watch has not reported the deletion yet; it will, or time out
            return phase
        if found.kind == "permanent":
            return _fail(obs, st, d, found.reason, found.message)
        problems.append(found)
    for kind in ("failure", "eviction"):
        for pr in problems:
            if pr.kind == kind:
                return _restart(obs, st, d, pr)
    for pr in problems:
        if pr.kind == "pending":
            return _fail(obs, st, d, pr.reason, pr.message)
    if missing and not gang and obs.job.spec.teacher.serve.enabled and not (obs.teacher and obs.teacher.ready):
        return _wait_for_teacher(obs, st, d)
    if missing:
        d.create_attempt = attempt
        d.requeue(POLL_SECONDS * 2)
        if st.get("stage") == STAGE_WAITING_FOR_TEACHER:
            st.set("stage", None)  # the trainer writes its own stage once it runs
    _requeue_deadlines(obs, d, list(gang.values()))
    if not missing and all(p.phase == "Running" for p in gang.values()):
        if not st.get("startTime"):
            st.set("startTime", fmt_time(obs.now))
        st.condition(COND_TRAINING, True, "AllWorkersRunning", f"{nodes} worker pod(s) running")
        st.condition(COND_RESTARTING, False, "GangRunning", f"gang attempt {attempt} running")
        return "Running"
    if phase != "Running":
        st.condition(COND_TRAINING, False, "WaitingForPods", "worker pods are being created or scheduled")
    return "Pending" if phase != "Running" else "Running"


def _teacher_clock(st: _Status, now: datetime) -> datetime:
    """Since when the served teacher has been not ready: starting, or unavailable after it was ready.
    A teacher (re)created after a suspension starts a fresh clock."""
    cond = st.find(COND_TEACHER_READY)
    if (
        cond is not None
        and cond.get("status") == "False"
        and cond.get("reason") in (TEACHER_STARTING, TEACHER_UNAVAILABLE)
    ):
        return parse_time(cond.get("lastTransitionTime")) or now
    return now


def _wait_for_teacher(obs: Observed, st: _Status, d: Decision) -> str:
    """No worker pod before the served teacher is ready; it fails the job after pendingTimeoutSeconds."""
    timeout = obs.job.spec.failure_policy.pending_timeout_seconds
    waited = (obs.now - _teacher_clock(st, obs.now)).total_seconds()
    name = names.teacher(obs.job.metadata.name)
    view = obs.teacher
    if waited >= timeout:
        if view is None:
            why = "its Deployment does not exist"
        else:
            why = f"{view.ready_replicas}/{view.replicas} replicas ready" + (f"; {view.detail}" if view.detail else "")
        return _fail(obs, st, d, "TeacherNotReady", f"teacher {name} not ready after {timeout}s: {why}")
    st.set("stage", STAGE_WAITING_FOR_TEACHER)
    st.condition(COND_TRAINING, False, "WaitingForTeacher", f"worker pods start once {name} is ready")
    d.requeue(min(timeout - waited + 0.5, TEACHER_POLL_SECONDS))
    return "Pending"


def _teacher(obs: Observed, st: _Status, d: Decision, phase: str) -> None:
    """The teacher's objects, TeacherReady and status.teacher, after the phase is decided.

    A served teacher runs while the job trains (Pending, Running, Restarting) and is deleted in
    every other phase: Deploying (training is over), Succeeded, Failed, Suspended. A pod of it that
    fails is its Deployment's business: the gang is not restarted for it (the trainer's client waits)."""
    teacher = obs.job.spec.teacher
    if teacher.endpoint:
        st.set("teacher", {"state": "External", "url": teacher.endpoint})
        return
    if not teacher.serve.enabled:
        return
    name = names.teacher(obs.job.metadata.name)
    url = names.teacher_url(obs.job.metadata.name, obs.job.namespace)
    replicas = teacher.serve.replicas
    view = obs.teacher
    found = st.find(COND_TEACHER_READY)
    previous = dict(found) if found is not None else None  # as observed: st.condition updates `found`
    if phase not in TEACHER_PHASES:
        if view is not None:
            d.delete_teacher = True
        if view is not None or previous is not None:
            st.condition(
                COND_TEACHER_READY,
                False,
                TEACHER_STOPPED,
                f"{name}: Deployment and Service deleted (job {phase})",
                clock_on_reason=True,
            )
            if previous is not None and previous.get("reason") != TEACHER_STOPPED:
                d.events.append(Event("Normal", TEACHER_STOPPED, f"deleting {name}: the job is {phase}"))
            st.set("teacher", {"state": "Stopped", "url": url, "replicas": replicas, "readyReplicas": 0})
        return
    d.ensure_teacher = True
    ready = view.ready_replicas if view is not None else 0
    detail = f"; {view.detail}" if view is not None and view.detail else ""
    if view is not None and view.ready:
        state = "Ready"
        st.condition(COND_TEACHER_READY, True, "TeacherAvailable", f"{ready}/{replicas} replicas ready at {url}")
        if previous is None or previous.get("status") != "True":
            d.events.append(Event("Normal", "TeacherReady", f"{name} ready at {url}"))
    elif previous is not None and (previous.get("status") == "True" or previous.get("reason") == TEACHER_UNAVAILABLE):
        # It was ready: the running gang waits for it to come back (no gang restart for this).
        state = "Unavailable"
        st.condition(COND_TEACHER_READY, False, TEACHER_UNAVAILABLE, f"0/{replicas} replicas ready{detail}")
        if previous.get("status") == "True":
            d.events.append(Event("Warning", TEACHER_UNAVAILABLE, f"{name} has no ready replica{detail}"))
    else:
        state = "Starting"
        st.condition(
            COND_TEACHER_READY,
            False,
            TEACHER_STARTING,
            f"{ready}/{replicas} replicas ready{detail}",
            clock_on_reason=True,
        )
    st.set("teacher", {"state": state, "url": url, "replicas": replicas, "readyReplicas": ready})


def _requeue_deadlines(obs: Observed, d: Decision, gang: list[PodView]) -> None:
    """Wake up when a pending deadline or a NotReady delay runs out, even if nothing else changes."""
    timeout = obs.job.spec.failure_policy.pending_timeout_seconds
    for pod in gang:
        if pod.phase == "Pending" and pod.created is not None:
            d.requeue(timeout - (obs.now - pod.created).total_seconds() + 0.5)
        _, left = _node_lost(obs, pod)
        if left is not None:
            d.requeue(left + 0.1)


def _restart(obs: Observed, st: _Status, d: Decision, pr: _Problem) -> str:
    policy = obs.job.spec.failure_policy
    restarts = int(st.get("restarts") or 0)
    if pr.kind == "eviction":
        st.set("evictions", int(st.get("evictions") or 0) + 1)
    else:
        if restarts >= policy.max_restarts:
            return _fail(
                obs,
                st,
                d,
                "MaxRestartsExceeded",
                f"{pr.reason}: {pr.message} (maxRestarts {policy.max_restarts} used up)",
            )
        st.set("restarts", restarts + 1)
    count = _attempt(st)
    wait = backoff_seconds(policy.backoff_seconds, count, obs.max_backoff_seconds)
    st.condition(COND_RESTARTING, True, pr.reason, f"{pr.message}; restart {count}, backoff {wait:g}s")
    st.condition(COND_TRAINING, False, "GangRestart", pr.message)
    d.events.append(
        Event(
            "Warning",
            "GangRestart",
            f"{pr.reason}: {pr.message}; restarts={st.get('restarts')} "
            f"evictions={st.get('evictions')}, backoff {wait:g}s",
        )
    )
    _delete_all(obs, d)
    d.requeue(POLL_SECONDS)
    return "Restarting"


def _fail(obs: Observed, st: _Status, d: Decision, reason: str, message: str) -> str:
    st.condition(COND_FAILED, True, reason, message)
    st.condition(COND_TRAINING, False, reason, message)
    st.condition(COND_RESTARTING, False, reason, "the job failed: no further restart")
    d.events.append(Event("Warning", reason, message))
    _cleanup_workers(obs, d)
    return "Failed"


def _cleanup_workers(obs: Observed, d: Decision) -> None:
    """Stop whatever still runs; finished pods stay for `kubectl logs` until the job goes."""
    _delete(obs, d, [p for p in obs.pods if not p.finished])


def result_of(pod: PodView) -> Termination:
    end = pod.terminated
    return parse_termination(end.message if end else None, end.exit_code if end else 0)


# status.metrics holds this many decimals: `kubectl get dj` prints retention as 0.872, not
# 0.8721786549256195. The quality gate compares the exact value from the result.
METRIC_DECIMALS = 3


# What status.metrics takes from the trainer's summary (api/status.Metrics, in its wire names).
METRIC_KEYS = ("teacher", "student", "retention", "metric", "champion", "studentOlder", "championOlder")


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, METRIC_DECIMALS) if isinstance(v, float) else v for k, v in metrics.items()}


def _succeeded_training(obs: Observed, st: _Status, d: Decision, rank0: PodView) -> str:
    term = result_of(rank0)
    result = term.result or {}
    raw = result.get("metrics")
    metrics: dict[str, Any] = raw if isinstance(raw, dict) else {}
    clean = {k: metrics[k] for k in METRIC_KEYS if metrics.get(k) is not None}
    if clean:
        st.set("metrics", _rounded(clean))
    st.condition(COND_TRAINING, False, "TrainingComplete", f"rank 0 finished: {term.reason}")
    st.condition(COND_RESTARTING, False, "TrainingComplete", "training is over")
    _delete_all(obs, d)  # training is over: its pods go (failed gangs keep theirs for logs)
    serving = obs.job.spec.serving
    if not serving.enabled:
        st.condition(COND_COMPLETE, True, "TrainingComplete", "serving disabled")
        return "Succeeded"
    retention = clean.get("retention")
    gate = serving.quality_gate.min_retention
    if not isinstance(retention, int | float):
        return _fail(obs, st, d, "QualityGateFailed", "the result has no retention to compare with the gate")
    if retention < gate - FLOAT_TOLERANCE:
        return _fail(
            obs,
            st,
            d,
            "QualityGateFailed",
            f"retention {retention:.4f} < minRetention {gate:.4f}; serving left untouched",
        )
    d.events.append(Event("Normal", "QualityGatePassed", f"retention {retention:.4f} >= {gate:.4f}"))
    return _deploying(obs, st, d)


# -- rollout and afterwards -----------------------------------------------------------------


def _ours(obs: Observed) -> bool:
    dep = obs.deployment
    return dep is not None and dep.model_path == names.model_path(obs.job.namespace, obs.job.metadata.name)


def _deploying(obs: Observed, st: _Status, d: Decision) -> str:
    d.deploy = True
    srv = obs.job.spec.serving
    if _ours(obs) and obs.deployment is not None and obs.deployment.available:
        url = names.serving_url(obs.job.metadata.name, srv.name, obs.job.namespace, srv.port)
        st.set("endpoint", url)
        st.condition(COND_READY, True, "DeploymentAvailable", f"serving at {url}")
        st.condition(COND_COMPLETE, True, "Deployed", "student rolled out")
        return "Succeeded"
    st.condition(COND_READY, False, "RollingOut", "waiting for the serving Deployment to be available")
    d.requeue(2.0)
    return "Deploying"


def _finished(obs: Observed, st: _Status, d: Decision, phase: str) -> str:
    if phase == "Succeeded":
        _delete_all(obs, d)
    else:
        _cleanup_workers(obs, d)
    if any(not p.finished for p in obs.pods if p.name not in d.force_delete_pods):
        d.requeue(POLL_SECONDS)
    serving_live = phase == "Succeeded" and obs.job.spec.serving.enabled
    # Later serving changes (replicas, batching, resources) roll out without retraining, but
    # only while the Deployment still serves this job's model (a later job may have taken it).
    if serving_live and (obs.deployment is None or obs.deployment.source_job == obs.job.metadata.name):
        d.deploy = True
    ttl = obs.job.spec.ttl_seconds_after_finished
    done = parse_time(st.get("completionTime")) or obs.now
    if ttl is None:
        return phase
    left = ttl - (obs.now - done).total_seconds()
    if left > 0:
        d.requeue(left)
        return phase
    if serving_live:
        if not st.has_condition(COND_CLEANED):
            d.delete_training_objects = True
            d.delete_pods = sorted({*d.delete_pods, *(p.name for p in obs.pods if not p.deleting)})
            st.condition(COND_CLEANED, True, "TTLExpired", "worker pods, Service and ConfigMap deleted")
    else:
        d.delete_job = True
        d.events.append(Event("Normal", "TTLExpired", f"deleting the job {ttl}s after it finished"))
    return phase
