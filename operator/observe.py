"""Views of what the operator observes (pods, nodes, the serving Deployment), parsed from API dicts.

The state machine reads only these small frozen views, so it can be tested with plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import names

# Waiting reasons that mean the pod will not start by itself.
STUCK_WAITING = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "ErrImageNeverPull",
    }
)
# DisruptionTarget reasons that are evictions/preemptions (counted apart from failures).
EVICTION_REASONS = frozenset(
    {"EvictionByEvictionAPI", "PreemptionByScheduler", "PreemptionByKubeScheduler", "TerminationByKubelet"}
)


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass(frozen=True)
class ContainerEnd:
    exit_code: int | None
    reason: str
    message: str


@dataclass(frozen=True)
class PodView:
    name: str
    index: int | None
    attempt: int | None  # the gang attempt the pod belongs to (LABEL_ATTEMPT)
    phase: str
    node: str | None
    created: datetime | None
    deleting: bool = False
    terminated: ContainerEnd | None = None
    waiting_reason: str = ""
    waiting_message: str = ""
    unschedulable: str | None = None  # the scheduler's message while PodScheduled is False
    disruption: str = ""  # DisruptionTarget reason, or status.reason such as Evicted

    @property
    def evicted(self) -> bool:
        return self.disruption in EVICTION_REASONS or self.disruption in {"Evicted", "Preempting"}

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @classmethod
    def from_dict(cls, pod: dict[str, Any]) -> PodView:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        labels = meta.get("labels") or {}
        terminated: ContainerEnd | None = None
        waiting_reason = waiting_message = ""
        for cs in status.get("containerStatuses") or []:
            if cs.get("name") != names.TRAINER_CONTAINER and len(status.get("containerStatuses") or []) > 1:
                continue
            state = cs.get("state") or {}
            if state.get("terminated"):
                t = state["terminated"]
                terminated = ContainerEnd(t.get("exitCode"), t.get("reason") or "", t.get("message") or "")
            elif state.get("waiting"):
                waiting_reason = state["waiting"].get("reason") or ""
                waiting_message = state["waiting"].get("message") or ""
        unschedulable = None
        disruption = status.get("reason") or ""
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                unschedulable = cond.get("message") or cond.get("reason") or "unschedulable"
            if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
                disruption = cond.get("reason") or disruption
        return cls(
            name=meta.get("name", ""),
            index=_int(labels.get(names.LABEL_INDEX)),
            attempt=_int(labels.get(names.LABEL_ATTEMPT)),
            phase=status.get("phase") or "Pending",
            node=spec.get("nodeName") or None,
            created=parse_time(meta.get("creationTimestamp")),
            deleting=bool(meta.get("deletionTimestamp")),
            terminated=terminated,
            waiting_reason=waiting_reason,
            waiting_message=waiting_message,
            unschedulable=unschedulable,
            disruption=disruption,
        )


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class NodeView:
    name: str
    ready: str  # "True", "False", "Unknown"
    since: datetime | None  # when Ready last changed

    @classmethod
    def from_dict(cls, node: dict[str, Any]) -> NodeView:
        name = (node.get("metadata") or {}).get("name", "")
        for cond in (node.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Ready":
                return cls(name, str(cond.get("status")), parse_time(cond.get("lastTransitionTime")))
        return cls(name, "Unknown", None)


@dataclass(frozen=True)
class DeploymentView:
    name: str
    model_path: str
    source_job: str
    available: bool

    @classmethod
    def from_dict(cls, dep: dict[str, Any]) -> DeploymentView:
        meta = dep.get("metadata") or {}
        ann = meta.get("annotations") or {}
        spec = dep.get("spec") or {}
        status = dep.get("status") or {}
        want = int(spec.get("replicas", 1))
        rolled = int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
        updated = int(status.get("updatedReplicas") or 0) >= want
        ready = int(status.get("availableReplicas") or 0) >= want
        return cls(
            name=meta.get("name", ""),
            model_path=ann.get(names.ANNOTATION_MODEL_PATH, ""),
            source_job=ann.get(names.ANNOTATION_SOURCE_JOB, ""),
            available=rolled and updated and ready,
        )


@dataclass(frozen=True)
class TeacherView:
    """The served teacher's Deployment (teacher.serve.enabled), and why its pods are not ready."""

    name: str
    replicas: int
    ready_replicas: int  # status.availableReplicas: ready for minReadySeconds
    spec_hash: str
    detail: str = ""  # the first teacher pod's stuck reason, when the pass looked at the pods

    @property
    def ready(self) -> bool:
        return self.ready_replicas >= 1

    @classmethod
    def from_dict(cls, dep: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> TeacherView:
        meta = dep.get("metadata") or {}
        status = dep.get("status") or {}
        return cls(
            name=meta.get("name", ""),
            replicas=int((dep.get("spec") or {}).get("replicas", 1)),
            ready_replicas=int(status.get("availableReplicas") or 0),
            spec_hash=(meta.get("annotations") or {}).get(names.ANNOTATION_SPEC_HASH, ""),
            detail=_pods_detail(pods or []),
        )


def _pods_detail(pods: list[dict[str, Any]]) -> str:
    """Why the teacher's pods are not ready, as a user would look it up: unschedulable, an image
    that does not pull, a container that keeps failing, or a readiness probe not yet passed."""
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        name = (pod.get("metadata") or {}).get("name", "")
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return f"{name}: unschedulable: {cond.get('message') or cond.get('reason') or ''}".rstrip(": ")
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason"):
                return f"{name}: {waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if last:
                return f"{name}: restarted after exit code {last.get('exitCode')} ({last.get('reason') or ''})"
            if not cs.get("ready"):
                return f"{name}: not ready (readiness probe)"
    return "no teacher pod yet" if not pods else ""
