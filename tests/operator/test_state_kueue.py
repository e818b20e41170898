"""The state machine with Kueue: Queued until the Workload is admitted, an eviction stops the gang
and requeues without using up maxRestarts, training over releases the quota."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kdistill.operator.kueue import Placement, WorkloadView, finish_patch, release_patch, workload
from kdistill.operator.state import COND_ADMITTED, Observed, decide
from tests.operator.test_state import observe, pod, success


def wl(**kw: Any) -> WorkloadView:
    base: dict[str, Any] = dict(
        name="j-kueue",
        reserved=False,
        admitted=False,
        evicted=False,
        evicted_reason="",
        evicted_message="",
        finished=False,
        pending_message="couldn't assign flavors to pod set workers: insufficient quota for nvidia.com/gpu",
        cluster_queue="cq",
        flavors=(),
    )
    base.update(kw)
    return WorkloadView(**base)


ADMITTED = dict(reserved=True, admitted=True, flavors=("gpu",))


def queued(
    status: dict[str, Any] | None, pods: list[Any] | None = None, workload: WorkloadView | None = None
) -> Observed:
    return replace(observe(status, pods), queue="gpus", kueue_enabled=True, workload=workload)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_a_new_job_creates_its_workload_and_waits_queued_without_pods() -> None:
    d = decide(queued(None))
    assert d.phase == "Queued" and d.ensure_workload and d.create_attempt is None
    admitted = cond(d.status, COND_ADMITTED)
    assert admitted["status"] == "False" and admitted["reason"] == "Pending" and "gpus" in admitted["message"]
    for key in ("reason", "message", "observedGeneration", "lastTransitionTime"):
        assert admitted[key] != "" and admitted[key] is not None


def test_pending_workload_says_why_and_admission_starts_the_gang() -> None:
    d = decide(queued({"phase": "Queued"}, workload=wl()))
    assert d.phase == "Queued" and not d.ensure_workload and d.create_attempt is None
    assert "insufficient quota" in cond(d.status, COND_ADMITTED)["message"]
    status = {"phase": "Queued", "restarts": 0, "evictions": 0, "conditions": d.status["conditions"]}
    d = decide(queued(status, workload=wl(**ADMITTED)))
    assert d.phase == "Pending" and d.create_attempt == 0
    assert cond(d.status, COND_ADMITTED)["status"] == "True"
    assert "Admitted" in [e.reason for e in d.events]


def test_eviction_stops_the_gang_counts_an_eviction_and_releases_once_pods_are_gone() -> None:
    running = {"phase": "Running", "restarts": 0, "evictions": 0}
    evicted = wl(**ADMITTED, evicted=True, evicted_reason="Preempted", evicted_message="preempted by a higher one")
    d = decide(queued(running, [pod(0), pod(1)], evicted))
    assert d.phase == "Queued" and sorted(d.delete_pods) == ["j-worker-0", "j-worker-1"]
    assert d.status["evictions"] == 1 and "restarts" not in d.status
    assert not d.release_workload  # not before the pods are gone
    assert cond(d.status, COND_ADMITTED)["reason"] == "Preempted"
    # the next pass: the pods are gone; the reservation is cleared, nothing is counted again
    d = decide(queued({"phase": "Queued", "restarts": 0, "evictions": 1}, [], evicted))
    assert d.phase == "Queued" and d.release_workload and "evictions" not in d.status
    # re-admitted: a new gang (attempt 1)
    d = decide(queued({"phase": "Queued", "restarts": 0, "evictions": 1}, [], wl(**ADMITTED)))
    assert d.phase == "Pending" and d.create_attempt == 1


def test_training_over_finishes_the_workload_and_suspend_deletes_it() -> None:
    d = decide(
        queued(
            {"phase": "Running", "restarts": 0, "evictions": 0},
            [pod(0, "Succeeded", terminated=success(0.95)), pod(1, "Succeeded")],
            wl(**ADMITTED),
        )
    )
    assert d.phase == "Deploying" and d.finish_workload
    d = decide(queued({"phase": "Succeeded"}, [], wl(**ADMITTED, finished=True)))
    assert not d.finish_workload
    obs = queued({"phase": "Running", "restarts": 0, "evictions": 0}, [pod(0)], wl(**ADMITTED))
    obs = replace(obs, job=obs.job.model_copy(update={"spec": obs.job.spec.model_copy(update={"suspend": True})}))
    d = decide(obs)
    assert d.phase == "Suspended" and d.delete_workload and cond(d.status, COND_ADMITTED)["status"] == "False"


def test_a_queue_label_without_kueue_on_fails_with_the_flag_named() -> None:
    d = decide(replace(observe(None), queue="gpus", kueue_enabled=False))
    assert d.phase == "Failed" and "--kueue" in cond(d.status, "Failed")["message"]


def test_workload_view_placement_and_patches() -> None:
    body = {
        "metadata": {"name": "j-kueue", "generation": 1},
        "status": {
            "admission": {
                "clusterQueue": "cq",
                "podSetAssignments": [{"name": "workers", "flavors": {"nvidia.com/gpu": "gpu"}}],
            },
            "conditions": [
                {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": ""},
                {"type": "Admitted", "status": "True", "reason": "Admitted", "message": ""},
                {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "by x"},
            ],
        },
    }
    view = WorkloadView.from_dict(body)
    assert view.admitted and view.evicted and view.reserved and view.flavors == ("gpu",) and view.cluster_queue == "cq"
    patch = release_patch(body, "2026-01-01T00:00:00Z", 1)["status"]
    assert patch["admission"] is None
    by_type = {c["type"]: c for c in patch["conditions"]}
    assert by_type["QuotaReserved"]["status"] == "False" and by_type["Admitted"]["status"] == "False"
    assert by_type["Requeued"]["status"] == "True" and by_type["Requeued"]["reason"] == "Preempted"
    fin = {
        c["type"]: c for c in finish_patch(body, "2026-01-01T00:00:00Z", 1, "Succeeded", "done")["status"]["conditions"]
    }
    assert fin["Finished"]["status"] == "True"
    placement = Placement.from_flavors(
        [{"spec": {"nodeLabels": {"a": "b"}, "tolerations": [{"key": "t", "operator": "Exists"}]}}]
    )
    p = placement.apply({"spec": {"nodeSelector": {"x": "y"}}})
    assert p["spec"]["nodeSelector"] == {"x": "y", "a": "b"} and p["spec"]["tolerations"] == [
        {"key": "t", "operator": "Exists"}
    ]
    pod_body = {
        "metadata": {"labels": {"l": "v"}},
        "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "2"}}}]},
    }
    w = workload("j", "ml", "gpus", pod_body, 2, ("high", 100))
    ps = w["spec"]["podSets"][0]
    assert ps["count"] == 2 and ps["template"]["spec"]["containers"][0]["resources"]["requests"] == {
        "nvidia.com/gpu": "2"
    }
    assert w["spec"]["priority"] == 100 and w["spec"]["priorityClassRef"]["name"] == "high"
    assert "requests" not in pod_body["spec"]["containers"][0]["resources"]  # the pod itself is untouched
