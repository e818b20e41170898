"""Fixtures for the real-pods e2e run (`make e2e`).

One cluster for the session: two node containers, the project's images built and
loaded into them, the chart installed, and the quickstart teacher and data on a
host folder that every node mounts (hostPath PVs play ReadWriteMany).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster.cluster import ATTACH_ENV, E2ECluster, attach_cluster, shared_root, start_cluster
from .cluster.nodes import docker_env
from .support import REPO, Timer, image_tag

NAMESPACE = "e2e"
RELEASE = "kdistill"
OPERATOR_NS = "kdistill-system"


@pytest.fixture(scope="session")
def timer(request: pytest.FixtureRequest) -> Iterator[Timer]:
    t = Timer()
    yield t
    t.report(passed=request.session.testsfailed == 0)


@pytest.fixture(scope="session")
def images(timer: Timer) -> dict[str, str]:
    """Builds the operator and trainer images (docker's cache makes a warm build quick)."""
    tag = image_tag()
    with timer.step("build images"):
        if not os.environ.get("KDISTILL_E2E_SKIP_BUILD"):
            subprocess.run([str(REPO / "scripts" / "images.sh")], check=True, env=docker_env(), cwd=REPO)
    return {"operator": f"kdistill/operator:{tag}", "trainer": f"kdistill/trainer:{tag}"}


@pytest.fixture(scope="session")
def pvc_root(timer: Timer) -> Path:
    """The quickstart teacher and its data, made once and cached under the shared folder."""
    root = shared_root() / "pvc"
    teacher = root / "models" / "quickstart-teacher" / "model.safetensors"
    with timer.step("quickstart teacher"):
        if not teacher.exists():
            env = dict(os.environ, OMP_NUM_THREADS="1")
            subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-P", "-m", "kdistill.trainer.teacher_pretrain",
                            "--pvc", str(root), "--steps", os.environ.get("KDISTILL_E2E_TEACHER_STEPS", "300")],
                           check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)  # fmt: skip
    assert teacher.exists()
    return root


@pytest.fixture(scope="session")
def cluster(images: dict[str, str], timer: Timer) -> Iterator[E2ECluster]:
    with timer.step("cluster up"):
        attach = os.environ.get(ATTACH_ENV)
        if attach:
            running = attach_cluster(Path(attach))
        else:
            subprocess.run([str(REPO / "scripts" / "e2e-prepare.sh")], check=True, cwd=REPO)
            running = start_cluster(2)
    try:
        with timer.step("load images"):
            for image in images.values():
                running.load_image(image)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def operator(cluster: E2ECluster, images: dict[str, str], timer: Timer) -> str:
    """The chart installed with the freshly built images; returns the release namespace."""
    tag = images["operator"].rsplit(":", 1)[1]
    with timer.step("helm install"):
        cluster.helm(
            "upgrade", "--install", RELEASE, str(REPO / "charts" / "kdistill"), "--namespace", OPERATOR_NS,
            "--create-namespace", "--set", f"image.operator.tag={tag}", "--set", f"image.trainer.tag={tag}",
            # A killed node counts as lost after this long (the chart's default is 30 s).
            "--set", "operator.nodeNotReadySeconds=10",
            # kopf names its peer identity after getpass.getuser(), which fails for a UID with no
            # /etc/passwd entry (the images run as 65532 and have none); USER answers it first.
            "--set-json", 'operator.extraEnv=[{"name": "USER", "value": "kdistill"}]',
            "--wait", "--timeout", "10m",
        )  # fmt: skip
    namespace = f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n"
    cluster.kubectl("apply", "-f", "-", input_text=namespace)
    return OPERATOR_NS


def wait(predicate: object, what: str, timeout: float, interval: float = 2.0) -> None:
    """Polls until `predicate()` is truthy."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
