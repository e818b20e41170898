"""The whole e2e cluster: control plane + CoreDNS on the host, N node containers."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config

from tests.cluster.binaries import Binaries, cache_root, locate, versions
from tests.cluster.controlplane import ControlPlane, Timings
from tests.cluster.procs import wait_for

from . import coredns, layout
from .nodes import Node, docker, ensure_network, load_image, remove_leftovers

NODE_IMAGE_ENV = "KDISTILL_E2E_NODE_IMAGE"


def node_image() -> str:
    return os.environ.get(NODE_IMAGE_ENV) or f"kdistill/node:{versions()['k8s']}"


# Real kubelets renew their lease every few seconds (see nodes.py): 20 s of silence makes
# a node NotReady, and its pods are evicted 2 s later.
NODE_TIMINGS = Timings(node_monitor_period="2s", node_monitor_grace_period="20s", node_startup_grace_period="60s",
                       eviction_toleration_seconds=2)  # fmt: skip


def control_plane(bins: Binaries, workdir: Path, node_names: list[str], admin_kubeconfig: Path | None = None,
                  ) -> ControlPlane:  # fmt: skip
    """tests/cluster's control plane, with the API server on the docker network's gateway.

    Static tokens for each kubelet (so that NodeRestriction applies), kube-proxy and CoreDNS.
    """
    users = {f"system:node:{name}": "system:nodes" for name in node_names}
    users.update({"system:kube-proxy": "", "kdistill-coredns": "system:masters"})
    return ControlPlane(bins, workdir, NODE_TIMINGS, api_host=layout.GATEWAY, extra_users=users,
                        admin_kubeconfig=admin_kubeconfig)  # fmt: skip


def shared_root() -> Path:
    """Host folder mounted at the same path in every node: it backs hostPath volumes (RWX)."""
    return cache_root() / "e2e" / "shared"


@dataclass
class E2ECluster:
    workdir: Path
    control_plane: ControlPlane
    nodes: list[Node]
    kubectl_binary: str
    helm_binary: str
    startup_seconds: float = 0.0
    attached: bool = False  # someone else's `make e2e-cluster`: never stopped from here
    _dns: Any = None
    _stopped: bool = field(default=False)

    @property
    def kubeconfig(self) -> Path:
        assert self.control_plane.admin_kubeconfig is not None
        return self.control_plane.admin_kubeconfig

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(str(self.kubeconfig))

    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client())

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120,
                input_text: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        proc = subprocess.run([self.kubectl_binary, *args], capture_output=True, text=True, env=self.env(),
                              timeout=timeout, input=input_text)  # fmt: skip
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def helm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.helm_binary, *args], capture_output=True, text=True, env=self.env(),
                              timeout=timeout)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def load_image(self, image: str) -> float:
        return load_image([n for n in self.nodes if n.running()], image)

    def node_ready(self, name: str) -> str:
        node = self.core().read_node(name)
        return next((c.status for c in node.status.conditions or [] if c.type == "Ready"), "Unknown")

    def wait_nodes_ready(self, timeout: float = 180) -> None:
        def ready() -> bool:
            for n in self.nodes:
                if not n.running():
                    raise RuntimeError(f"node container {n.name} exited; logs in {n.log_dir}")
            return all(self.node_ready(n.name) == "True" for n in self.nodes)

        wait_for(ready, "all nodes Ready", timeout, interval=1.0, procs=self.control_plane.processes)

    def check_alive(self) -> None:
        self.control_plane.check_alive()

    def stop(self) -> None:
        if self._stopped or self.attached:
            return
        self._stopped = True
        for n in self.nodes:
            n.remove()
        self.control_plane.stop()
        if not os.environ.get("KDISTILL_KEEP_CLUSTER_DIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> E2ECluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(node_count: int = 2) -> E2ECluster:
    """Starts everything; on any failure, removes what it started."""
    t0 = time.monotonic()
    bins = locate(required=("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "helm"))
    image = node_image()
    if docker("image", "inspect", image, check=False).returncode != 0:
        raise RuntimeError(f"node image {image} is missing: run scripts/e2e-images.sh")
    remove_leftovers()
    ensure_network()
    workdir = Path(tempfile.mkdtemp(prefix="kdistill-e2e-"))
    addrs = layout.nodes(node_count)
    cp = control_plane(bins, workdir, [a.name for a in addrs])
    shared = shared_root()
    shared.mkdir(parents=True, exist_ok=True)
    nodes = [Node(a, image, workdir / "nodes" / a.name, workdir / "logs" / a.name, (shared,)) for a in addrs]
    cluster = E2ECluster(workdir, cp, nodes, str(bins["kubectl"]), str(bins["helm"]))
    try:
        cp.start()
        cluster._dns = coredns.start(workdir, cp.kubeconfig_for("kdistill-coredns", workdir / "kubeconfigs" /
                                                                "coredns.yaml"))  # fmt: skip
        cp.add(cluster._dns)
        proxy_kc = cp.kubeconfig_for("system:kube-proxy", workdir / "kubeconfigs" / "kube-proxy.yaml")
        for n in nodes:
            kubelet_kc = cp.kubeconfig_for(f"system:node:{n.name}", workdir / "kubeconfigs" / f"{n.name}.yaml")
            n.write_config(addrs, kubelet_kc, proxy_kc)
            n.create()
        cluster.wait_nodes_ready()
        core = cluster.core()
        wait_for(lambda: core.read_namespaced_service_account("default", "default"), "default ServiceAccount", 60)
    except BaseException:
        cluster.stop()
        raise
    cluster.startup_seconds = time.monotonic() - t0
    return cluster


ATTACH_ENV = "KDISTILL_E2E_ATTACH"


def attach_cluster(workdir: Path) -> E2ECluster:
    """A cluster that `make e2e-cluster` runs (its folder is printed there), for quick reruns of e2e/."""
    bins = locate(required=("kubectl", "helm"))
    kubeconfig = workdir / "kubeconfigs" / "admin.yaml"
    if not kubeconfig.exists():
        raise FileNotFoundError(f"{kubeconfig} is missing: is {workdir} a running e2e cluster's folder?")
    names = docker("ps", "--filter", f"label={layout.LABEL}", "--format", "{{.Names}}").stdout.split()
    addrs = [a for a in layout.nodes(20) if a.name in names]
    cp = control_plane(bins, workdir, [a.name for a in addrs], admin_kubeconfig=kubeconfig)
    shared = shared_root()
    nodes = [Node(a, node_image(), workdir / "nodes" / a.name, workdir / "logs" / a.name, (shared,)) for a in addrs]
    return E2ECluster(workdir, cp, nodes, str(bins["kubectl"]), str(bins["helm"]), attached=True)
