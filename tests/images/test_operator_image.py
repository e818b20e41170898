"""The operator image: small, torch-free, non-root, and it starts against a real API server
with the chart's ServiceAccount and answers its health probe, hardened as in its pod."""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

import pytest

from tests.chart.helm import CHART
from tests.cluster.cluster import Cluster

from .docker import HARDENED, Docker, http_get, wait_http, world_readable

pytestmark = pytest.mark.cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_operator_image_is_small_non_root_and_has_no_torch(docker: Docker, operator_image: str) -> None:
    info = json.loads(docker("image", "inspect", operator_image).stdout)[0]
    assert info["Config"]["User"] == "65532:65532"
    # The operator's pod never needs torch; its image stays small.
    assert info["Size"] < 400e6, f"operator image is {info['Size'] / 1e6:.0f} MB"
    probe = docker("run", "--rm", *HARDENED, "--entrypoint", "python", operator_image, "-c",
                   "import importlib.util as u, os; "
                   "print(os.getuid(), u.find_spec('torch') is None, u.find_spec('kopf') is not None)")  # fmt: skip
    assert probe.stdout.split() == ["65532", "True", "True"]


def test_operator_image_starts_with_the_charts_serviceaccount_and_answers_its_probe(
    docker: Docker, operator_image: str, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.install_crd()
    ns = cluster.create_namespace("kd-img")
    # The chart's RBAC and ServiceAccount; no operator pod (kwok could not run it anyway).
    cluster.helm("install", "kdistill", str(CHART), "--namespace", ns, "--set", "crds.install=false",
                 "--set", "operator.replicas=0", "--wait=false")  # fmt: skip
    try:
        kubeconfig = cluster.serviceaccount_kubeconfig(ns, "kdistill-operator")
        mounted = tmp_path / "kube" / "config"
        mounted.parent.mkdir()
        mounted.write_text(kubeconfig.read_text())
        world_readable(tmp_path / "kube")
        health, metrics = free_port(), free_port()
        name = f"kdistill-operator-test-{uuid.uuid4().hex[:6]}"
        docker("run", "-d", "--name", name, "--network", "host", *HARDENED,
               "-v", f"{mounted.parent}:/kube:ro", "-e", "KUBECONFIG=/kube/config", "-e", f"POD_NAMESPACE={ns}",
               operator_image, "operator", f"--health-port={health}", f"--metrics-port={metrics}")  # fmt: skip
        try:

            def alive() -> bool:
                return docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"

            try:
                wait_http(f"http://127.0.0.1:{health}/healthz", 90, alive)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\noperator log:\n{docker.logs(name)[-6000:]}") from None
            # /healthz answers already while the replica waits for the Lease (standby.py):
            # leading comes a moment later.
            deadline = time.monotonic() + 60
            while True:
                status, body = http_get(f"http://127.0.0.1:{metrics}/metrics")
                if (status == 200 and "kdistill_leader 1.0" in body) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert status == 200
            assert "kdistill_leader 1.0" in body, docker.logs(name)[-4000:]
            logs = docker.logs(name)
            assert "Forbidden" not in logs and " 403" not in logs, logs[-4000:]
            # SIGTERM: kopf stops and the process exits cleanly, well inside a pod's grace period.
            docker("stop", "--time", "30", name, timeout=60)
            state = json.loads(docker("inspect", name).stdout)[0]["State"]
            assert state["ExitCode"] == 0, docker.logs(name)[-4000:]
        finally:
            docker.remove(name)
    finally:
        cluster.helm("uninstall", "kdistill", "--namespace", ns)
        cluster.core().delete_namespace(ns)
