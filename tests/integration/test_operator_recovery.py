"""Operator crashes (SIGKILL) at several points of a job's life lose and duplicate nothing;
two replicas never both act; a second reconcile of a steady state writes nothing. The
operator runs here as a ServiceAccount bound to exactly kdistill.operator.rbac's rules."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kdistill.api.failures import ExitCode, termination_for
from kdistill.operator import rbac as rules
from tests.cluster import Cluster
from tests.operator import cluster_helpers as h
from tests.operator.cluster_helpers import Jobs, OperatorProcess, eventually, job_body, success_message

pytestmark = pytest.mark.cluster
lease_namespace, claims = h.lease_namespace, h.claims


@pytest.fixture
def operator_kubeconfig(cluster: Cluster, claims: str, lease_namespace: str) -> Iterator[Path]:
    """A kubeconfig for a ServiceAccount holding the chart's rules (operator/rbac.py) and its leader Role."""
    ns = claims
    rbac = cluster.api_client()
    from kubernetes import client

    core, authz = client.CoreV1Api(rbac), client.RbacAuthorizationV1Api(rbac)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "kdistill-operator"}})
    name = f"kdistill-operator-{ns}"
    # The operator watches one namespace: kopf then also observes namespaces (NAMESPACED_MODE).
    held = rules.NAMESPACED.rules + rules.CLUSTER.rules + rules.NAMESPACED_MODE.rules
    authz.create_cluster_role({"metadata": {"name": name}, "rules": held})
    authz.create_cluster_role_binding(
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": "kdistill-operator", "namespace": ns}],
        }
    )
    lease = f"op-{ns}"  # h.operator_for's --lease-name
    leader = [{**r, "resourceNames": [lease]} if r.get("resourceNames") else r for r in rules.LEADER.rules]
    authz.create_namespaced_role(lease_namespace, {"metadata": {"name": name}, "rules": leader})
    authz.create_namespaced_role_binding(
        lease_namespace,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": "kdistill-operator", "namespace": ns}],
        },
    )
    yield cluster.serviceaccount_kubeconfig(ns, "kdistill-operator")
    authz.delete_cluster_role_binding(name)
    authz.delete_cluster_role(name)


class Ops:
    """Starts operators (as the restricted ServiceAccount) and keeps them for teardown."""

    def __init__(self, cluster: Cluster, ns: str, lease_ns: str, kubeconfig: Path, tmp: Path) -> None:
        self.cluster, self.ns, self.lease_ns, self.kubeconfig, self.tmp = cluster, ns, lease_ns, kubeconfig, tmp
        self.all: list[OperatorProcess] = []

    def start(self) -> OperatorProcess:
        op = h.operator_for(self.cluster, self.ns, self.lease_ns, self.tmp / f"operator-{len(self.all)}.log")
        op.argv[op.argv.index("--kubeconfig") + 1] = str(self.kubeconfig)
        self.all.append(op.start())
        return op

    def stop_all(self) -> None:
        for op in self.all:
            op.stop()


@pytest.fixture
def ops(
    cluster: Cluster, claims: str, lease_namespace: str, operator_kubeconfig: Path, tmp_path: Path
) -> Iterator[Ops]:
    o = Ops(cluster, claims, lease_namespace, operator_kubeconfig, tmp_path)
    yield o
    o.stop_all()
    for op in o.all:
        print(op.log_path.name, op.log_path.read_text()[-2000:])
        forbidden = [
            line
            for line in op.log_lines()
            if "HTTP 403" in line.get("message", "")
            or "forbidden" in line.get("message", "").lower()
            or "HTTP 403" in line.get("error", "")
        ]
        assert not forbidden, f"the operator lacked a permission: {forbidden[:3]}"


def versions(jobs: Jobs, name: str) -> dict[str, Any]:
    """resourceVersions of the job and everything it owns: equal means nothing was written."""
    out: dict[str, Any] = {"job": jobs.get(name)["metadata"]["resourceVersion"]}
    label = f"kdistill.io/job={name}"
    for p in jobs.core.list_namespaced_pod(jobs.ns, label_selector=label).items:
        out[f"pod/{p.metadata.name}"] = p.metadata.resource_version
    for c in jobs.core.list_namespaced_config_map(jobs.ns, label_selector=label).items:
        out[f"cm/{c.metadata.name}"] = c.metadata.resource_version
    for s in jobs.core.list_namespaced_service(jobs.ns, label_selector=label).items:
        out[f"svc/{s.metadata.name}"] = s.metadata.resource_version
    return out


def test_crash_recovery_at_several_points(cluster: Cluster, claims: str, ops: Ops) -> None:
    jobs = Jobs(cluster, claims)
    name = "survivor"
    retry = termination_for(ExitCode.PEER_LOST, "peer vanished").to_json()

    # (a) the job is created while no operator runs
    jobs.create(job_body(name, nodes=2, gpus=1, failurePolicy={"maxRestarts": 5, "backoffSeconds": 6}))
    first = ops.start()
    jobs.wait_running_gang(name, 2, attempt=0)
    jobs.wait_phase(name, "Running")

    # a steady state: further passes (resync every 5 s) write nothing at all
    before = versions(jobs, name)
    time.sleep(11)
    assert versions(jobs, name) == before

    # a second replica waits for the lease and does nothing meanwhile
    standby = ops.start()
    eventually(
        lambda: any("waiting for lease" in line.get("message", "") for line in standby.log_lines()),
        "standby waiting",
        30,
    )

    # (b) the leader is killed while Running; a worker fails while no operator acts
    first.kill()
    cluster.fail_pod(claims, f"{name}-worker-1", exit_code=1, message=retry)
    # the standby takes over once the lease expires and counts the failure exactly once
    eventually(lambda: jobs.status(name).get("restarts") == 1, "restart counted by the standby", 60)
    assert any("acquired lease" in line.get("message", "") for line in standby.log_lines())

    # (c) killed in the middle of the backoff
    jobs.wait_phase(name, "Restarting", 30)
    standby.kill()
    assert not jobs.live_pods(name) or all(
        p.metadata.labels["kdistill.io/restart-generation"] == "0" for p in jobs.live_pods(name)
    )
    third = ops.start()
    jobs.wait_running_gang(name, 2, attempt=1, timeout=60)
    status = jobs.wait_phase(name, "Running")
    assert status["restarts"] == 1
    assert len(jobs.pods(name)) == 2  # no duplicates, no leftovers of gang attempt 0

    # (d) killed while Deploying: the serving pods cannot schedule (too much CPU), so it stays there
    jobs.patch_spec(name, {"serving": {"resources": {"requests": {"cpu": "1000"}}}})
    cluster.succeed_pod(claims, f"{name}-worker-0", message=success_message(0.96))
    jobs.wait_phase(name, "Deploying", 30)
    third.kill()
    fourth = ops.start()
    eventually(lambda: len(jobs.apps.list_namespaced_deployment(claims).items) == 1, "the Deployment", 60)
    time.sleep(2)
    assert jobs.status(name)["phase"] == "Deploying"
    assert len(jobs.apps.list_namespaced_deployment(claims).items) == 1
    # fixing serving rolls out without retraining
    jobs.patch_spec(name, {"serving": {"resources": {"requests": {"cpu": "100m"}}}})
    status = jobs.wait_phase(name, "Succeeded", 90)
    assert status["restarts"] == 1 and status["endpoint"]
    restart_events = [e for e in jobs.events(name) if e.reason == "GangRestart"]
    assert len(restart_events) == 1
    assert fourth.alive()


def _evict_and_watch(jobs: Jobs, pod: str) -> dict[str, Any]:
    """Evict `pod` and return its last state as a pod watch delivers it (the DELETED event)."""
    from kubernetes import client, watch

    listed = jobs.core.list_namespaced_pod(jobs.ns)
    stream = watch.Watch()
    jobs.core.create_namespaced_pod_eviction(
        pod, jobs.ns, client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=jobs.ns))
    )
    last: dict[str, Any] | None = None
    for event in stream.stream(
        jobs.core.list_namespaced_pod,
        jobs.ns,
        field_selector=f"metadata.name={pod}",
        resource_version=listed.metadata.resource_version,
        timeout_seconds=60,
    ):
        last = client.ApiClient().sanitize_for_serialization(event["object"])
        if event["type"] == "DELETED":
            stream.stop()
            break
    assert last is not None, f"no watch event of {pod} after its eviction"
    return last


def test_an_eviction_the_watch_recorded_stays_an_eviction_across_an_operator_restart(
    cluster: Cluster, claims: str, ops: Ops, operator_kubeconfig: Path
) -> None:
    """Two jobs with maxRestarts 0 each lose a worker to an eviction while their operator is down
    (killed right after its pod watch saw the eviction, before a pass acted on it). For one job
    the watch's record reached status.departedWorkers, written as the operator's watch handler
    writes it (PodTracker.to_record, Reconciler.record_departure, with the operator's own
    RBAC); for the other it did not. The restarted operator, whose memory is empty, counts the
    first as an eviction (no restart used) and can only count the second as a failure."""
    from kubernetes import config

    from kdistill.operator.departures import PodTracker
    from kdistill.operator.kube import Kube
    from kdistill.operator.reconciler import Reconciler
    from kdistill.operator.settings import Settings

    jobs = Jobs(cluster, claims)
    policy = {"maxRestarts": 0, "backoffSeconds": 1, "pendingTimeoutSeconds": 600}
    for name in ("recorded", "unrecorded"):
        jobs.create(job_body(name, nodes=2, gpus=1, serving=False, failurePolicy=policy))
    first = ops.start()
    for name in ("recorded", "unrecorded"):
        jobs.wait_running_gang(name, 2, attempt=0, timeout=120)
        jobs.wait_phase(name, "Running")
        eventually(lambda n=name: jobs.status(n).get("attempt") == 0, f"{name} status.attempt", 30)
    first.kill()

    tracker = PodTracker()
    final = _evict_and_watch(jobs, "recorded-worker-1")
    view = tracker.seen(claims, final, deleted=True)
    assert view.evicted and view.attempt == 0, view
    record = tracker.to_record(claims, view)
    assert record is not None and tracker.to_record(claims, view) is None  # written once
    reconciler = Reconciler(Kube(config.new_client_from_config(config_file=str(operator_kubeconfig))), Settings())
    assert reconciler.record_departure(claims, "recorded", 1, record)
    assert jobs.status("recorded")["departedWorkers"]["1"]["attempt"] == 0
    _evict_and_watch(jobs, "unrecorded-worker-1")  # nothing records this one

    ops.start()
    recorded = eventually(
        lambda: (s := jobs.status("recorded")).get("evictions") == 1 and s, "the eviction counted after restart", 60
    )
    assert recorded["restarts"] == 0 and recorded["attempt"] == 1 and recorded["phase"] != "Failed"
    jobs.wait_running_gang("recorded", 2, attempt=1, timeout=120)
    unrecorded = jobs.wait_phase("unrecorded", "Failed", 60)
    assert unrecorded["evictions"] == 0
    failed = next(c for c in unrecorded["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "MaxRestartsExceeded" and "PodDeleted" in failed["message"]
