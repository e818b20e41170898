"""Kueue admission: the Workload the operator creates for a queued job, and what it reads back.

A job labelled `kueue.x-k8s.io/queue-name` gets one Kueue Workload (kueue.x-k8s.io/v1beta2),
owned by the job, with one podSet for the worker gang: count = the gang's pods, the template =
a worker pod as the operator builds it (its `nvidia.com/gpu` requests included). No worker pod
exists until Kueue admits the Workload; the pods then carry the admitted flavors' node labels
and tolerations. On eviction (preemption, a deactivated Workload) the operator stops the gang
as a suspend does and, once its pods are gone, clears the quota reservation so Kueue queues the
Workload again, as Kueue's own jobframework does for the job kinds it integrates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from . import names

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
WORKLOAD = (API_VERSION, "Workload")
RESOURCE_FLAVOR = (API_VERSION, "ResourceFlavor")
PRIORITY_CLASS = (API_VERSION, "WorkloadPriorityClass")

LABEL_QUEUE_NAME = f"{GROUP}/queue-name"
LABEL_PRIORITY_CLASS = f"{GROUP}/priority-class"
PODSET = "workers"

# Workload conditions Kueue writes.
WL_QUOTA_RESERVED = "QuotaReserved"
WL_ADMITTED = "Admitted"
WL_EVICTED = "Evicted"
WL_FINISHED = "Finished"
WL_REQUEUED = "Requeued"
# Eviction reasons after which Kueue's jobframework marks the Workload Requeued=True.
REQUEUE_REASONS = frozenset({"Preempted", "NodeFailures"})

Manifest = dict[str, Any]


def queue_name(labels: dict[str, str] | None) -> str:
    return (labels or {}).get(LABEL_QUEUE_NAME, "")


def priority_class_name(labels: dict[str, str] | None) -> str:
    return (labels or {}).get(LABEL_PRIORITY_CLASS, "")


def _condition(body: Manifest, type_: str) -> Manifest | None:
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def _true(cond: Manifest | None) -> bool:
    return cond is not None and cond.get("status") == "True"


@dataclass(frozen=True)
class WorkloadView:
    """What the state machine needs of the job's Workload."""

    name: str
    reserved: bool  # status.admission is set (quota reserved)
    admitted: bool  # the Admitted condition is True
    evicted: bool  # the Evicted condition is True
    evicted_reason: str
    evicted_message: str
    finished: bool
    pending_message: str  # why it waits (the QuotaReserved condition's message)
    cluster_queue: str
    flavors: tuple[str, ...]  # the admitted flavors of the worker podSet

    @classmethod
    def from_dict(cls, body: Manifest) -> WorkloadView:
        status = body.get("status") or {}
        admission = status.get("admission") or {}
        evicted = _condition(body, WL_EVICTED)
        reserved_cond = _condition(body, WL_QUOTA_RESERVED)
        flavors: set[str] = set()
        for ps in admission.get("podSetAssignments") or []:
            flavors.update(str(f) for f in (ps.get("flavors") or {}).values())
        return cls(
            name=body["metadata"]["name"],
            reserved=bool(admission),
            admitted=_true(_condition(body, WL_ADMITTED)),
            evicted=_true(evicted),
            evicted_reason=str((evicted or {}).get("reason") or ""),
            evicted_message=str((evicted or {}).get("message") or ""),
            finished=_true(_condition(body, WL_FINISHED)),
            pending_message=str((reserved_cond or {}).get("message") or ""),
            cluster_queue=str(admission.get("clusterQueue") or ""),
            flavors=tuple(sorted(flavors)),
        )


@dataclass(frozen=True)
class Placement:
    """Where an admitted gang may run: its flavors' nodeLabels and tolerations, as Kueue gives a started job."""

    node_selector: dict[str, str]
    tolerations: list[Manifest]

    @classmethod
    def from_flavors(cls, flavors: list[Manifest]) -> Placement:
        selector: dict[str, str] = {}
        tolerations: list[Manifest] = []
        for flavor in flavors:
            spec = flavor.get("spec") or {}
            selector.update(spec.get("nodeLabels") or {})
            for tol in spec.get("tolerations") or []:
                if tol not in tolerations:
                    tolerations.append(dict(tol))
        return cls(selector, tolerations)

    def apply(self, pod: Manifest) -> Manifest:
        spec = pod["spec"]
        if self.node_selector:
            spec["nodeSelector"] = {**(spec.get("nodeSelector") or {}), **self.node_selector}
        if self.tolerations:
            spec["tolerations"] = [*(spec.get("tolerations") or []), *self.tolerations]
        return pod


def _with_requests(pod_spec: Manifest) -> Manifest:
    """Kueue counts requests: a limit without a request (an extended resource) counts as one."""
    spec = copy.deepcopy(pod_spec)
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        res = container.setdefault("resources", {})
        limits = res.get("limits") or {}
        requests = res.setdefault("requests", {})
        for key, value in limits.items():
            requests.setdefault(key, value)
    return spec


def workload(
    job_name: str, namespace: str, queue: str, pod: Manifest, count: int, priority: tuple[str, int] | None
) -> Manifest:
    """The job's Workload: one podSet of `count` pods shaped like `pod` (a worker pod as built)."""
    template_meta = {"labels": dict(pod["metadata"].get("labels") or {})}
    spec: Manifest = {
        "queueName": queue,
        "podSets": [
            {
                "name": PODSET,
                "count": count,
                "template": {"metadata": template_meta, "spec": _with_requests(pod["spec"])},
            }
        ],
    }
    if priority is not None:
        name, value = priority
        spec["priorityClassRef"] = {"group": GROUP, "kind": "WorkloadPriorityClass", "name": name}
        spec["priority"] = value
    return {
        "apiVersion": API_VERSION,
        "kind": "Workload",
        "metadata": {
            "name": names.workload(job_name),
            "namespace": namespace,
            "labels": {names.LABEL_JOB: job_name, names.LABEL_MANAGED_BY: names.MANAGER},
        },
        "spec": spec,
    }


def release_patch(body: Manifest, now: str, generation: int) -> Manifest:
    """The status after the evicted gang stopped: no reservation, QuotaReserved and Admitted False,
    Requeued (True after a preemption or node failures), as Kueue's jobframework writes it."""
    evicted = _condition(body, WL_EVICTED) or {}
    reason = str(evicted.get("reason") or "Evicted")
    message = str(evicted.get("message") or "evicted")
    conditions = [dict(c) for c in (body.get("status") or {}).get("conditions") or []]

    def put(type_: str, status: bool, why: str, text: str) -> None:
        value = "True" if status else "False"
        for cond in conditions:
            if cond.get("type") == type_:
                if cond.get("status") != value:
                    cond["lastTransitionTime"] = now
                cond.update(status=value, reason=why, message=text[:32768], observedGeneration=generation)
                return
        conditions.append({"type": type_, "status": value, "reason": why, "message": text[:32768],
                           "observedGeneration": generation, "lastTransitionTime": now})  # fmt: skip

    put(WL_REQUEUED, reason in REQUEUE_REASONS, reason, message)
    put(WL_QUOTA_RESERVED, False, "Pending", message)
    put(WL_ADMITTED, False, "NoReservation", "The workload has no reservation")
    return {"status": {"admission": None, "conditions": conditions}}


def finish_patch(body: Manifest, now: str, generation: int, reason: str, message: str) -> Manifest:
    """Finished=True: Kueue releases the quota (training is over)."""
    conditions = [dict(c) for c in (body.get("status") or {}).get("conditions") or []]
    conditions = [c for c in conditions if c.get("type") != WL_FINISHED]
    conditions.append({"type": WL_FINISHED, "status": "True", "reason": reason, "message": message[:32768],
                       "observedGeneration": generation, "lastTransitionTime": now})  # fmt: skip
    return {"status": {"conditions": conditions}}
