"""Shared helpers of the operator integration tests: the CRD, the operator process, jobs, waiting."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client

from kdistill.api.metadata import LABEL_ATTEMPT, LABEL_INDEX
from tests.cluster import Cluster, start_cluster

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "kdistill.io_distillationjobs.yaml"
SCHEDULE_CRD = REPO / "crds" / "kdistill.io_distillationschedules.yaml"
GROUP, VERSION, PLURAL = "kdistill.io", "v1alpha1", "distillationjobs"
T = TypeVar("T")


def install_crd(cluster: Cluster, workdir: Path) -> None:
    """Install the generated CRDs exactly as committed (the operator watches both kinds)."""
    cluster.install_crd(SCHEDULE_CRD)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    # Polled here, not `kubectl wait`: right after the apply the CRD may have no status.conditions
    # yet, and kubectl wait then fails at once instead of waiting (seen on a loaded machine).
    ext = client.ApiextensionsV1Api(cluster.api_client())

    def established() -> bool:
        crd = ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        return any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or []))

    eventually(established, "the CRD established", 90)


def eventually(fn: Callable[[], T | None], what: str, timeout: float = 60.0, interval: float = 0.3) -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    value: Any = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except client.ApiException as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s: {what}"
        + (f" (last error: {last})" if last else "")
        + (f" (last value: {value!r})" if value is not None else "")
    )


class OperatorProcess:
    """The real operator, `kdistill operator`, as a subprocess with its own log file."""

    def __init__(
        self,
        cluster: Cluster,
        log_path: Path,
        *,
        namespace: str,
        lease_namespace: str,
        notready_seconds: float = 2.0,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.env = dict(env or {})
        self.log_path = log_path
        self.argv = [
            sys.executable,
            "-m",
            "kdistill.cli.main",
            "operator",
            "--namespace",
            namespace,
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--trainer-image",
            "kdistill/trainer:test",
            "--server-image",
            "kdistill/server:test",
            "--notready-seconds",
            str(notready_seconds),
            "--resync-seconds",
            "5",
            "--metrics-port",
            "0",
            "--health-port",
            "0",
            "--lease-namespace",
            lease_namespace,
            "--lease-duration",
            "4",
            "--lease-renew",
            "1",
            "--watch-server-timeout",
            "30",
            "--watch-client-timeout",
            "40",
            *(extra or []),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("KUBECONFIG", None)
        env.update(self.env)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up or release the lease."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def wait_started(self, timeout: float = 90.0) -> None:
        """Until kopf runs (and handles SIGTERM itself)."""
        eventually(
            lambda: (
                any("Activity 'startup' succeeded" in line.get("message", "") for line in self.log_lines())
                or not self.alive()
            ),
            "operator started",
            timeout,
        )
        assert self.alive(), self.log_path.read_text()[-3000:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def start_sized_cluster(pods: int) -> Cluster:
    """A cluster whose kwok GPU nodes hold `pods` one-GPU worker pods with room to spare after
    one node is lost: a kwok node takes 110 pods, like a kubelet's default."""
    nodes = max(8, -(-pods // 100) + 2)
    return start_cluster(gpu_nodes=nodes, gpus_per_node=max(4, -(-pods // (nodes - 2))), cpu_nodes=1)


def job_body(name: str, *, nodes: int = 2, gpus: int = 2, serving: bool = True, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": "pvc://models/teacher"},
            "student": {"fromTeacher": {"numLayers": 2}},
            "data": {"train": "pvc://data/train.jsonl", "eval": "pvc://data/eval.jsonl"},
            "distillation": {
                "stages": [{"name": "output", "steps": 100, "objectives": ["logits"]}],
                "batchSize": 8 * nodes * max(gpus, 1),
            },
            "quantization": {"mode": "ptq-int8"},
            "parallelism": {"nodes": nodes, "gpusPerNode": gpus, "student": {"data": nodes * max(gpus, 1)}},
            "checkpoint": {"volume": {"claimName": "ckpt"}},
            "failurePolicy": {"maxRestarts": 2, "backoffSeconds": 1, "pendingTimeoutSeconds": 600},
            "serving": {"enabled": serving, "replicas": 1, "qualityGate": {"minRetention": 0.9}},
        },
    }
    body["spec"].update(spec)
    return body


class Jobs:
    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster = cluster
        self.ns = namespace
        self.api = client.CustomObjectsApi(cluster.api_client())
        self.core = cluster.core()
        self.apps = client.AppsV1Api(cluster.api_client())

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.api.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def get(self, name: str) -> dict[str, Any]:
        return self.api.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def patch_progress(self, name: str, fields: dict[str, Any]) -> None:
        """Plays trainer rank 0: patches progress fields through the status subresource."""
        self.api.patch_namespaced_custom_object_status(GROUP, VERSION, self.ns, PLURAL, name, {"status": fields})

    def delete(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
            return True
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def pods(self, name: str) -> list[client.V1Pod]:
        items = self.core.list_namespaced_pod(self.ns, label_selector=f"kdistill.io/job={name}").items
        return sorted(items, key=lambda p: p.metadata.name)

    def live_pods(self, name: str) -> list[client.V1Pod]:
        return [
            p
            for p in self.pods(name)
            if p.metadata.deletion_timestamp is None and p.status.phase not in ("Succeeded", "Failed")
        ]

    def wait_phase(self, name: str, phase: str, timeout: float = 60.0) -> dict[str, Any]:
        return eventually(
            lambda: (s := self.status(name)).get("phase") == phase and s,
            f"{name} phase {phase} (now {self.status(name).get('phase')})",
            timeout,
        )

    def wait_running_gang(self, name: str, count: int, attempt: int, timeout: float = 60.0) -> list[Any]:
        def ready() -> list[Any] | None:
            pods = [
                p
                for p in self.live_pods(name)
                if p.metadata.labels.get(LABEL_ATTEMPT) == str(attempt) and p.status.phase == "Running"
            ]
            return pods if len(pods) == count else None

        return eventually(ready, f"{count} running pods of {name} gang attempt {attempt}", timeout)

    def events(self, name: str) -> list[client.CoreV1Event]:
        return self.core.list_namespaced_event(
            self.ns, field_selector=f"involvedObject.name={name},involvedObject.kind=DistillationJob"
        ).items

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        for cond in self.status(name).get("conditions") or []:
            if cond.get("type") == type_:
                return cond
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_claims(cluster: Cluster, namespace: str, claims: list[str]) -> None:
    """Bound PVCs (hostPath PVs bound by name): the scheduler refuses pods with unbound claims."""
    core = cluster.core()
    for claim in claims:
        pv = f"{namespace}-{claim}"
        core.create_persistent_volume(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany", "ReadWriteOnce"],
                    "hostPath": {"path": f"/tmp/kdistill-pv/{pv}"},
                    "storageClassName": "",
                    "persistentVolumeReclaimPolicy": "Retain",
                    "claimRef": {"namespace": namespace, "name": claim},
                },
            }
        )
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "resources": {"requests": {"storage": "1Gi"}},
                    "storageClassName": "",
                    "volumeName": pv,
                },
            },
        )
    eventually(
        lambda: all(core.read_namespaced_persistent_volume_claim(c, namespace).status.phase == "Bound" for c in claims),
        f"claims {claims} bound",
        60,
    )


def delete_claims(cluster: Cluster, namespace: str, claims: list[str]) -> None:
    core = cluster.core()
    for claim in claims:
        with contextlib.suppress(client.ApiException):
            core.delete_persistent_volume(f"{namespace}-{claim}")


CLAIMS = ["ckpt", "models", "data"]


def success_message(retention: float) -> dict[str, Any]:
    """What trainer rank 0 writes to /dev/termination-log on success."""
    return {
        "reason": "Succeeded",
        "retryable": False,
        "result": {
            "metrics": {"metric": "perplexity", "teacher": 12.0, "student": 12.0 / retention, "retention": retention},
            "steps": 300,
            "tokensPerSecond": 5400.0,
            "wallSeconds": 42.0,
        },
    }


def succeed_gang(cluster: Cluster, namespace: str, pods: list[Any], message: dict[str, Any]) -> None:
    """Every worker exits 0, rank 0 last with ``message`` (its termination message). The operator
    counts the job done when rank 0 has succeeded and then deletes the workers, so a rank still to
    be succeeded after it may already be gone."""

    def rank0(pod: Any) -> bool:
        return bool(pod.metadata.labels.get(LABEL_INDEX) == "0")

    for pod in sorted(pods, key=rank0):
        cluster.succeed_pod(namespace, pod.metadata.name, message=message if rank0(pod) else None)


@pytest.fixture(scope="module")
def lease_namespace(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    install_crd(cluster, tmp_path_factory.mktemp("crd"))
    return cluster.create_namespace("kdistill-system")


@pytest.fixture
def claims(cluster: Cluster, namespace: str) -> Iterator[str]:
    make_claims(cluster, namespace, CLAIMS)
    yield namespace
    delete_claims(cluster, namespace, CLAIMS)


def operator_for(cluster: Cluster, namespace: str, lease_namespace: str, log: Path, **kwargs: Any) -> OperatorProcess:
    return OperatorProcess(
        cluster,
        log,
        namespace=namespace,
        lease_namespace=lease_namespace,
        extra=["--lease-name", f"op-{namespace}"],
        **kwargs,
    )


@pytest.fixture
def env(cluster: Cluster, claims: str, lease_namespace: str, tmp_path: Path) -> Iterator[tuple[Jobs, OperatorProcess]]:
    """A namespace with bound claims and one running operator watching it."""
    op = operator_for(cluster, claims, lease_namespace, tmp_path / "operator.log").start()
    try:
        op.wait_started()
        yield Jobs(cluster, claims), op
    finally:
        code = op.stop()
        print(op.log_path.read_text()[-3000:])
        assert code == 0, f"operator exited {code}"
