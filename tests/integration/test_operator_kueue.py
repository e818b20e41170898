"""Kueue admission on rung 3: the real operator (with --kueue) and a real Kueue controller, built from
its Go module, against the real control plane with kwok GPU nodes. The test plays trainer rank 0.

One Kueue serves the module; each test has its own namespace, ClusterQueue and LocalQueue."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kdistill.api.metadata import LABEL_ATTEMPT
from tests.cluster import Cluster, MissingBinariesError
from tests.cluster.kueue import GPU_NODE_LABEL, Kueue, start_kueue
from tests.integration.test_rbac import (
    Forbidden,
    _rule_id,
    _rules,
    apply,
    chart_rbac,
    delete_cluster_scoped,
    start_operator,
    until,
    without,
)
from tests.operator import cluster_helpers as h
from tests.operator.cluster_helpers import Jobs, OperatorProcess, eventually, job_body, success_message

pytestmark = pytest.mark.cluster
lease_namespace, claims = h.lease_namespace, h.claims

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONDITION_KEYS = ("type", "status", "reason", "message", "observedGeneration", "lastTransitionTime")


@pytest.fixture(scope="module")
def kueue(cluster: Cluster, lease_namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    try:
        running = start_kueue(cluster, tmp_path_factory.mktemp("kueue"))
    except MissingBinariesError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield running
    finally:
        print(running.process.tail(40))
        running.stop()


@pytest.fixture
def env(
    cluster: Cluster, kueue: Kueue, claims: str, lease_namespace: str, tmp_path: Path
) -> Iterator[tuple[Jobs, OperatorProcess, Kueue]]:
    """A namespace with bound claims, its queues (4 GPUs of quota: one 2x2 gang), and an operator with --kueue."""
    kueue.queues(claims, gpus=4)
    op = OperatorProcess(
        cluster,
        tmp_path / "operator.log",
        namespace=claims,
        lease_namespace=lease_namespace,
        extra=["--lease-name", f"op-{claims}", "--kueue"],
    ).start()
    try:
        op.wait_started()
        yield Jobs(cluster, claims), op, kueue
    finally:
        code = op.stop()
        print(op.log_path.read_text()[-3000:])
        kueue.cleanup()
        assert code == 0, f"operator exited {code}"


def queued_job(name: str, **labels: str) -> dict[str, Any]:
    body = job_body(name, nodes=2, gpus=2, serving=False)
    body["metadata"]["labels"] = {QUEUE_LABEL: "gpus", **labels}
    return body


def workload(kueue: Kueue, ns: str, job: str) -> dict[str, Any]:
    return kueue.get("workloads", f"{job}-kueue", ns)


def wl_condition(body: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def finish(cluster: Cluster, jobs: Jobs, name: str, attempt: int) -> None:
    pods = jobs.wait_running_gang(name, 2, attempt=attempt, timeout=90)
    h.succeed_gang(cluster, jobs.ns, pods, success_message(0.95))


def test_gang_admission_quota_conditions_and_kubectl_wait(
    cluster: Cluster, env: tuple[Jobs, OperatorProcess, Kueue]
) -> None:
    jobs, op, kueue = env
    ns = jobs.ns
    jobs.create(queued_job("first"))
    first = jobs.wait_running_gang("first", 2, attempt=0, timeout=90)
    jobs.create(queued_job("second"))

    # the first gang: admitted as one Workload (one podSet of 2 pods x 2 GPUs), placed by the flavor
    wl = workload(kueue, ns, "first")
    (podset,) = wl["spec"]["podSets"]
    assert podset["count"] == 2 and wl["spec"]["queueName"] == "gpus"
    requests = podset["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests["nvidia.com/gpu"] == "2"
    assert wl["metadata"]["ownerReferences"][0]["kind"] == "DistillationJob"
    for pod in first:
        assert pod.spec.node_selector.items() >= GPU_NODE_LABEL.items(), pod.spec.node_selector
    admitted = jobs.condition("first", "Admitted")
    assert admitted is not None and admitted["status"] == "True" and "cq-" in admitted["message"]

    # the second waits: Queued, no pod, the reason from Kueue, the queue in `kubectl get dj`
    status = jobs.wait_phase("second", "Queued", 60)
    assert not jobs.pods("second")
    waiting = eventually(lambda: (c := jobs.condition("second", "Admitted")) and "quota" in c["message"] and c,
                         "second's Admitted condition names the missing quota", 60)  # fmt: skip
    assert waiting["status"] == "False"
    row = cluster.kubectl("-n", ns, "get", "dj", "second", "--no-headers").stdout.split()
    assert row[1] == "Queued" and "gpus" in row, row
    assert status["restarts"] == 0

    # the first finishes: `kubectl wait --for=condition=Complete` returns, its Workload is Finished
    finish(cluster, jobs, "first", attempt=0)
    cluster.kubectl("-n", ns, "wait", "--for=condition=Complete", "dj/first", "--timeout=90s", timeout=100)
    done = jobs.status("first")
    assert done["phase"] == "Succeeded"
    for cond in done["conditions"]:
        missing = [k for k in CONDITION_KEYS if cond.get(k) in (None, "")]
        assert not missing, f"condition {cond['type']} lacks {missing}: {cond}"
    types = {c["type"] for c in done["conditions"]}
    assert {"Admitted", "Training", "Restarting", "Complete"} <= types, types
    eventually(lambda: wl_condition(workload(kueue, ns, "first"), "Finished"), "first's Workload Finished", 30)

    # ... and only then the second is admitted and runs: one after the other
    second = jobs.wait_running_gang("second", 2, attempt=0, timeout=90)
    assert len(second) == 2
    admitted_at = jobs.condition("second", "Admitted")["lastTransitionTime"]
    assert admitted_at >= done["completionTime"], (admitted_at, done["completionTime"])
    finish(cluster, jobs, "second", attempt=0)
    cluster.kubectl("-n", ns, "wait", "--for=condition=Complete", "dj/second", "--timeout=90s", timeout=100)
    assert op.alive()


def test_preemption_checkpoints_requeues_and_runs_again_without_using_restarts(
    cluster: Cluster, env: tuple[Jobs, OperatorProcess, Kueue]
) -> None:
    jobs, op, kueue = env
    ns = jobs.ns
    kueue.priority_class(f"low-{ns}", 10)
    kueue.priority_class(f"high-{ns}", 1000)
    jobs.create(queued_job("low", **{"kueue.x-k8s.io/priority-class": f"low-{ns}"}))
    jobs.wait_running_gang("low", 2, attempt=0, timeout=90)
    assert workload(kueue, ns, "low")["spec"]["priority"] == 10

    # a higher-priority workload wants the whole quota: Kueue preempts the gang
    high = {
        "kind": "Workload",
        "metadata": {"name": "high", "namespace": ns},
        "spec": {
            "queueName": "gpus",
            "priorityClassRef": {"group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass", "name": f"high-{ns}"},
            "priority": 1000,
            "podSets": [
                {
                    "name": "main",
                    "count": 1,
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [
                                {"name": "c", "image": "pause", "resources": {"requests": {"nvidia.com/gpu": "4"}}}
                            ],
                        }
                    },
                }
            ],
        },
    }
    kueue.create("workloads", high, ns)
    # the gang is stopped (its pods deleted: SIGTERM, the trainer checkpoints) and the job goes back to Queued
    jobs.wait_phase("low", "Queued", 90)
    eventually(lambda: not jobs.pods("low"), "the preempted gang's pods gone", 60)
    status = jobs.status("low")
    assert status["restarts"] == 0 and status["evictions"] == 1, status
    admitted = jobs.condition("low", "Admitted")
    assert admitted["status"] == "False" and admitted["reason"] == "Preempted", admitted
    assert "Evicted" in [e.reason for e in jobs.events("low")]
    # the reservation is cleared, Kueue marks it Requeued and admits the higher one
    requeued = eventually(lambda: wl_condition(workload(kueue, ns, "low"), "Requeued"), "low's Workload Requeued", 60)
    assert requeued["status"] == "True" and requeued["reason"] == "Preempted"
    eventually(
        lambda: (c := wl_condition(kueue.get("workloads", "high", ns), "Admitted")) and c["status"] == "True",
        "the higher-priority Workload admitted",
        60,
    )
    assert jobs.status("low")["phase"] == "Queued" and not jobs.pods("low")

    # the higher one finishes: the job is admitted again and runs a new gang (attempt 1)
    kueue.api().delete_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", ns, "workloads", "high")
    pods = jobs.wait_running_gang("low", 2, attempt=1, timeout=90)
    assert all(p.metadata.labels[LABEL_ATTEMPT] == "1" for p in pods)
    status = jobs.wait_phase("low", "Running", 60)
    assert status["restarts"] == 0 and status["evictions"] == 1
    assert jobs.condition("low", "Admitted")["status"] == "True"
    finish(cluster, jobs, "low", attempt=1)
    cluster.kubectl("-n", ns, "wait", "--for=condition=Complete", "dj/low", "--timeout=90s", timeout=100)
    assert json.loads(cluster.kubectl("-n", ns, "get", "dj", "low", "-o", "json").stdout)["status"]["restarts"] == 0
    assert op.alive()


def test_suspend_withdraws_the_workload_and_resume_queues_again(
    cluster: Cluster, env: tuple[Jobs, OperatorProcess, Kueue]
) -> None:
    jobs, op, kueue = env
    ns = jobs.ns
    jobs.create(queued_job("pause"))
    jobs.wait_running_gang("pause", 2, attempt=0, timeout=90)
    uid = workload(kueue, ns, "pause")["metadata"]["uid"]
    jobs.patch_spec("pause", {"suspend": True})
    jobs.wait_phase("pause", "Suspended", 60)

    def workload_gone() -> bool:
        try:
            workload(kueue, ns, "pause")
        except client.ApiException as exc:
            return exc.status == 404
        return False

    eventually(workload_gone, "the suspended job's Workload deleted", 60)
    eventually(lambda: not jobs.live_pods("pause"), "the suspended gang gone", 60)
    assert jobs.condition("pause", "Admitted")["reason"] == "Suspended"
    jobs.patch_spec("pause", {"suspend": False})
    jobs.wait_running_gang("pause", 2, attempt=1, timeout=90)  # a resume is a new gang attempt
    assert workload(kueue, ns, "pause")["metadata"]["uid"] != uid  # queued again with a new Workload
    status = jobs.wait_phase("pause", "Running", 60)
    assert status["restarts"] == 0 and status["evictions"] == 0 and status["resumes"] == 1
    assert jobs.condition("pause", "Admitted")["status"] == "True"
    assert op.alive()


# -- the chart's RBAC with kueue.enabled -------------------------------------------------------------

KUEUE_RULES = [("Role", r) for r in _rules("kueue.yaml")] + [("ClusterRole", r) for r in _rules("kueue-cluster.yaml")]


@pytest.fixture
def rbac_env(
    cluster: Cluster, kueue: Kueue, claims: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """The chart's namespaced-mode RBAC rendered with kueue.enabled, the job namespace's queues, and
    --kueue for the operator (start_operator passes the environment on)."""
    release_ns = cluster.create_namespace("kd-system")
    kueue.queues(claims, gpus=4)
    kueue.priority_class(f"rbac-{claims}", 5)
    monkeypatch.setenv("KDISTILL_KUEUE", "true")
    objs = chart_rbac(release_ns, {"watch.mode": "namespaced", "watch.namespaces": [claims], "kueue.enabled": True})
    try:
        yield release_ns, claims, objs
    finally:
        delete_cluster_scoped(cluster)
        cluster.core().delete_namespace(release_ns)
        kueue.cleanup()


def kueue_life(cluster: Cluster, kueue: Kueue, release_ns: str, ns: str, objs: list[dict[str, Any]], tmp_path: Path,
               *, fail_fast: bool) -> list[str]:  # fmt: skip
    """A queued job's life as the chart's ServiceAccount: its Workload (with the priority of its class),
    admission onto the flavor, the gang, success, the Workload Finished. Returns the Forbidden requests."""
    apply(cluster, objs)
    op = start_operator(cluster, release_ns, tmp_path, watch=[ns])
    jobs = Jobs(cluster, ns)
    try:
        jobs.create(queued_job("rbac", **{"kueue.x-k8s.io/priority-class": f"rbac-{ns}"}))
        gang = until(lambda: len(jobs.live_pods("rbac")) == 2 and jobs.live_pods("rbac"), "the admitted gang", 90,
                     op, fail_fast)  # fmt: skip
        for pod in gang:
            assert pod.spec.node_selector.items() >= GPU_NODE_LABEL.items()
        assert workload(kueue, ns, "rbac")["spec"]["priority"] == 5
        finish(cluster, jobs, "rbac", attempt=0)
        until(lambda: (c := jobs.condition("rbac", "Complete")) and c["status"] == "True", "Complete", 60, op,
              fail_fast)  # fmt: skip
        until(lambda: wl_condition(workload(kueue, ns, "rbac"), "Finished"), "the Workload Finished", 30, op,
              fail_fast)  # fmt: skip
    except Forbidden:
        pass
    finally:
        op.proc.stop()
    return op.forbidden()


def test_a_queued_jobs_life_with_the_charts_kueue_rbac_is_never_forbidden(
    cluster: Cluster, kueue: Kueue, rbac_env: tuple[str, str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    release_ns, ns, objs = rbac_env
    rules = [r for o in objs if o["kind"] in ("Role", "ClusterRole") for r in o.get("rules") or []]
    for _, rule in KUEUE_RULES:
        assert rule in rules, rule
    without_kueue = chart_rbac(release_ns, {"watch.mode": "namespaced", "watch.namespaces": [ns]})
    plain = [r for o in without_kueue if o["kind"] in ("Role", "ClusterRole") for r in o.get("rules") or []]
    assert not [r for r in plain if "kueue.x-k8s.io" in r["apiGroups"]], "Kueue rules without kueue.enabled"
    assert kueue_life(cluster, kueue, release_ns, ns, objs, tmp_path, fail_fast=False) == []


@pytest.mark.parametrize(("kind", "rule"), KUEUE_RULES, ids=[_rule_id(r) for _, r in KUEUE_RULES])
def test_without_any_single_kueue_rule_a_request_is_forbidden(
    cluster: Cluster,
    kueue: Kueue,
    rbac_env: tuple[str, str, list[dict[str, Any]]],
    tmp_path: Path,
    kind: str,
    rule: dict[str, Any],
) -> None:
    release_ns, ns, objs = rbac_env
    forbidden = kueue_life(cluster, kueue, release_ns, ns, without(objs, kind, rule), tmp_path, fail_fast=True)
    assert forbidden, f"without {_rule_id(rule)} no request was Forbidden: the rule is more than the operator needs"
