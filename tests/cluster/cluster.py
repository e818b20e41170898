"""The test cluster: a local control plane plus kwok GPU nodes, or an existing cluster.

With ``KDISTILL_TEST_KUBECONFIG`` set, the tests use that cluster (kind, for
example) instead: only kwok is started against it, to add the same fake GPU nodes,
which are deleted again at the end. There the GPU nodes are not tainted, because
kind does not enable the ExtendedResourceToleration admission plugin.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from . import kwok
from .binaries import REPO, Binaries, locate
from .controlplane import ControlPlane, Timings
from .kubeconfig import write_token_kubeconfig
from .procs import Process, wait_for

EXTERNAL_ENV = "KDISTILL_TEST_KUBECONFIG"


class CommandError(subprocess.CalledProcessError):
    """A failed kubectl/helm call whose message carries the tool's own error output."""

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}: {(self.stderr or self.stdout or '').strip()}"


@dataclass
class Cluster:
    """A running cluster and the helpers tests use on it."""

    kubeconfig: Path
    workdir: Path
    kubectl_binary: str
    gpu_nodes: list[str]
    cpu_nodes: list[str]
    gpus_per_node: int
    external: bool
    startup_seconds: float = 0.0
    helm_binary: str | None = None
    _control_plane: ControlPlane | None = None
    _kwok: Process | None = None
    _stopped: bool = False
    _cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        return self.gpu_nodes + self.cpu_nodes

    # -- clients -----------------------------------------------------------------------
    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client())

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG and kubectl on PATH, for subprocesses such as the operator."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        env["PATH"] = f"{Path(self.kubectl_binary).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Runs kubectl against the cluster (as admin unless `kubeconfig` is given); CommandError if it fails."""
        argv = [self.kubectl_binary, f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def helm(
        self, *args: str, kubeconfig: Path | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs the pinned helm against the cluster; CommandError if it fails."""
        if self.helm_binary is None:
            raise RuntimeError("helm is not built: run `make cluster-bins`")
        argv = [self.helm_binary, f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise CommandError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def serviceaccount_kubeconfig(self, namespace: str, name: str, expiration_seconds: int = 3600) -> Path:
        """A kubeconfig that authenticates as ServiceAccount namespace/name (a TokenRequest token)."""
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
        )
        resp = self.core().create_namespaced_service_account_token(name, namespace, request)
        path = self.workdir / "kubeconfigs" / f"sa-{namespace}-{name}-{uuid.uuid4().hex[:6]}.yaml"
        return write_token_kubeconfig(path, self.kubeconfig, f"system:serviceaccount:{namespace}:{name}",
                                      resp.status.token)  # fmt: skip

    def install_crd(self, path: Path | None = None) -> None:
        """Applies a CRD (by default the project's generated one) and waits until it is served."""
        crd = path or REPO / "crds" / "kdistill.io_distillationjobs.yaml"
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
        # Polled here, not with `kubectl wait`: that fails at once ("accessor error") when it reads
        # the CRD before the API server has written any status condition, which a loaded machine
        # makes likely.
        name = yaml.safe_load(crd.read_text())["metadata"]["name"]
        api = client.ApiextensionsV1Api(self.api_client())

        def established() -> bool:
            conditions = api.read_custom_resource_definition(name).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        wait_for(established, f"CRD {name} Established", 60)

    def create_namespace(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.core().create_namespace({"metadata": {"name": name}})
        # Pods are refused until the ServiceAccount controller made "default".
        wait_for(lambda: self.core().read_namespaced_service_account("default", name), f"{name}/default SA", 30)
        return name

    # -- failures ----------------------------------------------------------------------
    def stop_node_heartbeats(self, name: str) -> None:
        """The node goes silent; see tests.cluster.kwok for what the controllers then do."""
        kwok.stop_heartbeats(self.core(), name)

    def resume_node_heartbeats(self, name: str, timeout: float = 60.0) -> None:
        kwok.resume_heartbeats(self.core(), name)
        self.wait_node_ready(name, "True", timeout)

    def delete_node(self, name: str) -> None:
        self.core().delete_node(name)
        self.gpu_nodes = [n for n in self.gpu_nodes if n != name]
        self.cpu_nodes = [n for n in self.cpu_nodes if n != name]

    def wait_node_ready(self, name: str, status: str, timeout: float = 60.0) -> None:
        """Waits until the node's Ready condition is `status` ("True", "False" or "Unknown")."""
        core = self.core()
        wait_for(lambda: kwok.node_ready(core, name) == status, f"node {name} Ready={status}", timeout)

    def fail_pod(
        self, namespace: str, name: str, exit_code: int = 1, message: str | dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> None:  # fmt: skip
        """The pod's containers exit with `exit_code` and termination `message`; the pod ends Failed."""
        if exit_code == 0:
            raise ValueError("a failing pod needs a non-zero exit code")
        kwok.set_pod_outcome(self.core(), namespace, name, succeed=False, exit_code=exit_code, message=message,
                             reason=reason, delay="0s")  # fmt: skip

    def succeed_pod(self, namespace: str, name: str, message: str | dict[str, Any] | None = None) -> None:
        kwok.set_pod_outcome(self.core(), namespace, name, succeed=True, message=message, delay="0s")

    # -- lifecycle ---------------------------------------------------------------------
    def check_alive(self) -> None:
        if self._control_plane is not None:
            self._control_plane.check_alive()
        if self._kwok is not None:
            self._kwok.check_alive()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for cleanup in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        if self._kwok is not None:
            self._kwok.stop()
        if self._control_plane is not None:
            self._control_plane.stop()
        _remove_workdir(self.workdir)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _remove_workdir(workdir: Path) -> None:
    # KDISTILL_KEEP_CLUSTER_DIR=1 keeps the logs and etcd data for a post-mortem.
    if not os.environ.get("KDISTILL_KEEP_CLUSTER_DIR"):
        shutil.rmtree(workdir, ignore_errors=True)


def _kubectl_binary(bins: Binaries | None) -> str:
    if bins is not None and os.access(bins["kubectl"], os.X_OK):
        return str(bins["kubectl"])
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: run `make cluster-bins` or put kubectl on PATH")
    return found


def start_cluster(
    gpu_nodes: int = 4, gpus_per_node: int = 4, cpu_nodes: int = 1, timings: Timings | None = None,
) -> Cluster:  # fmt: skip
    """Starts (or, with KDISTILL_TEST_KUBECONFIG, attaches to) a cluster with kwok GPU nodes."""
    started = time.monotonic()
    external = os.environ.get(EXTERNAL_ENV)
    suffix = uuid.uuid4().hex[:4] if external else ""
    gpu_names = [f"kwok-gpu-{suffix}{i}" for i in range(gpu_nodes)]
    cpu_names = [f"kwok-cpu-{suffix}{i}" for i in range(cpu_nodes)]
    control_plane: ControlPlane | None = None
    components = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl")
    bins = locate(required=("kwok",) if external else components)
    workdir = Path(tempfile.mkdtemp(prefix="kdistill-cluster-"))
    if external:
        kubeconfig = Path(external).resolve()
        kwok_kubeconfig = kubeconfig
    else:
        control_plane = ControlPlane(bins, workdir, timings or Timings())
        try:
            control_plane.start()  # stops whatever it started if it fails
        except BaseException:
            _remove_workdir(workdir)
            raise
        assert control_plane.admin_kubeconfig is not None and control_plane.kwok_kubeconfig is not None
        kubeconfig = control_plane.admin_kubeconfig
        kwok_kubeconfig = control_plane.kwok_kubeconfig
    helm = str(bins["helm"]) if os.access(bins["helm"], os.X_OK) else shutil.which("helm")
    cluster = Cluster(
        kubeconfig=kubeconfig, workdir=workdir, kubectl_binary=_kubectl_binary(bins), helm_binary=helm,
        gpu_nodes=gpu_names,
        cpu_nodes=cpu_names, gpus_per_node=gpus_per_node, external=bool(external), _control_plane=control_plane,
    )  # fmt: skip
    try:
        cluster._kwok = kwok.start_kwok(bins["kwok"], kwok_kubeconfig, workdir)
        core = cluster.core()
        specs = [kwok.NodeSpec(n, gpus=gpus_per_node, gpu_taint=not external) for n in gpu_names]
        specs += [kwok.NodeSpec(n) for n in cpu_names]
        kwok.create_nodes(core, specs)
        if external:
            cluster._cleanups.append(lambda: _delete_nodes(core, [s.name for s in specs]))
        wait_for(lambda: all(kwok.node_ready(core, s.name) == "True" for s in specs), "fake nodes Ready", 60,
                 procs=[cluster._kwok])  # fmt: skip
        wait_for(lambda: core.read_namespaced_service_account("default", "default"), "default ServiceAccount", 60)
    except BaseException:
        cluster.stop()
        raise
    cluster.startup_seconds = time.monotonic() - started
    return cluster


def _delete_nodes(core: client.CoreV1Api, names: list[str]) -> None:
    for name in names:
        try:
            core.delete_node(name)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
