"""Proof that the test control plane is real: a real kube-apiserver serving the project's
CRD with its schema and CEL rules, a real scheduler placing pods on kwok GPU nodes, and a
real controller-manager evicting pods from a lost node (rung 3 of the testing ladder).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from kubernetes import client

from kdistill.api import JobValidationError, parse_job
from tests.cluster import EXIT_CODE, MESSAGE, OUTCOME, Cluster, outcome_annotations
from tests.cluster.binaries import versions
from tests.cluster.kwok import GPU_RESOURCE, NodeSpec, create_nodes
from tests.spec_table import BAD_SPECS, GOOD_SPECS, base_job

pytestmark = pytest.mark.cluster

CRD = Path(__file__).resolve().parents[2] / "crds" / "kdistill.io_distillationjobs.yaml"
GROUP, VERSION, PLURAL = "kdistill.io", "v1alpha1", "distillationjobs"

T = TypeVar("T")


def eventually(fn: Callable[[], T | None], what: str, timeout: float = 60.0, interval: float = 0.3) -> T:
    """Polls fn until it returns something truthy, and returns it."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except client.ApiException as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s: {what}" + (f" (last error: {last})" if last else ""))


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> None:
    # Left installed: other modules of the session may use it too.
    cluster.install_crd(CRD)


def job_body(name: str, **spec_changes: Any) -> dict[str, Any]:
    job = base_job(name)
    job["spec"].update(spec_changes)
    return job


def create_job(cluster: Cluster, namespace: str, job: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    api = client.CustomObjectsApi(cluster.api_client())
    kwargs: dict[str, Any] = {"field_validation": "Strict"}
    if dry_run:
        kwargs["dry_run"] = "All"
    return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job, **kwargs)


def api_error(exc: client.ApiException) -> tuple[str, list[str]]:
    """(message, field paths) of an API server rejection."""
    body = json.loads(exc.body)
    causes = (body.get("details") or {}).get("causes") or []
    return body.get("message", ""), [c.get("field", "") for c in causes]


# -- the control plane itself -----------------------------------------------------------


def test_components_report_the_pinned_version(cluster: Cluster) -> None:
    # Through env(), as a subprocess such as the operator would reach the cluster.
    out = subprocess.run(["kubectl", "version", "-o", "json"], env=cluster.env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    if not cluster.external:
        assert info["serverVersion"]["gitVersion"] == versions()["k8s"]
        assert info["clientVersion"]["gitVersion"] == versions()["k8s"]


def test_fake_gpu_nodes_are_ready_with_gpu_capacity_and_taint(cluster: Cluster) -> None:
    core = cluster.core()
    for name in cluster.gpu_nodes:
        node = core.read_node(name)
        assert node.status.allocatable[GPU_RESOURCE] == str(cluster.gpus_per_node)
        assert node.metadata.labels["nvidia.com/gpu.present"] == "true"
        tainted = any(t.key == GPU_RESOURCE and t.effect == "NoSchedule" for t in node.spec.taints or [])
        assert tainted == (not cluster.external)
        assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
    for name in cluster.cpu_nodes:
        assert GPU_RESOURCE not in core.read_node(name).status.allocatable


def test_garbage_collector_deletes_dependents(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "dependent", "ownerReferences": [ref]}})
    core.delete_namespaced_config_map("owner", namespace)

    def dependent_gone() -> bool:
        try:
            core.read_namespaced_config_map("dependent", namespace)
        except client.ApiException as exc:
            return exc.status == 404
        return False

    eventually(dependent_gone, "the garbage collector deletes the dependent ConfigMap", 30)


def test_serviceaccount_kubeconfig_is_bound_by_rbac(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    })  # fmt: skip
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    })  # fmt: skip
    kc = cluster.serviceaccount_kubeconfig(namespace, "reader")

    who = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kc).stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:reader"
    cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=kc)
    denied = cluster.kubectl("create", "configmap", "nope", "-n", namespace, kubeconfig=kc, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr
    other = cluster.kubectl("get", "pods", "-n", "kube-system", kubeconfig=kc, check=False)
    assert other.returncode != 0 and "forbidden" in other.stderr


# -- the CRD ----------------------------------------------------------------------------


def test_crd_is_installed_and_served(cluster: Cluster, crd: None, namespace: str) -> None:
    resources = cluster.kubectl("api-resources", f"--api-group={GROUP}", "-o", "wide").stdout
    assert "distillationjobs" in resources and " dj " in resources
    created = create_job(cluster, namespace, job_body("served"))
    # Defaults from the schema are applied by the API server.
    assert created["spec"]["distillation"]["loss"] == "forward-kl"
    got = json.loads(cluster.kubectl("get", "dj", "served", "-n", namespace, "-o", "json").stdout)
    assert got["metadata"]["uid"] == created["metadata"]["uid"]


def test_kubectl_get_dj_shows_the_printer_columns(cluster: Cluster, crd: None, namespace: str) -> None:
    create_job(cluster, namespace, job_body("columns"))
    status = {
        "phase": "Running",
        "stage": "output",
        "progress": "34%",
        "restarts": 1,
        "metrics": {"teacher": 0.9, "student": 0.8766, "retention": 0.974, "metric": "accuracy"},
        "endpoint": "http://columns-serving.default.svc:8080",
    }
    api = client.CustomObjectsApi(cluster.api_client())
    api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "columns", {"status": status})

    out = cluster.kubectl("get", "dj", "columns", "-n", namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "STAGE", "PROGRESS", "RESTARTS", "RETENTION", "ENDPOINT", "QUEUE", "AGE"]
    row = out[1].split()
    assert row[:7] == ["columns", "Running", "output", "34%", "1", "0.974", status["endpoint"]]


@pytest.mark.parametrize(("name", "job"), GOOD_SPECS, ids=[g[0] for g in GOOD_SPECS])
def test_good_specs_are_accepted_by_the_api_server_and_pydantic(
    cluster: Cluster, crd: None, name: str, job: dict[str, Any]
) -> None:
    parse_job(job)
    create_job(cluster, "default", job, dry_run=True)


@pytest.mark.parametrize(("name", "job", "path"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_specs_are_rejected_by_the_api_server_and_pydantic(
    cluster: Cluster, crd: None, name: str, job: dict[str, Any], path: str
) -> None:
    with pytest.raises(JobValidationError):
        parse_job(job)
    with pytest.raises(client.ApiException) as info:
        create_job(cluster, "default", job, dry_run=True)
    assert info.value.status in (400, 422), info.value.body
    message, fields = api_error(info.value)
    # The API server's own message names the field the table expects.
    assert path in fields or path in message, f"{name}: expected {path} in {fields} / {message}"


def test_training_fields_are_immutable_and_serving_can_change(cluster: Cluster, crd: None, namespace: str) -> None:
    create_job(cluster, namespace, job_body("immutable"))
    api = client.CustomObjectsApi(cluster.api_client())

    def patch(spec: dict[str, Any]) -> dict[str, Any]:
        return api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "immutable", {"spec": spec})

    for change in (
        {"distillation": {"alpha": 0.5}},
        {"teacher": {"model": "pvc://models/other"}},
        {"task": "sequence-classification"},
        {"data": {"train": "pvc://data/other.jsonl"}},
    ):
        with pytest.raises(client.ApiException) as info:
            patch(change)
        message, _ = api_error(info.value)
        assert info.value.status == 422 and "immutable" in message, (change, message)

    patched = patch({"serving": {"replicas": 3, "qualityGate": {"minRetention": 0.8}}, "suspend": True})
    assert patched["spec"]["serving"]["replicas"] == 3
    assert patched["spec"]["suspend"] is True
    patched = patch({"failurePolicy": {"maxRestarts": 5}, "template": {"nodeSelector": {"pool": "gpu"}}})
    assert patched["spec"]["failurePolicy"]["maxRestarts"] == 5


# -- scheduling and pod lifecycles on kwok nodes ------------------------------------------


def gpu_deployment(name: str, replicas: int, gpus: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [{
                        "name": "worker", "image": "kdistill/trainer:test",
                        "resources": {"limits": {GPU_RESOURCE: str(gpus)}},
                    }],
                },
            },
        },
    }  # fmt: skip


def pods(core: client.CoreV1Api, namespace: str, app: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=f"app={app}").items


def running(core: client.CoreV1Api, namespace: str, app: str, count: int) -> list[client.V1Pod] | None:
    live = [p for p in pods(core, namespace, app) if p.metadata.deletion_timestamp is None]
    ready = [p for p in live if p.status.phase == "Running" and p.status.pod_ip]
    return ready if len(ready) == count else None


def test_deployment_pods_are_scheduled_on_gpu_nodes_and_run(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    apps = client.AppsV1Api(cluster.api_client())
    apps.create_namespaced_deployment(namespace, gpu_deployment("gpu-app", replicas=3))
    ready = eventually(lambda: running(core, namespace, "gpu-app", 3), "3 Running gpu-app pods")
    for pod in ready:
        node = core.read_node(pod.spec.node_name)
        assert GPU_RESOURCE in node.status.allocatable, f"{pod.metadata.name} landed on a node without GPUs"
        if not cluster.external:
            # The ExtendedResourceToleration admission plugin lets GPU pods onto tainted GPU nodes.
            assert any(t.key == GPU_RESOURCE for t in pod.spec.tolerations)
        assert pod.status.container_statuses[0].state.running is not None
    eventually(
        lambda: apps.read_namespaced_deployment("gpu-app", namespace).status.available_replicas == 3,
        "the Deployment reports 3 available replicas",
    )

    # More GPUs than any node has: the scheduler leaves the pod Pending and says why.
    apps.create_namespaced_deployment(namespace, gpu_deployment("too-big", 1, gpus=cluster.gpus_per_node + 1))

    def unschedulable() -> bool:
        found = pods(core, namespace, "too-big")
        conds = found[0].status.conditions or [] if found else []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" and GPU_RESOURCE in c.message
                   for c in conds)  # fmt: skip

    eventually(unschedulable, "the too-big pod is Unschedulable for lack of GPUs", 30)


def bare_pod(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "trainer", "image": "kdistill/trainer:test",
                            "resources": {"limits": {GPU_RESOURCE: "1"}}}],
        },
    }  # fmt: skip


def terminated(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod | None:
    pod = core.read_namespaced_pod(name, namespace)
    return pod if pod.status.phase in ("Succeeded", "Failed") else None


def test_bare_pods_follow_the_outcome_annotations(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    summary = {"reason": "Completed", "retryable": False, "message": "done", "metrics": {"retention": 0.97}}
    core.create_namespaced_pod(namespace, bare_pod("ok", outcome_annotations(succeed=True, message=summary)))
    failure = {"reason": "NCCLTimeout", "retryable": True, "message": "rank 3 timed out"}
    core.create_namespaced_pod(namespace, bare_pod("bad", {OUTCOME: "fail", EXIT_CODE: "3",
                                                           MESSAGE: json.dumps(failure)}))  # fmt: skip
    core.create_namespaced_pod(namespace, bare_pod("waits"))

    ok = eventually(lambda: terminated(core, namespace, "ok"), "pod ok terminates")
    assert ok.status.phase == "Succeeded"
    state = ok.status.container_statuses[0].state.terminated
    assert (state.exit_code, state.reason, json.loads(state.message)) == (0, "Completed", summary)

    bad = eventually(lambda: terminated(core, namespace, "bad"), "pod bad terminates")
    assert bad.status.phase == "Failed"
    state = bad.status.container_statuses[0].state.terminated
    assert (state.exit_code, state.reason, json.loads(state.message)) == (3, "Error", failure)

    # With no outcome a pod keeps running until the test decides, as a trainer would.
    waits = eventually(lambda: running_pod(core, namespace, "waits"), "pod waits runs")
    assert GPU_RESOURCE in core.read_node(waits.spec.node_name).status.allocatable
    time.sleep(2)
    assert core.read_namespaced_pod("waits", namespace).status.phase == "Running"
    cluster.fail_pod(namespace, "waits", exit_code=137, message={"reason": "OOMKilled", "retryable": True},
                     reason="OOMKilled")  # fmt: skip
    waits = eventually(lambda: terminated(core, namespace, "waits"), "pod waits fails")
    state = waits.status.container_statuses[0].state.terminated
    assert (waits.status.phase, state.exit_code, state.reason) == ("Failed", 137, "OOMKilled")
    assert json.loads(state.message)["reason"] == "OOMKilled"


def test_job_pods_complete_and_the_job_controller_sees_it(cluster: Cluster, namespace: str) -> None:
    batch = client.BatchV1Api(cluster.api_client())
    template = bare_pod("unused")
    batch.create_namespaced_job(namespace, {
        "metadata": {"name": "one-shot"},
        "spec": {"backoffLimit": 0, "template": {"spec": template["spec"]}},
    })  # fmt: skip

    def complete() -> bool:
        conds = batch.read_namespaced_job_status("one-shot", namespace).status.conditions or []
        return any(c.type == "Complete" and c.status == "True" for c in conds)

    eventually(complete, "the Job completes")
    assert batch.read_namespaced_job_status("one-shot", namespace).status.succeeded == 1


def test_outcome_annotations_refuse_inconsistent_requests() -> None:
    assert outcome_annotations(succeed=False, exit_code=3, message={"a": 1}) == {
        OUTCOME: "fail", EXIT_CODE: "3", MESSAGE: '{"a": 1}'
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"0\.\.255"):
        outcome_annotations(succeed=False, exit_code=256)
    with pytest.raises(ValueError, match="exits 0"):
        outcome_annotations(succeed=True, exit_code=1)


def running_pod(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod | None:
    pod = core.read_namespaced_pod(name, namespace)
    return pod if pod.status.phase == "Running" else None


def test_lost_node_gets_its_pods_evicted_by_the_controller_manager(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    apps = client.AppsV1Api(cluster.api_client())
    apps.create_namespaced_deployment(namespace, gpu_deployment("evict-me", replicas=2))
    first = eventually(lambda: running(core, namespace, "evict-me", 2), "2 Running evict-me pods")
    lost = first[0].spec.node_name
    on_lost = {p.metadata.name for p in first if p.spec.node_name == lost}

    cluster.stop_node_heartbeats(lost)
    try:
        # The node-lifecycle controller notices the silent node ...
        cluster.wait_node_ready(lost, "Unknown", timeout=60)
        eventually(
            lambda: any(
                t.key == "node.kubernetes.io/unreachable" and t.effect == "NoExecute"
                for t in core.read_node(lost).spec.taints or []
            ),
            f"{lost} is tainted unreachable:NoExecute",
            30,
        )

        # ... and the taint-eviction controller deletes its pods, marking why.
        def evicted() -> list[client.V1Pod] | None:
            gone = [p for p in pods(core, namespace, "evict-me") if p.metadata.name in on_lost]
            done = [p for p in gone if p.metadata.deletion_timestamp is not None]
            return done if len(done) == len(on_lost) else None

        for pod in eventually(evicted, f"pods on {lost} are evicted", 60):
            reasons = {c.type: c.reason for c in pod.status.conditions or []}
            assert reasons.get("DisruptionTarget") == "DeletionByTaintManager", reasons

        # The ReplicaSet replaces them, and the scheduler keeps off the tainted node.
        def replaced() -> list[client.V1Pod] | None:
            ready = running(core, namespace, "evict-me", 2)
            return ready if ready and not any(p.metadata.name in on_lost for p in ready) else None

        for pod in eventually(replaced, "replacement pods run", 60):
            assert pod.spec.node_name != lost
    finally:
        cluster.resume_node_heartbeats(lost)


def test_deleted_node_loses_its_pods(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    name = f"kwok-doomed-{uuid.uuid4().hex[:4]}"
    create_nodes(core, [NodeSpec(name, gpus=1)])
    cluster.wait_node_ready(name, "True", 60)
    pod = bare_pod("on-doomed")
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": name}
    core.create_namespaced_pod(namespace, pod)
    eventually(lambda: running_pod(core, namespace, "on-doomed"), "pod on the doomed node runs")

    cluster.delete_node(name)

    def pod_gone() -> bool:
        try:
            core.read_namespaced_pod("on-doomed", namespace)
        except client.ApiException as exc:
            return exc.status == 404
        return False

    # The pod garbage collector removes pods bound to a node that no longer exists.
    eventually(pod_gone, "PodGC deletes the orphaned pod", 120, interval=1.0)


# -- teardown -----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def start_harness_process() -> tuple[subprocess.Popen[str], list[psutil.Process], Path]:
    """`python -m tests.cluster` in a child process, once it reports the cluster is up."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster", "--gpu-nodes=1", "--cpu-nodes=0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    workdir = Path("/nonexistent")
    for line in proc.stdout:
        lines.append(line)
        if "; logs in " in line:
            workdir = Path(line.rsplit("; logs in ", 1)[1].strip()).parent
        if "Ctrl-C stops it" in line:
            break
    else:
        raise AssertionError("the harness exited before the cluster came up:\n" + "".join(lines))
    children = psutil.Process(proc.pid).children()
    names = sorted(Path(c.exe()).name for c in children)
    assert names == ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"], names
    return proc, children, workdir


def test_ctrl_c_stops_every_component() -> None:
    proc, children, workdir = start_harness_process()
    proc.send_signal(signal.SIGINT)
    # communicate() keeps draining the pipe, so a chatty shutdown cannot block on a full pipe.
    # Components stop one by one, up to 15 s each when the machine is loaded.
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"exit {proc.returncode} after Ctrl-C:\n{out[-3000:]}"
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"still running after Ctrl-C: {alive}"
    assert not workdir.exists(), "the cluster's data folder was left behind"


def test_no_component_outlives_a_killed_harness() -> None:
    # SIGKILL leaves no chance for atexit or finally: the kernel (PR_SET_PDEATHSIG) must act.
    proc, children, workdir = start_harness_process()
    proc.kill()
    proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)
    assert not alive, f"orphaned components: {alive}"


def test_helm_installs_a_chart_whose_pods_run(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    assert versions()["helm"] in cluster.helm("version", "--short").stdout
    cluster.helm("create", str(tmp_path / "demo"))
    cluster.helm("install", "demo", str(tmp_path / "demo"), "-n", namespace, "--wait", "--timeout=90s")
    releases = json.loads(cluster.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]
    pod = cluster.core().list_namespaced_pod(namespace, label_selector="app.kubernetes.io/instance=demo").items[0]
    assert pod.status.phase == "Running"
    if not cluster.external:
        # Untolerated, the GPU taint keeps a plain pod on the CPU node.
        assert pod.spec.node_name in cluster.cpu_nodes
