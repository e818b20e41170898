"""The served teacher's life on the real control plane: the real operator (a subprocess), the real
apiserver, scheduler and controllers (the Deployment and ReplicaSet controllers make the teacher's
pods), kwok GPU nodes playing the kubelet.

kwok makes a scheduled pod Ready at once, so the tests hold a teacher back by asking for more GPUs
per replica than any node has: it stays Pending (unschedulable) until a test adds a node big
enough. A failing readiness probe is played by patching the pod's Ready condition, as the kubelet
would.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from kubernetes import client

from tests.cluster import Cluster, kwok
from tests.operator import cluster_helpers as h
from tests.operator.cluster_helpers import Jobs, OperatorProcess, eventually, job_body

pytestmark = pytest.mark.cluster
lease_namespace, claims, env = h.lease_namespace, h.claims, h.env

TEACHER_URL_ENV = "KDISTILL_TEACHER_URL"
# More than any node of the test cluster has (4 GPU nodes with 4 GPUs each): the teacher stays Pending.
BIG_TEACHER_GPUS = 8


def served_job(name: str, *, gpus_per_replica: int = 1, pending_timeout: int = 600, **spec: Any) -> dict[str, Any]:
    body = job_body(name, nodes=2, gpus=1, serving=False, **spec)
    body["spec"]["teacher"] = {"model": "pvc://models/teacher", "serve": {"enabled": True, "replicas": 1,
                               "gpusPerReplica": gpus_per_replica, "batching": {"maxBatchSize": 16}}}  # fmt: skip
    body["spec"]["failurePolicy"]["pendingTimeoutSeconds"] = pending_timeout
    return body


def workers(jobs: Jobs, name: str) -> list[client.V1Pod]:
    selector = f"kdistill.io/job={name},kdistill.io/role=worker"
    return sorted(jobs.core.list_namespaced_pod(jobs.ns, label_selector=selector).items, key=lambda p: p.metadata.name)


def teacher_pods(jobs: Jobs, name: str) -> list[client.V1Pod]:
    selector = f"kdistill.io/job={name},kdistill.io/role=teacher"
    return [
        p
        for p in jobs.core.list_namespaced_pod(jobs.ns, label_selector=selector).items
        if p.metadata.deletion_timestamp is None
    ]


def deployment(jobs: Jobs, name: str) -> client.V1Deployment | None:
    try:
        return jobs.apps.read_namespaced_deployment(name, jobs.ns)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def service(jobs: Jobs, name: str) -> client.V1Service | None:
    try:
        return jobs.core.read_namespaced_service(name, jobs.ns)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def available(jobs: Jobs, name: str) -> bool:
    dep = deployment(jobs, name)
    return dep is not None and (dep.status.available_replicas or 0) >= 1


def env_of(pod: client.V1Pod) -> dict[str, str | None]:
    return {e.name: e.value for e in pod.spec.containers[0].env or []}


def teacher_status(jobs: Jobs, name: str) -> dict[str, Any]:
    return jobs.status(name).get("teacher") or {}


@contextlib.contextmanager
def big_gpu_node(cluster: Cluster) -> Iterator[str]:
    """A fake node with enough GPUs for BIG_TEACHER_GPUS, removed afterwards."""
    name = f"kwok-big-{uuid.uuid4().hex[:4]}"
    core = cluster.core()
    kwok.create_nodes(core, [kwok.NodeSpec(name, gpus=BIG_TEACHER_GPUS)])
    try:
        kwok.wait_nodes_ready(core, [name])
        yield name
    finally:
        with contextlib.suppress(client.ApiException):
            core.delete_node(name)


def set_ready(jobs: Jobs, pod: client.V1Pod, ready: bool) -> None:
    """What the kubelet writes when the readiness probe starts failing (or passes again)."""
    value = "True" if ready else "False"
    conditions = [{"type": t, "status": value} for t in ("Ready", "ContainersReady")]
    jobs.core.patch_namespaced_pod_status(pod.metadata.name, jobs.ns, {"status": {"conditions": conditions}})


def test_teacher_first_workers_gated_on_readiness_teacher_loss_without_gang_restart_deleted_at_the_end(
    cluster: Cluster, env: tuple[Jobs, OperatorProcess]
) -> None:
    jobs, op = env
    ns, name = jobs.ns, "gated"
    teacher = f"{name}-teacher"
    jobs.create(served_job(name, gpus_per_replica=BIG_TEACHER_GPUS))

    # 1. The teacher's Deployment and Service come first, owned by the job; no worker pod.
    dep = eventually(lambda: deployment(jobs, teacher), "the teacher Deployment", 60)
    assert dep.metadata.owner_references[0].kind == "DistillationJob"
    assert dep.metadata.owner_references[0].name == name
    (c,) = dep.spec.template.spec.containers
    assert c.command[:3] == ["kdistill", "serve", "/mnt/pvc/models/teacher"]
    assert c.command[c.command.index("--max-batch-size") + 1] == "16"
    assert c.resources.requests["nvidia.com/gpu"] == str(BIG_TEACHER_GPUS)
    assert c.readiness_probe.http_get.path == "/v2/health/ready"
    assert c.security_context.read_only_root_filesystem and c.security_context.run_as_non_root
    assert c.image == "kdistill/trainer:test"
    svc = eventually(lambda: service(jobs, teacher), "the teacher Service", 30)
    assert svc.spec.ports[0].port == 8080 and svc.spec.selector == dep.spec.selector.match_labels
    assert svc.metadata.owner_references[0].name == name
    status = eventually(
        lambda: (s := jobs.status(name)).get("stage") == "WaitingForTeacher" and s, "stage WaitingForTeacher", 30
    )
    assert status["phase"] == "Pending"
    assert status["teacher"] == {"state": "Starting", "url": f"http://{teacher}.{ns}.svc:8080", "replicas": 1,
                                 "readyReplicas": 0}  # fmt: skip
    assert jobs.condition(name, "TeacherReady")["reason"] == "TeacherStarting"
    row = cluster.kubectl("-n", ns, "get", "dj", name, "--no-headers").stdout
    assert "WaitingForTeacher" in row and "Pending" in row, row
    # The teacher pod exists and is unschedulable; the workers wait (several operator passes).
    eventually(lambda: teacher_pods(jobs, name), "a teacher pod", 30)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        assert not workers(jobs, name), "a worker pod before the teacher was ready"
        time.sleep(0.5)
    assert "unschedulable" in jobs.condition(name, "TeacherReady")["message"]

    # 2. A node big enough appears: the teacher is scheduled and Ready, then the workers start.
    with big_gpu_node(cluster) as node:
        eventually(lambda: available(jobs, teacher), "the teacher Deployment available", 60)
        pods = jobs.wait_running_gang(name, 2, attempt=0, timeout=60)
        (tpod,) = teacher_pods(jobs, name)
        assert tpod.spec.node_name == node
        ready_at = next(c.last_transition_time for c in tpod.status.conditions if c.type == "Ready")
        for pod in pods:
            assert env_of(pod)[TEACHER_URL_ENV] == f"http://{teacher}.{ns}.svc:8080"
            created: datetime = pod.metadata.creation_timestamp
            assert created >= ready_at, (created, ready_at)
        status = jobs.wait_phase(name, "Running")
        assert "stage" not in status, status  # WaitingForTeacher is gone; the trainer writes its own
        assert status["teacher"]["state"] == "Ready" and status["teacher"]["readyReplicas"] == 1
        assert jobs.condition(name, "TeacherReady")["status"] == "True"
        gang = {p.metadata.name: p.metadata.uid for p in pods}

        # 3. The teacher's readiness probe fails: Unavailable, a Warning, and the gang keeps running.
        set_ready(jobs, tpod, False)
        eventually(lambda: teacher_status(jobs, name).get("state") == "Unavailable", "teacher Unavailable", 30)
        assert "TeacherUnavailable" in [e.reason for e in jobs.events(name)]
        # 4. Its pod is deleted: the Deployment replaces it; no gang restart.
        jobs.core.delete_namespaced_pod(tpod.metadata.name, ns, grace_period_seconds=0)
        eventually(
            lambda: (
                [p for p in teacher_pods(jobs, name) if p.metadata.name != tpod.metadata.name]
                and available(jobs, teacher)
            ),
            "a replacement teacher pod, ready",
            60,
        )
        eventually(lambda: teacher_status(jobs, name).get("state") == "Ready", "teacher Ready again", 30)
        status = jobs.status(name)
        assert status["phase"] == "Running" and status["restarts"] == 0, status
        assert {p.metadata.name: p.metadata.uid for p in jobs.live_pods(name) if p.metadata.labels.get(
            "kdistill.io/role") == "worker"} == gang  # fmt: skip
        assert "GangRestart" not in [e.reason for e in jobs.events(name)]

        # 5. Training succeeds: the teacher's Deployment and Service are deleted, the job stays.
        h.succeed_gang(cluster, ns, pods, h.success_message(0.95))
        jobs.wait_phase(name, "Succeeded", 60)
        eventually(
            lambda: (
                deployment(jobs, teacher) is None and service(jobs, teacher) is None and not teacher_pods(jobs, name)
            ),
            "the teacher's objects deleted",
            60,
        )
        assert teacher_status(jobs, name)["state"] == "Stopped"
        assert jobs.condition(name, "TeacherReady")["reason"] == "TeacherStopped"
        assert "TeacherStopped" in [e.reason for e in jobs.events(name)]
        assert jobs.exists(name)
    assert op.alive()
    # Many passes looked at the teacher; only the first wrote it (the spec-hash annotation).
    applied = [
        line
        for line in op.log_lines()
        if line.get("job") == f"{ns}/{name}" and line.get("message", "").startswith("applied the teacher")
    ]
    assert len(applied) == 1, applied


def test_two_students_share_one_teacher_through_its_service(
    cluster: Cluster, env: tuple[Jobs, OperatorProcess]
) -> None:
    jobs, _ = env
    ns = jobs.ns
    jobs.create(served_job("owner", gpus_per_replica=0))
    eventually(lambda: available(jobs, "owner-teacher"), "owner's teacher available", 60)
    # The second student names the first job's teacher Service: it creates no teacher of its own.
    shared = job_body("sharer", nodes=1, gpus=1, serving=False)
    shared["spec"]["teacher"] = {"endpoint": "http://owner-teacher:8080"}
    shared["spec"]["student"] = {"model": "pvc://models/student"}
    jobs.create(shared)
    (pod,) = jobs.wait_running_gang("sharer", 1, attempt=0)
    assert env_of(pod)[TEACHER_URL_ENV] == "http://owner-teacher:8080"
    status = jobs.wait_phase("sharer", "Running")
    assert status["teacher"] == {"state": "External", "url": "http://owner-teacher:8080"}
    assert deployment(jobs, "sharer-teacher") is None and service(jobs, "sharer-teacher") is None
    assert [d.metadata.name for d in jobs.apps.list_namespaced_deployment(ns).items] == ["owner-teacher"]
    # The owner's teacher Service has its pod as a ready endpoint: what both students reach.
    discovery = client.DiscoveryV1Api(cluster.api_client())

    def ready_endpoints() -> list[Any]:
        slices = discovery.list_namespaced_endpoint_slice(ns, label_selector="kubernetes.io/service-name=owner-teacher")
        return [e for s in slices.items for e in s.endpoints or [] if e.conditions and e.conditions.ready]

    (endpoint,) = eventually(ready_endpoints, "a ready endpoint behind owner-teacher", 60)
    assert endpoint.target_ref.name == teacher_pods(jobs, "owner")[0].metadata.name
    # The owner's workers get the same Service, by its full name.
    (owner_pod, _) = jobs.wait_running_gang("owner", 2, attempt=0)
    assert env_of(owner_pod)[TEACHER_URL_ENV] == f"http://owner-teacher.{ns}.svc:8080"


def test_a_teacher_that_never_becomes_ready_fails_the_job_after_the_pending_timeout(
    cluster: Cluster, env: tuple[Jobs, OperatorProcess]
) -> None:
    jobs, _ = env
    name = "never"
    jobs.create(served_job(name, gpus_per_replica=BIG_TEACHER_GPUS, pending_timeout=6))
    eventually(lambda: teacher_pods(jobs, name), "the teacher pod", 30)
    status = jobs.wait_phase(name, "Failed", 60)
    failed = jobs.condition(name, "Failed")
    assert failed["reason"] == "TeacherNotReady", failed
    assert f"{name}-teacher not ready after 6s" in failed["message"] and "unschedulable" in failed["message"]
    events = [e for e in jobs.events(name) if e.reason == "TeacherNotReady"]
    assert events and events[0].type == "Warning"
    assert not workers(jobs, name), "workers were started without a ready teacher"
    eventually(
        lambda: deployment(jobs, f"{name}-teacher") is None and service(jobs, f"{name}-teacher") is None,
        "the teacher's objects deleted after the failure",
        30,
    )
    assert status["teacher"]["state"] in ("Starting", "Stopped")
    assert teacher_status(jobs, name)["state"] == "Stopped"


def test_suspend_deletes_the_teacher_and_resume_brings_it_back_first(
    cluster: Cluster, env: tuple[Jobs, OperatorProcess]
) -> None:
    jobs, _ = env
    name = "pause"
    jobs.create(served_job(name, gpus_per_replica=0))
    jobs.wait_running_gang(name, 2, attempt=0, timeout=60)
    jobs.patch_spec(name, {"suspend": True})
    jobs.wait_phase(name, "Suspended")
    eventually(
        lambda: deployment(jobs, f"{name}-teacher") is None and not workers(jobs, name),
        "teacher and workers deleted while suspended",
        60,
    )
    assert teacher_status(jobs, name)["state"] == "Stopped"
    jobs.patch_spec(name, {"suspend": False})
    pods = jobs.wait_running_gang(name, 2, attempt=1, timeout=60)  # a resume is a new gang attempt
    dep = deployment(jobs, f"{name}-teacher")
    assert dep is not None and (dep.status.available_replicas or 0) >= 1
    assert all(p.metadata.creation_timestamp >= dep.metadata.creation_timestamp for p in pods)
    eventually(lambda: teacher_status(jobs, name).get("state") == "Ready", "teacher Ready after resume", 30)
