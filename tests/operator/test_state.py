"""The state machine, exhaustively: observed state in, decision out. No cluster, no clock."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kdistill.api import parse_job
from kdistill.api.failures import ExitCode, Termination, termination_for
from kdistill.operator.observe import ContainerEnd, DeploymentView, NodeView, PodView, TeacherView
from kdistill.operator.state import Decision, Observed, backoff_seconds, decide, fmt_time

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
MODEL = "/mnt/checkpoints/ml/j/student-int8"


def make_job(**spec: Any):  # type: ignore[no-untyped-def]
    body: dict[str, Any] = {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "j", "namespace": "ml"},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": "pvc://m/t"},
            "student": {"fromTeacher": {"numLayers": 2}},
            "data": {"train": "pvc://d/t.jsonl", "eval": "pvc://d/e.jsonl"},
            "parallelism": {"nodes": 2, "gpusPerNode": 1, "student": {"data": 2}},
            "checkpoint": {"volume": {"claimName": "ckpt"}},
            "failurePolicy": {"maxRestarts": 2, "backoffSeconds": 10, "pendingTimeoutSeconds": 60},
            "serving": {"qualityGate": {"minRetention": 0.9}},
        },
    }
    body["spec"].update(spec)
    return parse_job(body)


def pod(index: int, phase: str = "Running", attempt: int = 0, node: str = "n1", **kw: Any) -> PodView:
    return PodView(
        name=f"j-worker-{index}",
        index=index,
        attempt=attempt,
        phase=phase,
        node=node,
        created=kw.pop("created", NOW - timedelta(seconds=5)),
        **kw,
    )


def ended(t: Termination | None = None, code: int = 1) -> ContainerEnd:
    return ContainerEnd(code, "Error", t.to_json() if t else "")


def success(retention: float | None) -> ContainerEnd:
    metrics = {"metric": "accuracy", "teacher": 0.9, "student": 0.9 * (retention or 0)}
    if retention is not None:
        metrics["retention"] = retention
    return ContainerEnd(
        0,
        "Completed",
        json.dumps({"reason": "Succeeded", "retryable": False, "result": {"metrics": metrics, "steps": 10}}),
    )


def observe(
    status: dict[str, Any] | None = None,
    pods: list[PodView] | None = None,
    *,
    nodes: dict[str, NodeView | None] | None = None,
    deployment: DeploymentView | None = None,
    now: datetime = NOW,
    **spec: Any,
) -> Observed:
    pods = pods or []
    if nodes is None:
        nodes = {p.node: NodeView(p.node, "True", NOW - timedelta(hours=1)) for p in pods if p.node}
    return Observed(
        job=make_job(**spec),
        generation=4,
        status=dict(status or {}),
        pods=pods,
        nodes=nodes,
        deployment=deployment,
        now=now,
        notready_seconds=30,
    )


def running(**extra: Any) -> dict[str, Any]:
    return {"phase": "Running", "restarts": 0, "evictions": 0, "startTime": fmt_time(NOW), **extra}


def cond(d: Decision, type_: str) -> dict[str, Any]:
    return next(c for c in d.status["conditions"] if c["type"] == type_)


# -- creation and steady state ----------------------------------------------------------------


def test_new_job_goes_pending_and_creates_gang_attempt_zero() -> None:
    d = decide(observe())
    assert d.phase == "Pending" and d.create_attempt == 0
    assert d.status["restarts"] == 0 and d.status["evictions"] == 0 and d.status["observedGeneration"] == 4
    assert [e.reason for e in d.events] == ["Pending"]


def test_all_pods_running_means_running_with_start_time() -> None:
    d = decide(observe({"phase": "Pending", "restarts": 0, "evictions": 0}, [pod(0), pod(1)]))
    assert d.phase == "Running" and d.create_attempt is None
    assert d.status["startTime"] == fmt_time(NOW)
    assert cond(d, "Training")["status"] == "True"
    assert d.events[0].reason == "Running"


def test_partial_gang_while_pending_creates_the_missing_pod() -> None:
    d = decide(observe({"phase": "Pending", "restarts": 0, "evictions": 0}, [pod(0)]))
    assert d.phase == "Pending" and d.create_attempt == 0 and not d.delete_pods


def test_second_pass_over_the_same_state_changes_nothing() -> None:
    first = decide(observe({"phase": "Pending", "restarts": 0, "evictions": 0}, [pod(0), pod(1)]))
    status = {"phase": "Pending", "restarts": 0, "evictions": 0, **first.status}
    second = decide(observe(status, [pod(0), pod(1)], now=NOW + timedelta(seconds=30)))
    assert second.status == {} and second.events == [] and second.create_attempt is None
    assert not second.delete_pods and not second.force_delete_pods and not second.deploy


def test_trainer_fields_are_never_written_by_the_operator() -> None:
    from kdistill.api import TRAINER_STATUS_FIELDS

    status = running(step=10, totalSteps=100, progress="10%", stage="output")
    for case in (
        observe(status, [pod(0), pod(1)]),
        observe(status, [pod(0, "Failed", terminated=ended()), pod(1)]),
        observe(status, [pod(0, "Succeeded", terminated=success(0.95)), pod(1)]),
    ):
        assert not set(decide(case).status) & set(TRAINER_STATUS_FIELDS)


# -- failures -----------------------------------------------------------------------------


def test_retryable_failure_restarts_the_gang_with_backoff() -> None:
    t = termination_for(ExitCode.PEER_LOST, "nccl timeout")
    d = decide(observe(running(), [pod(0), pod(1, "Failed", terminated=ended(t))]))
    assert d.phase == "Restarting" and d.status["restarts"] == 1
    assert sorted(d.delete_pods) == ["j-worker-0", "j-worker-1"]
    assert cond(d, "Restarting")["reason"] == "PEER_LOST" and "backoff 10s" in cond(d, "Restarting")["message"]
    assert [e.reason for e in d.events] == ["Restarting", "GangRestart"]
    assert d.events[1].type == "Warning"


def test_restarting_waits_for_pods_then_backoff_then_recreates_the_next_gang_attempt() -> None:
    restarting = {
        "phase": "Restarting",
        "restarts": 1,
        "evictions": 0,
        "conditions": [
            {"type": "Restarting", "status": "True", "reason": "X", "message": "", "lastTransitionTime": fmt_time(NOW)}
        ],
    }
    d = decide(observe(restarting, [pod(0, deleting=True)], now=NOW + timedelta(seconds=1)))
    assert d.phase == "Restarting" and d.create_attempt is None and d.requeue_after == 1.0
    d = decide(observe(restarting, [], now=NOW + timedelta(seconds=4)))
    assert d.phase == "Restarting" and d.create_attempt is None
    assert d.requeue_after == pytest.approx(6.0)
    d = decide(observe(restarting, [], now=NOW + timedelta(seconds=10)))
    assert d.phase == "Pending" and d.create_attempt == 1
    assert cond(d, "Restarting")["status"] == "False"


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_seconds(30, n, 3600) for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert backoff_seconds(30, 20, 3600) == 3600
    assert backoff_seconds(0, 5, 3600) == 0


def test_pods_of_a_stale_gang_attempt_are_deleted_before_new_ones() -> None:
    status = {"phase": "Pending", "restarts": 1, "evictions": 0}
    d = decide(observe(status, [pod(0, attempt=0)]))
    assert d.delete_pods == ["j-worker-0"] and d.create_attempt is None


def test_max_restarts_exhausted_fails_with_the_reason() -> None:
    t = termination_for(ExitCode.RETRYABLE, "flaky")
    d = decide(observe(running(restarts=2), [pod(0, "Failed", attempt=2, terminated=ended(t)), pod(1, attempt=2)]))
    assert d.phase == "Failed" and "restarts" not in d.status
    c = cond(d, "Failed")
    assert c["reason"] == "MaxRestartsExceeded" and "RETRYABLE" in c["message"]
    assert d.delete_pods == ["j-worker-1"]  # the failed pod stays for logs
    assert d.status["completionTime"] == fmt_time(NOW)


@pytest.mark.parametrize(
    "code",
    [
        ExitCode.BAD_SPEC,
        ExitCode.BAD_DATA,
        ExitCode.MODEL_NOT_FOUND,
        ExitCode.NETWORK_REQUIRED,
        ExitCode.CHECKPOINT_INCOMPATIBLE,
        ExitCode.INTERNAL,
    ],
)
def test_permanent_failures_fail_at_once(code: ExitCode) -> None:
    d = decide(observe(running(), [pod(0), pod(1, "Failed", terminated=ended(termination_for(code, "why")))]))
    assert d.phase == "Failed" and cond(d, "Failed")["reason"] == code.name
    assert d.status.get("restarts") is None  # unchanged


def test_exit_code_alone_classifies_when_there_is_no_message() -> None:
    d = decide(observe(running(), [pod(0, "Failed", terminated=ContainerEnd(21, "Error", "")), pod(1)]))
    assert d.phase == "Failed" and cond(d, "Failed")["reason"] == "BAD_DATA"
    d = decide(observe(running(), [pod(0, "Failed", terminated=ContainerEnd(137, "OOMKilled", "")), pod(1)]))
    assert d.phase == "Restarting"  # a kill or OOM is retryable


def test_permanent_failure_wins_over_a_retryable_one() -> None:
    retry = ended(termination_for(ExitCode.PEER_LOST, "peer"))
    perm = ended(termination_for(ExitCode.BAD_DATA, "data"))
    d = decide(observe(running(), [pod(0, "Failed", terminated=retry), pod(1, "Failed", terminated=perm)]))
    assert d.phase == "Failed" and cond(d, "Failed")["reason"] == "BAD_DATA"


def test_eviction_counts_apart_and_does_not_use_max_restarts() -> None:
    gang = [pod(0, attempt=2, deleting=True, disruption="EvictionByEvictionAPI"), pod(1, attempt=2)]
    d = decide(observe(running(restarts=2), gang))
    assert d.phase == "Restarting" and d.status["evictions"] == 1 and "restarts" not in d.status
    d = decide(observe(running(restarts=2), [pod(0, "Failed", attempt=2, disruption="Evicted"), pod(1, attempt=2)]))
    assert d.phase == "Restarting" and d.status["evictions"] == 1
    d = decide(observe(running(), [pod(0, deleting=True, disruption="PreemptionByScheduler"), pod(1)]))
    assert d.status["evictions"] == 1


def test_deleted_or_vanished_worker_restarts_the_gang() -> None:
    d = decide(observe(running(), [pod(0, deleting=True), pod(1)]))
    assert d.phase == "Restarting" and cond(d, "Restarting")["reason"] == "PodDeleted"
    d = decide(observe(running(), [pod(0)]))
    assert d.phase == "Restarting" and d.status["restarts"] == 1


def test_node_notready_counts_only_after_the_detection_delay() -> None:
    since = NOW - timedelta(seconds=10)
    nodes = {"n1": NodeView("n1", "True", None), "n2": NodeView("n2", "Unknown", since)}
    d = decide(observe(running(), [pod(0), pod(1, node="n2")], nodes=nodes))
    assert d.phase == "Running" and d.requeue_after == pytest.approx(20.1)
    d = decide(observe(running(), [pod(0), pod(1, node="n2")], nodes=nodes, now=NOW + timedelta(seconds=21)))
    assert d.phase == "Restarting" and cond(d, "Restarting")["reason"] == "NodeLost"
    assert d.force_delete_pods == ["j-worker-1"] and d.delete_pods == ["j-worker-0"]


def test_pod_on_a_deleted_node_is_force_deleted() -> None:
    d = decide(
        observe(running(), [pod(0), pod(1, node="gone")], nodes={"n1": NodeView("n1", "True", None), "gone": None})
    )
    assert d.phase == "Restarting" and d.force_delete_pods == ["j-worker-1"]


def test_taint_manager_deletion_is_a_lost_node_not_an_eviction() -> None:
    d = decide(observe(running(), [pod(0), pod(1, deleting=True, disruption="DeletionByTaintManager")]))
    assert d.status["restarts"] == 1 and "evictions" not in d.status


@pytest.mark.parametrize(
    "kw,reason",
    [
        ({"unschedulable": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}, "Unschedulable"),
        ({"waiting_reason": "ImagePullBackOff", "waiting_message": "not found"}, "ImagePullBackOff"),
        ({"waiting_reason": "ErrImagePull"}, "ImagePullBackOff"),
        ({"waiting_reason": "CreateContainerConfigError"}, "CreateContainerConfigError"),
        ({}, "PendingTimeout"),
    ],
)
def test_pods_pending_past_the_deadline_fail_the_job(kw: dict[str, Any], reason: str) -> None:
    status = {"phase": "Pending", "restarts": 0, "evictions": 0}
    young = [pod(0, "Pending", node=None, created=NOW - timedelta(seconds=59), **kw)]
    d = decide(observe(status, young))
    assert d.phase == "Pending" and d.requeue_after is not None and d.requeue_after <= 1.5
    old = [pod(0, "Pending", node=None, created=NOW - timedelta(seconds=61), **kw), pod(1)]
    d = decide(observe(status, old))
    assert d.phase == "Failed" and cond(d, "Failed")["reason"] == reason
    assert "Pending > 60s" in cond(d, "Failed")["message"] or reason == "PendingTimeout"
    assert d.delete_pods == ["j-worker-0", "j-worker-1"]


# -- success, quality gate, rollout --------------------------------------------------------


def test_success_without_serving_succeeds_and_cleans_up() -> None:
    d = decide(
        observe(
            running(), [pod(0, "Succeeded", terminated=success(0.5)), pod(1, "Succeeded")], serving={"enabled": False}
        )
    )
    assert d.phase == "Succeeded" and not d.deploy
    assert d.status["metrics"]["retention"] == 0.5 and d.status["completionTime"]
    assert sorted(d.delete_pods) == ["j-worker-0", "j-worker-1"]


def test_status_metrics_are_rounded_for_kubectl_and_the_gate_uses_the_exact_value() -> None:
    """`kubectl get dj` prints status.metrics.retention as written: 0.872, not 0.8721786549256195."""
    d = decide(observe(running(), [pod(0, "Succeeded", terminated=success(0.8721786549256195)), pod(1)]))
    metrics = d.status["metrics"]
    assert metrics == {"metric": "accuracy", "teacher": 0.9, "student": 0.785, "retention": 0.872}
    # minRetention 0.8721 is met by the exact retention and not by the rounded 0.872: the gate
    # compares the exact value.
    gated = decide(
        observe(
            running(),
            [pod(0, "Succeeded", terminated=success(0.8721786549256195)), pod(1)],
            serving={"qualityGate": {"minRetention": 0.8721}},
        )
    )
    assert gated.phase == "Deploying" and gated.status["metrics"]["retention"] == 0.872


def test_gate_passes_then_deploying_then_succeeded_when_available() -> None:
    d = decide(observe(running(), [pod(0, "Succeeded", terminated=success(0.93)), pod(1)]))
    assert d.phase == "Deploying" and d.deploy and d.status["metrics"]["retention"] == 0.93
    assert "QualityGatePassed" in [e.reason for e in d.events]
    deploying = {"phase": "Deploying", "restarts": 0, "evictions": 0}
    d = decide(observe(deploying, [], deployment=DeploymentView("j-serving", MODEL, "j", available=False)))
    assert d.phase == "Deploying" and d.deploy and "endpoint" not in d.status
    d = decide(observe(deploying, [], deployment=DeploymentView("j-serving", MODEL, "j", available=True)))
    assert d.phase == "Succeeded" and d.status["endpoint"] == "http://j-serving.ml.svc:8080"
    assert cond(d, "Ready")["status"] == "True"
    # available, but still serving another job's model: not yet ours
    d = decide(observe(deploying, [], deployment=DeploymentView("j-serving", "/other", "k", available=True)))
    assert d.phase == "Deploying"


@pytest.mark.parametrize("retention", [0.5, 0.8999, None])
def test_quality_gate_failing_leaves_serving_alone(retention: float | None) -> None:
    d = decide(observe(running(), [pod(0, "Succeeded", terminated=success(retention)), pod(1)]))
    assert d.phase == "Failed" and not d.deploy
    assert cond(d, "Failed")["reason"] == "QualityGateFailed"


def test_gate_uses_a_float_tolerance() -> None:
    d = decide(observe(running(), [pod(0, "Succeeded", terminated=success(0.9 - 1e-9)), pod(1)]))
    assert d.phase == "Deploying"


def test_succeeded_job_keeps_its_deployment_in_sync_only_while_it_serves_it() -> None:
    done = {
        "phase": "Succeeded",
        "restarts": 0,
        "evictions": 0,
        "completionTime": fmt_time(NOW),
        "observedGeneration": 4,
    }
    d = decide(observe(done, [], deployment=DeploymentView("s", MODEL, "j", True)))
    assert d.deploy and d.status == {}
    d = decide(observe(done, [], deployment=DeploymentView("s", "/other", "later-job", True)))
    assert not d.deploy


# -- suspend, TTL ---------------------------------------------------------------------------


def test_suspend_deletes_pods_and_resume_starts_a_new_attempt() -> None:
    d = decide(observe(running(), [pod(0), pod(1)], suspend=True))
    assert d.phase == "Suspended" and sorted(d.delete_pods) == ["j-worker-0", "j-worker-1"]
    assert cond(d, "Suspended")["status"] == "True" and not d.delete_training_objects
    d = decide(observe({"phase": "Suspended", "restarts": 1, "evictions": 0, "attempt": 1}, []))
    # A new attempt, not counted as a restart: the suspended gang's ranks are fenced out.
    assert d.phase == "Pending" and d.create_attempt == 2 and "restarts" not in d.status
    assert d.status["resumes"] == 1 and d.status["attempt"] == 2
    assert cond(d, "Suspended")["reason"] == "Resumed"
    # A pod of the suspended gang still alive after the resume is stale: deleted, never adopted,
    # and the new gang waits until it is gone.
    resumed = {"phase": "Pending", "restarts": 1, "evictions": 0, "resumes": 1, "attempt": 2}
    d = decide(observe(resumed, [pod(0, attempt=1)]))
    assert d.delete_pods == ["j-worker-0"] and d.create_attempt is None and d.phase == "Pending"
    assert decide(observe(resumed, [])).create_attempt == 2


def test_suspend_does_not_touch_finished_jobs() -> None:
    d = decide(observe({"phase": "Failed", "completionTime": fmt_time(NOW)}, [], suspend=True))
    assert d.phase == "Failed"


def test_ttl_deletes_failed_or_unserved_jobs_and_only_training_objects_of_served_ones() -> None:
    failed = {"phase": "Failed", "restarts": 0, "evictions": 0, "completionTime": fmt_time(NOW)}
    d = decide(observe(failed, [], ttlSecondsAfterFinished=60, now=NOW + timedelta(seconds=10)))
    assert not d.delete_job and d.requeue_after == pytest.approx(50)
    d = decide(observe(failed, [], ttlSecondsAfterFinished=60, now=NOW + timedelta(seconds=61)))
    assert d.delete_job
    served = {**failed, "phase": "Succeeded"}
    d = decide(observe(served, [], ttlSecondsAfterFinished=0, deployment=DeploymentView("s", MODEL, "j", True)))
    assert d.delete_training_objects and not d.delete_job
    cleaned = {**served, **d.status}
    d = decide(observe(cleaned, [], ttlSecondsAfterFinished=0, deployment=DeploymentView("s", MODEL, "j", True)))
    assert not d.delete_training_objects and d.status == {}
    d = decide(observe(served, [], ttlSecondsAfterFinished=0, serving={"enabled": False}))
    assert d.delete_job


# -- parsing the API's objects --------------------------------------------------------------


def test_pod_view_reads_terminated_state_disruption_and_scheduling() -> None:
    body = {
        "metadata": {
            "name": "j-worker-1",
            "creationTimestamp": "2026-11-29T11:59:00Z",
            "deletionTimestamp": "2026-11-29T12:00:00Z",
            "labels": {"kdistill.io/replica-index": "1", "kdistill.io/restart-generation": "2"},
        },
        "spec": {"nodeName": "n2"},
        "status": {
            "phase": "Failed",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "terminated": {
                            "exitCode": 11,
                            "reason": "Error",
                            "message": '{"reason":"PEER_LOST","retryable":true}',
                        }
                    },
                }
            ],
        },
    }
    p = PodView.from_dict(body)
    assert (p.index, p.attempt, p.node, p.deleting, p.evicted) == (1, 2, "n2", True, True)
    assert p.terminated == ContainerEnd(11, "Error", '{"reason":"PEER_LOST","retryable":true}')
    pending = PodView.from_dict(
        {
            "metadata": {"name": "x"},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no GPUs"}
                ],
            },
        }
    )
    assert pending.unschedulable == "no GPUs" and pending.index is None


def test_deployment_view_availability() -> None:
    def dep(**status: Any) -> DeploymentView:
        return DeploymentView.from_dict(
            {
                "metadata": {
                    "name": "s",
                    "generation": 2,
                    "annotations": {"kdistill.io/model-path": MODEL, "kdistill.io/source-job": "j"},
                },
                "spec": {"replicas": 2},
                "status": status,
            }
        )

    assert dep(observedGeneration=2, updatedReplicas=2, availableReplicas=2).available
    assert not dep(observedGeneration=1, updatedReplicas=2, availableReplicas=2).available
    assert not dep(observedGeneration=2, updatedReplicas=1, availableReplicas=2).available
    assert not dep(observedGeneration=2, updatedReplicas=2, availableReplicas=1).available


def test_a_worker_gone_after_eviction_counts_as_an_eviction_from_its_watched_final_state() -> None:
    # The LIST no longer shows worker 0; the watch kept its last state with DisruptionTarget.
    last = pod(0, deleting=True, disruption="EvictionByEvictionAPI")
    obs = observe(running(restarts=1), [pod(1, attempt=1)])
    d = decide(replace(obs, departed={"j-worker-0": replace(last, attempt=1)}))
    assert d.phase == "Restarting" and d.status["evictions"] == 1 and "restarts" not in d.status
    assert cond(d, "Restarting")["reason"] == "Evicted"


def test_a_departed_pod_of_an_older_generation_or_a_plain_deletion_is_a_failure() -> None:
    old = pod(0, deleting=True, disruption="EvictionByEvictionAPI", attempt=0)
    obs = observe(running(restarts=1), [pod(1, attempt=1)])
    d = decide(replace(obs, departed={"j-worker-0": old}))
    assert d.status["restarts"] == 2 and cond(d, "Restarting")["reason"] == "PodDeleted"
    d = decide(replace(obs, departed={"j-worker-0": pod(0, attempt=1, deleting=True)}))
    assert d.status["restarts"] == 2 and "evictions" not in d.status


def test_a_departed_pod_that_failed_permanently_fails_the_job() -> None:
    bad = pod(0, "Failed", deleting=True, terminated=ended(termination_for(ExitCode.BAD_DATA, "x")))
    obs = observe(running(), [pod(1)])
    d = decide(replace(obs, departed={"j-worker-0": bad}))
    assert d.phase == "Failed" and cond(d, "Failed")["reason"] == "BAD_DATA"


def test_a_missing_pod_whose_deletion_the_watch_has_not_reported_waits() -> None:
    obs = observe(running(), [pod(1)])
    d = decide(replace(obs, unconfirmed=frozenset({"j-worker-0"})))
    assert d.phase == "Running" and not d.status.get("restarts") and d.requeue_after == 0.5
    assert not d.delete_pods and d.create_attempt is None


# -- the served teacher ------------------------------------------------------------------------

SERVED = {"model": "pvc://m/t", "serve": {"enabled": True, "replicas": 2}}
TEACHER_URL = "http://j-teacher.ml.svc:8080"


def teacher_view(ready: int = 0, detail: str = "") -> TeacherView:
    return TeacherView("j-teacher", 2, ready, "h", detail)


def served(status: dict[str, Any] | None = None, pods: list[PodView] | None = None, *,
           teacher: TeacherView | None = None, now: datetime = NOW, **spec: Any) -> Observed:  # fmt: skip
    return replace(observe(status, pods, now=now, teacher=SERVED, **spec), teacher=teacher)


def settle(status: dict[str, Any], d: Decision) -> dict[str, Any]:
    """The status after the decision's merge patch (a None value removes the field)."""
    out = {**status, **d.status}
    return {k: v for k, v in out.items() if v is not None}


def test_a_served_teacher_comes_first_and_the_workers_wait_for_it() -> None:
    d = decide(served())
    assert d.phase == "Pending" and d.ensure_teacher and d.create_attempt is None and not d.delete_teacher
    assert d.status["stage"] == "WaitingForTeacher"
    assert cond(d, "TeacherReady")["status"] == "False" and cond(d, "TeacherReady")["reason"] == "TeacherStarting"
    assert cond(d, "Training")["reason"] == "WaitingForTeacher"
    assert d.status["teacher"] == {"state": "Starting", "url": TEACHER_URL, "replicas": 2, "readyReplicas": 0}
    assert d.requeue_after is not None and d.requeue_after <= 10
    # The Deployment exists, its pod not ready yet: still no worker, and nothing new to write.
    status = settle({}, d)
    again = decide(served(status, teacher=teacher_view(0, "j-teacher-x: not ready"), now=NOW + timedelta(seconds=5)))
    assert again.create_attempt is None and again.ensure_teacher and again.phase == "Pending"
    assert set(again.status) <= {"conditions"} and not again.events
    assert cond(again, "TeacherReady")["lastTransitionTime"] == fmt_time(NOW)  # the clock did not move


def test_the_workers_start_once_the_teacher_is_ready() -> None:
    waiting = settle({}, decide(served()))
    d = decide(served(waiting, teacher=teacher_view(1), now=NOW + timedelta(seconds=20)))
    assert d.phase == "Pending" and d.create_attempt == 0 and d.ensure_teacher
    assert "stage" in d.status and d.status["stage"] is None  # the merge patch removes WaitingForTeacher
    assert cond(d, "TeacherReady")["status"] == "True"
    assert d.status["teacher"]["state"] == "Ready" and d.status["teacher"]["readyReplicas"] == 1
    assert [e.reason for e in d.events] == ["TeacherReady"]


def test_a_teacher_that_never_becomes_ready_fails_the_job_after_the_pending_timeout() -> None:
    waiting = settle({}, decide(served()))
    view = teacher_view(0, "j-teacher-x: ImagePullBackOff: no such image")
    d = decide(served(waiting, teacher=view, now=NOW + timedelta(seconds=59)))
    assert d.phase == "Pending" and d.requeue_after is not None and d.requeue_after <= 1.5
    d = decide(served(waiting, teacher=view, now=NOW + timedelta(seconds=60)))
    assert d.phase == "Failed" and d.create_attempt is None
    failed = cond(d, "Failed")
    assert failed["reason"] == "TeacherNotReady"
    assert "j-teacher not ready after 60s: 0/2 replicas ready; j-teacher-x: ImagePullBackOff" in failed["message"]
    warnings = [e for e in d.events if e.type == "Warning"]
    assert [e.reason for e in warnings] == ["Failed", "TeacherNotReady"]
    assert d.delete_teacher and not d.ensure_teacher
    assert d.status["teacher"]["state"] == "Stopped" and cond(d, "TeacherReady")["reason"] == "TeacherStopped"


def test_a_missing_teacher_deployment_also_times_out() -> None:
    waiting = settle({}, decide(served()))
    d = decide(served(waiting, now=NOW + timedelta(seconds=61)))
    assert d.phase == "Failed" and "its Deployment does not exist" in cond(d, "Failed")["message"]
    assert not d.delete_teacher  # nothing to delete


def test_a_teacher_lost_while_the_gang_runs_restarts_nothing() -> None:
    status = running(conditions=[{"type": "TeacherReady", "status": "True", "reason": "TeacherAvailable",
                                  "lastTransitionTime": fmt_time(NOW - timedelta(hours=1))}])  # fmt: skip
    d = decide(served(status, [pod(0), pod(1)], teacher=teacher_view(0, "j-teacher-y: not ready (readiness probe)")))
    assert d.phase == "Running" and not d.delete_pods and d.create_attempt is None and "restarts" not in d.status
    assert d.ensure_teacher and not d.delete_teacher
    assert cond(d, "TeacherReady")["reason"] == "TeacherUnavailable"
    assert d.status["teacher"]["state"] == "Unavailable"
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "TeacherUnavailable")]
    # Long after, the gang still runs: the trainer's client decides how long it waits.
    later = settle(status, d)
    d = decide(served(later, [pod(0), pod(1)], teacher=teacher_view(0), now=NOW + timedelta(hours=2)))
    assert d.phase == "Running" and not d.delete_pods and not d.events
    # Back: Ready again, with an Event.
    d = decide(served(later, [pod(0), pod(1)], teacher=teacher_view(2), now=NOW + timedelta(hours=2)))
    assert d.status["teacher"]["state"] == "Ready" and [e.reason for e in d.events] == ["TeacherReady"]


def test_a_gang_restart_waits_for_the_teacher_again() -> None:
    since = fmt_time(NOW - timedelta(seconds=30))
    status = {"phase": "Restarting", "restarts": 1, "evictions": 0, "conditions": [
        {"type": "Restarting", "status": "True", "reason": "NCCL_TIMEOUT", "lastTransitionTime": since},
        {"type": "TeacherReady", "status": "False", "reason": "TeacherUnavailable", "lastTransitionTime": since},
    ]}  # fmt: skip
    d = decide(served(status, teacher=teacher_view(0)))
    assert d.phase == "Pending" and d.create_attempt is None and d.status["stage"] == "WaitingForTeacher"
    d = decide(served(status, teacher=teacher_view(1)))
    assert d.phase == "Pending" and d.create_attempt == 1


def test_a_partly_created_gang_is_completed_even_if_the_teacher_went_away() -> None:
    d = decide(served({"phase": "Pending", "restarts": 0, "evictions": 0}, [pod(0)], teacher=teacher_view(0)))
    assert d.create_attempt == 0


@pytest.mark.parametrize(
    "status,pods,spec",
    [
        ({"phase": "Running", "restarts": 0, "evictions": 0}, [pod(0, "Succeeded", terminated=success(0.95)), pod(1)],
         {}),  # training over: Deploying
        ({"phase": "Running", "restarts": 0, "evictions": 0}, [pod(0, "Succeeded", terminated=success(0.95)), pod(1)],
         {"serving": {"enabled": False}}),  # Succeeded
        ({"phase": "Running", "restarts": 2, "evictions": 0},
         [pod(0, "Failed", 2, terminated=ended()), pod(1, attempt=2)], {}),
        ({"phase": "Running", "restarts": 0, "evictions": 0}, [pod(0), pod(1)], {"suspend": True}),
        ({"phase": "Succeeded", "restarts": 0, "evictions": 0, "completionTime": fmt_time(NOW)}, [],
         {"serving": {"enabled": False}, "ttlSecondsAfterFinished": 0}),
    ],
    ids=["deploying", "succeeded", "failed", "suspended", "ttl"],
)  # fmt: skip
def test_the_teacher_is_deleted_whenever_the_job_stops_training(
    status: dict[str, Any], pods: list[PodView], spec: dict[str, Any]
) -> None:
    status = {**status, "conditions": [{"type": "TeacherReady", "status": "True", "reason": "TeacherAvailable",
                                        "lastTransitionTime": fmt_time(NOW)}]}  # fmt: skip
    d = decide(served(status, pods, teacher=teacher_view(2), **spec))
    assert d.phase in ("Deploying", "Succeeded", "Failed", "Suspended")
    assert d.delete_teacher and not d.ensure_teacher
    assert d.status["teacher"]["state"] == "Stopped"
    assert cond(d, "TeacherReady")["reason"] == "TeacherStopped"
    assert "TeacherStopped" in [e.reason for e in d.events]
    # Once it is gone, later passes neither delete nor write anything about it.
    after = settle(status, d)
    again = decide(served(after, [], **spec))
    assert not again.delete_teacher and not again.ensure_teacher
    assert "teacher" not in again.status and "TeacherStopped" not in [e.reason for e in again.events]


def test_resuming_a_suspended_job_starts_a_fresh_teacher_clock() -> None:
    long_ago = fmt_time(NOW - timedelta(hours=5))
    status = {"phase": "Suspended", "restarts": 0, "evictions": 0, "conditions": [
        {"type": "Suspended", "status": "True", "reason": "SuspendRequested", "lastTransitionTime": long_ago},
        {"type": "TeacherReady", "status": "False", "reason": "TeacherStopped", "lastTransitionTime": long_ago},
    ]}  # fmt: skip
    d = decide(served(status))
    assert d.phase == "Pending" and d.ensure_teacher and d.create_attempt is None
    assert cond(d, "TeacherReady")["reason"] == "TeacherStarting"
    assert cond(d, "TeacherReady")["lastTransitionTime"] == fmt_time(NOW)


def test_an_endpoint_teacher_creates_nothing_and_the_gang_starts_at_once() -> None:
    d = decide(observe(teacher={"endpoint": "http://a-teacher:8080"}, student={"model": "pvc://m/s"}))
    assert d.create_attempt == 0 and not d.ensure_teacher and not d.delete_teacher
    assert d.status["teacher"] == {"state": "External", "url": "http://a-teacher:8080"}
    assert not any(c["type"] == "TeacherReady" for c in d.status["conditions"])


def test_a_job_without_a_remote_teacher_has_no_teacher_status() -> None:
    d = decide(observe())
    assert "teacher" not in d.status and not d.ensure_teacher and not d.delete_teacher


# -- fenced restarts ----------------------------------------------------------------------------


def test_status_attempt_moves_with_the_restart_that_starts_it() -> None:
    assert decide(observe()).status["attempt"] == 0
    t = termination_for(ExitCode.PEER_LOST, "nccl timeout")
    d = decide(observe(running(attempt=0), [pod(0), pod(1, "Failed", terminated=ended(t))]))
    # The same patch counts the restart and raises the attempt: the old gang is fenced before its
    # successor exists.
    assert d.status["restarts"] == 1 and d.status["attempt"] == 1
    d = decide(
        observe(
            running(restarts=1, attempt=1),
            [pod(0, attempt=1), pod(1, "Failed", attempt=1, disruption="Evicted")],
        )
    )
    assert d.status["evictions"] == 1 and d.status["attempt"] == 2


def test_a_result_from_an_older_gang_attempt_is_never_read() -> None:
    # Attempt 0's rank 0 (a partitioned node that came back) finished with a result; the job runs
    # attempt 1. The stale pod is deleted and its result ignored: no success, no metrics.
    status = running(restarts=1, attempt=1)
    d = decide(observe(status, [pod(0, "Succeeded", attempt=0, terminated=success(0.99)), pod(1, attempt=1)]))
    assert d.phase == "Running" and "metrics" not in d.status
    assert d.delete_pods == ["j-worker-0"] and not d.deploy
    assert not any(c.get("type") == "Complete" for c in d.status.get("conditions", []))


def test_goodput_is_productive_seconds_over_wall_seconds_since_start() -> None:
    start = NOW - timedelta(seconds=200)
    status = running(startTime=fmt_time(start), productiveSeconds=150.0, attempt=0)
    d = decide(observe(status, [pod(0), pod(1)]))
    assert d.status["goodput"] == 0.75
    # Unchanged to two decimals: nothing is written.
    again = decide(observe({**status, "goodput": 0.75}, [pod(0), pod(1)], now=NOW + timedelta(seconds=1)))
    assert "goodput" not in again.status
    # Finished: the wall clock stops at completionTime.
    done = {**status, "phase": "Succeeded", "completionTime": fmt_time(start + timedelta(seconds=300))}
    assert decide(observe(done, [], serving={"enabled": False}, now=NOW + timedelta(hours=1))).status[
        "goodput"
    ] == pytest.approx(0.5)
    # No productive seconds reported yet: no goodput.
    assert "goodput" not in decide(observe(running(attempt=0), [pod(0), pod(1)])).status


def test_a_recorded_departure_classifies_a_missing_worker_after_a_restart() -> None:
    from dataclasses import replace as dc_replace

    from kdistill.operator.departures import departed_from_status, departure_record

    evicted = pod(1, "Failed", attempt=1, disruption="EvictionByEvictionAPI", terminated=ended(code=137))
    record = departure_record(evicted)
    assert record == {
        "attempt": 1,
        "reason": "EvictionByEvictionAPI",
        "phase": "Failed",
        "exitCode": 137,
        "message": "",
    }
    assert departure_record(pod(1, "Failed", attempt=1, terminated=ended())) is None  # not disrupted: not kept
    status = running(restarts=1, attempt=1, departedWorkers={"1": record})
    departed = departed_from_status(status, {1: "j-worker-1"})
    assert departed["j-worker-1"].evicted and departed["j-worker-1"].attempt == 1
    obs = dc_replace(observe(status, [pod(0, attempt=1)]), departed=departed)
    d = decide(obs)
    assert d.phase == "Restarting" and d.status["evictions"] == 1 and "restarts" not in d.status
    # A record of an older attempt says nothing about the current gang's missing worker.
    stale = departed_from_status(running(departedWorkers={"1": {**record, "attempt": 0}}), {1: "j-worker-1"})
    d = decide(dc_replace(observe(status, [pod(0, attempt=1)]), departed=stale))
    assert d.status["restarts"] == 2 and "evictions" not in d.status
