"""The real operator (`kdistill operator`, a subprocess) against the real control plane with
kwok GPU nodes: a job's whole life, each step asserted through the API."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from tests.cluster import Cluster
from tests.operator import cluster_helpers as h
from tests.operator.cluster_helpers import (
    GROUP,
    PLURAL,
    VERSION,
    Jobs,
    OperatorProcess,
    eventually,
    job_body,
)

pytestmark = pytest.mark.cluster
# The shared fixtures, made visible to pytest in this module.
lease_namespace, claims, env = h.lease_namespace, h.claims, h.env


def test_full_life(cluster: Cluster, env: tuple[Jobs, OperatorProcess]) -> None:
    jobs, op = env
    ns, name = jobs.ns, "life"
    # 1. apply
    jobs.create(job_body(name, nodes=2, gpus=2))

    # 2. pods with the right GPU requests and env
    pods = jobs.wait_running_gang(name, 2, attempt=0)
    for i, pod in enumerate(pods):
        c = pod.spec.containers[0]
        assert c.resources.requests["nvidia.com/gpu"] == "2" and c.resources.limits["nvidia.com/gpu"] == "2"
        env_vars = {e.name: e.value for e in c.env}
        assert env_vars["KDISTILL_JOB_NAME"] == name and env_vars["KDISTILL_JOB_NAMESPACE"] == ns
        assert env_vars["KDISTILL_PVC_ROOT"] == "/mnt/pvc"
        assert c.command[c.command.index("--node-rank") + 1] == str(i)
        assert c.command[c.command.index("--master-addr") + 1] == f"{name}-worker-0.{name}-workers.{ns}.svc"
        assert pod.spec.node_name in cluster.gpu_nodes
        assert pod.metadata.owner_references[0].kind == "DistillationJob"
        assert c.security_context.read_only_root_filesystem and c.security_context.run_as_non_root

    # 3. Running
    status = jobs.wait_phase(name, "Running")
    assert status["restarts"] == 0 and status["startTime"]

    # 4. progress in `kubectl get dj`, written as rank 0 does: with the job's own ServiceAccount
    sa_kubeconfig = cluster.serviceaccount_kubeconfig(ns, f"{name}-trainer")
    patch = {"status": {"stage": "output", "step": 34, "totalSteps": 100, "progress": "34%", "loss": 2.5}}
    cluster.kubectl(
        "-n",
        ns,
        "patch",
        "dj",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(patch),
        kubeconfig=sa_kubeconfig,
    )
    denied = cluster.kubectl(
        "-n",
        ns,
        "patch",
        "dj",
        name,
        "--type=merge",
        "-p",
        '{"spec":{"suspend":true}}',
        kubeconfig=sa_kubeconfig,
        check=False,
    )
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    table = cluster.kubectl("-n", ns, "get", "dj", name).stdout
    assert "34%" in table and "Running" in table and "output" in table

    # 5. a node goes NotReady: the gang restarts with restarts=1 and comes back
    lost_node = pods[1].spec.node_name
    cluster.stop_node_heartbeats(lost_node)
    try:
        eventually(lambda: jobs.status(name).get("restarts") == 1, "restarts=1 after NotReady", 90)
        new = jobs.wait_running_gang(name, 2, attempt=1, timeout=90)
        assert all(p.spec.node_name != lost_node for p in new)
        jobs.wait_phase(name, "Running")
        reasons = [e.reason for e in jobs.events(name)]
        assert "GangRestart" in reasons and "Restarting" in reasons
        assert jobs.condition(name, "Restarting")["status"] == "False"
        # progress written before the restart is the trainer's: the operator left it alone
        assert jobs.status(name)["progress"] == "34%"
    finally:
        cluster.resume_node_heartbeats(lost_node)

    # 6. success, with metrics in the termination message (full float precision, as the trainer writes them)
    retention = 0.9721786549256195
    h.succeed_gang(cluster, ns, new, h.success_message(retention))

    # 7. the serving Deployment becomes available and status.endpoint is set
    status = jobs.wait_phase(name, "Succeeded", 90)
    assert status["metrics"]["retention"] == 0.972 and status["metrics"]["student"] == round(12.0 / retention, 3)
    (row,) = cluster.kubectl("-n", ns, "get", "dj", name, "--no-headers").stdout.splitlines()
    assert "0.972" in row.split() and "0.9721786" not in row, row
    assert status["endpoint"] == f"http://{name}-serving.{ns}.svc:8080"
    assert status["completionTime"]
    dep = jobs.apps.read_namespaced_deployment(f"{name}-serving", ns)
    assert dep.status.available_replicas == 1
    server = dep.spec.template.spec.containers[0]
    assert server.command[:3] == ["kdistill", "serve", f"/mnt/checkpoints/{ns}/{name}/student-int8"]
    assert server.readiness_probe.http_get.path == "/v2/health/ready"
    assert dep.spec.strategy.rolling_update.max_unavailable == 0
    assert jobs.core.read_namespaced_service(f"{name}-serving", ns).spec.ports[0].port == 8080
    # worker pods are cleaned up after success
    eventually(lambda: not jobs.pods(name), "worker pods deleted after success", 30)

    # 8. scaling serving.replicas updates the Deployment without retraining
    jobs.patch_spec(name, {"serving": {"replicas": 3, "batching": {"maxBatchSize": 16}}})
    eventually(
        lambda: jobs.apps.read_namespaced_deployment(f"{name}-serving", ns).status.available_replicas == 3,
        "3 available serving replicas",
        60,
    )
    dep = jobs.apps.read_namespaced_deployment(f"{name}-serving", ns)
    args = dep.spec.template.spec.containers[0].command
    assert args[args.index("--max-batch-size") + 1] == "16"
    pdb = client.PolicyV1Api(cluster.api_client()).read_namespaced_pod_disruption_budget(f"{name}-serving", ns)
    assert pdb.spec.max_unavailable == 1
    assert not jobs.pods(name) and jobs.status(name)["phase"] == "Succeeded"

    # 9. deletion leaves nothing behind
    jobs.delete(name)

    def gone() -> bool:
        label = f"kdistill.io/job={name}"
        leftovers = (
            jobs.core.list_namespaced_pod(ns, label_selector=label).items
            + jobs.core.list_namespaced_config_map(ns, label_selector=label).items
            + jobs.core.list_namespaced_service(ns, label_selector=label).items
            + jobs.core.list_namespaced_service_account(ns, label_selector=label).items
            + client.RbacAuthorizationV1Api(cluster.api_client()).list_namespaced_role(ns, label_selector=label).items
            + jobs.apps.list_namespaced_deployment(ns).items
            + [s for s in jobs.core.list_namespaced_service(ns).items if s.metadata.name.startswith(name)]
            + client.PolicyV1Api(cluster.api_client()).list_namespaced_pod_disruption_budget(ns).items
        )
        return not leftovers and not jobs.exists(name)

    eventually(gone, "every child of the job garbage-collected", 60)
    assert op.alive()
    lines = op.log_lines()
    assert any(line.get("job") == f"{ns}/{name}" for line in lines)


def test_crd_group_is_served(env: tuple[Jobs, OperatorProcess]) -> None:
    """Guards the helpers' constants against the generated CRD."""
    jobs, _ = env
    listed = jobs.api.list_namespaced_custom_object(GROUP, VERSION, jobs.ns, PLURAL)
    assert listed["items"] == []
