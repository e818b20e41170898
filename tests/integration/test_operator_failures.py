"""Failure paths of the real operator on the real control plane: restarts used up, permanent
exit codes, unschedulable gangs, evictions, the quality gate with a shared Deployment,
suspend/resume and TTL."""

from __future__ import annotations

import pytest
from kubernetes import client

from kdistill.api.failures import ExitCode, termination_for
from tests.cluster import Cluster
from tests.operator import cluster_helpers as h
from tests.operator.cluster_helpers import Jobs, OperatorProcess, eventually, job_body, success_message

pytestmark = pytest.mark.cluster
lease_namespace, claims, env = h.lease_namespace, h.claims, h.env
Env = tuple[Jobs, OperatorProcess]


def _fail_condition(jobs: Jobs, name: str) -> dict[str, str]:
    cond = jobs.condition(name, "Failed")
    assert cond is not None and cond["status"] == "True", jobs.status(name)
    return cond


def test_max_restarts_exhausted(cluster: Cluster, env: Env) -> None:
    jobs, _ = env
    name = "exhaust"
    jobs.create(job_body(name, nodes=1, gpus=1, failurePolicy={"maxRestarts": 1, "backoffSeconds": 1}))
    retry = termination_for(ExitCode.PEER_LOST, "gloo timeout").to_json()
    pod = jobs.wait_running_gang(name, 1, attempt=0)[0]
    cluster.fail_pod(jobs.ns, pod.metadata.name, exit_code=1, message=retry)
    pod = jobs.wait_running_gang(name, 1, attempt=1, timeout=60)[0]
    assert jobs.status(name)["restarts"] == 1
    cluster.fail_pod(jobs.ns, pod.metadata.name, exit_code=1, message=retry)
    status = jobs.wait_phase(name, "Failed", 60)
    assert status["restarts"] == 1 and status["completionTime"]
    cond = _fail_condition(jobs, name)
    assert cond["reason"] == "MaxRestartsExceeded" and "PEER_LOST" in cond["message"]
    assert {"GangRestart", "MaxRestartsExceeded", "Failed"} <= {e.reason for e in jobs.events(name)}
    assert not jobs.live_pods(name)


def test_permanent_exit_code_fails_at_once(cluster: Cluster, env: Env) -> None:
    jobs, _ = env
    jobs.create(job_body("bad-data", nodes=2, gpus=1))
    jobs.create(job_body("bad-spec", nodes=1, gpus=1))
    pods = jobs.wait_running_gang("bad-data", 2, attempt=0)
    cluster.fail_pod(
        jobs.ns,
        pods[1].metadata.name,
        exit_code=int(ExitCode.BAD_DATA),
        message=termination_for(ExitCode.BAD_DATA, "train.jsonl: 40% bad lines").to_json(),
    )
    # No termination message at all: the exit code alone classifies it.
    pod = jobs.wait_running_gang("bad-spec", 1, attempt=0)[0]
    cluster.fail_pod(jobs.ns, pod.metadata.name, exit_code=int(ExitCode.BAD_SPEC))
    for name, reason in (("bad-data", "BAD_DATA"), ("bad-spec", "BAD_SPEC")):
        status = jobs.wait_phase(name, "Failed", 60)
        assert status["restarts"] == 0
        assert _fail_condition(jobs, name)["reason"] == reason
    assert "40% bad lines" in _fail_condition(jobs, "bad-data")["message"]
    # the rank that still ran was stopped; no new gang attempt was created
    eventually(lambda: not jobs.live_pods("bad-data"), "other rank deleted", 30)
    assert all(p.metadata.labels["kdistill.io/restart-generation"] == "0" for p in jobs.pods("bad-data"))


def test_unschedulable_gang_fails_after_pending_timeout(cluster: Cluster, env: Env) -> None:
    jobs, _ = env
    name = "too-big"
    # 8 GPUs per pod; the fake nodes have 4.
    jobs.create(job_body(name, nodes=1, gpus=8, failurePolicy={"pendingTimeoutSeconds": 3}))
    status = jobs.wait_phase(name, "Failed", 60)
    cond = _fail_condition(jobs, name)
    assert cond["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in cond["message"]
    assert status["restarts"] == 0
    eventually(lambda: not jobs.pods(name), "pending pods deleted", 30)


def test_eviction_is_counted_apart(cluster: Cluster, env: Env) -> None:
    jobs, _ = env
    name = "evicted"
    jobs.create(job_body(name, nodes=2, gpus=1))
    pods = jobs.wait_running_gang(name, 2, attempt=0)
    jobs.core.create_namespaced_pod_eviction(
        pods[0].metadata.name,
        jobs.ns,
        client.V1Eviction(metadata=client.V1ObjectMeta(name=pods[0].metadata.name, namespace=jobs.ns)),
    )
    jobs.wait_running_gang(name, 2, attempt=1, timeout=180)  # generous: a loaded 2-core API server
    status = jobs.wait_phase(name, "Running")
    assert status["evictions"] == 1 and status["restarts"] == 0 and status["attempt"] == 1
    # The pod watch recorded the eviction in the API (an operator restart would still see it).
    index = pods[0].metadata.labels["kdistill.io/replica-index"]
    departed = status["departedWorkers"][index]
    assert departed["attempt"] == 0 and departed["reason"] in ("EvictionByEvictionAPI", "Evicted")


def test_quality_gate_and_shared_serving(cluster: Cluster, env: Env) -> None:
    jobs, _ = env
    ns = jobs.ns
    shared = {"enabled": True, "name": "intent", "replicas": 1, "qualityGate": {"minRetention": 0.9}}

    def finish(name: str, retention: float) -> None:
        body = job_body(name, nodes=1, gpus=1)
        body["spec"]["serving"] = shared
        jobs.create(body)
        pod = jobs.wait_running_gang(name, 1, attempt=0)[0]
        cluster.succeed_pod(ns, pod.metadata.name, message=success_message(retention))

    def deployment() -> client.V1Deployment:
        return jobs.apps.read_namespaced_deployment("intent", ns)

    finish("first", 0.97)
    jobs.wait_phase("first", "Succeeded", 90)
    before = deployment()
    assert before.metadata.annotations["kdistill.io/model-path"] == f"/mnt/checkpoints/{ns}/first/student-int8"

    finish("worse", 0.5)
    jobs.wait_phase("worse", "Failed", 60)
    cond = _fail_condition(jobs, "worse")
    assert cond["reason"] == "QualityGateFailed" and "0.5000" in cond["message"]
    assert jobs.status("worse")["metrics"]["retention"] == pytest.approx(0.5)
    after = deployment()
    assert after.metadata.resource_version == before.metadata.resource_version  # untouched

    finish("better", 0.95)
    status = jobs.wait_phase("better", "Succeeded", 90)
    assert status["endpoint"] == f"http://intent.{ns}.svc:8080"
    rolled = deployment()
    ann = rolled.metadata.annotations
    assert ann["kdistill.io/model-path"] == f"/mnt/checkpoints/{ns}/better/student-int8"
    assert ann["kdistill.io/previous-model-path"] == f"/mnt/checkpoints/{ns}/first/student-int8"
    owners = {ref.name for ref in rolled.metadata.owner_references}
    assert owners == {"first", "better"}
    # the earlier job no longer drives the Deployment: changing its serving spec changes nothing
    jobs.patch_spec("first", {"serving": shared | {"replicas": 4}})
    jobs.wait_phase("first", "Succeeded")
    eventually(
        lambda: jobs.get("first")["status"].get("observedGeneration") == jobs.get("first")["metadata"]["generation"],
        "first re-reconciled",
        30,
    )
    assert deployment().spec.replicas == 1
    # deleting one owner keeps the shared Deployment; deleting the last removes it
    jobs.delete("better")
    eventually(lambda: not jobs.exists("better"), "better deleted", 30)
    assert deployment().metadata.name == "intent"
    jobs.delete("first")
    jobs.delete("worse")

    def deployment_gone() -> bool:
        try:
            deployment()
            return False
        except client.ApiException as exc:
            return exc.status == 404

    eventually(deployment_gone, "shared Deployment removed with its last owner", 60)


def test_suspend_and_resume(cluster: Cluster, env: Env) -> None:
    jobs, _ = env
    name = "pausable"
    jobs.create(job_body(name, nodes=2, gpus=1))
    jobs.wait_running_gang(name, 2, attempt=0)
    jobs.wait_phase(name, "Running")
    jobs.patch_spec(name, {"suspend": True})
    status = jobs.wait_phase(name, "Suspended", 30)
    eventually(lambda: not jobs.pods(name), "pods deleted on suspend", 30)
    assert jobs.condition(name, "Suspended")["status"] == "True"
    # checkpoints and config stay
    assert jobs.core.read_namespaced_persistent_volume_claim("ckpt", jobs.ns).status.phase == "Bound"
    assert jobs.core.read_namespaced_config_map(f"{name}-config", jobs.ns)
    jobs.patch_spec(name, {"suspend": False})
    # A resume is a new gang attempt (the suspended gang's ranks are fenced out), not a restart.
    jobs.wait_running_gang(name, 2, attempt=1, timeout=60)
    status = jobs.wait_phase(name, "Running")
    assert status["restarts"] == 0 and status["evictions"] == 0
    assert status["resumes"] == 1 and status["attempt"] == 1
    assert jobs.condition(name, "Suspended")["status"] == "False"


def test_ttl_deletes_finished_job(cluster: Cluster, env: Env) -> None:
    jobs, _ = env
    jobs.create(job_body("short-lived", nodes=1, gpus=0, serving=False, ttlSecondsAfterFinished=2))
    jobs.create(job_body("served", nodes=1, gpus=1, ttlSecondsAfterFinished=2))
    for name in ("short-lived", "served"):
        pod = jobs.wait_running_gang(name, 1, attempt=0)[0]
        limits = pod.spec.containers[0].resources.limits or {}
        assert ("nvidia.com/gpu" in limits) == (name == "served")
        cluster.succeed_pod(jobs.ns, pod.metadata.name, message=success_message(0.99))
    eventually(lambda: not jobs.exists("short-lived"), "job without serving deleted by TTL", 60)
    # with serving, only the training objects go; the job and its Deployment stay
    jobs.wait_phase("served", "Succeeded", 90)
    eventually(lambda: jobs.condition("served", "TrainingObjectsDeleted"), "served TTL cleanup", 30)

    def training_objects_gone() -> bool:
        cms = [c.metadata.name for c in jobs.core.list_namespaced_config_map(jobs.ns).items]
        svcs = [s.metadata.name for s in jobs.core.list_namespaced_service(jobs.ns).items]
        return "served-config" not in cms and "served-workers" not in svcs

    eventually(training_objects_gone, "ConfigMap and rendezvous Service deleted", 30)
    assert jobs.apps.read_namespaced_deployment("served-serving", jobs.ns).status.available_replicas == 1
