"""Node containers: create, configure, kill, restart, and load images into them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .layout import CLUSTER_CIDR, DNS_DOMAIN, GATEWAY, LABEL, NETWORK, SUBNET, NodeAddr

DOCKER_HOST = "unix:///run/kdistill-docker/docker.sock"  # scripts/dockerd.sh's daemon
# Inside each node's containerd volume: one empty file per docker image ID imported.
LOADED_MARKERS = "/var/lib/containerd/kdistill-loaded"


def docker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DOCKER_HOST", DOCKER_HOST)
    return env


def docker(*args: str, check: bool = True, input_bytes: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, env=docker_env(), input=input_bytes)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                      proc.stderr.decode(errors="replace"))  # fmt: skip
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... failed ({proc.returncode}): {out.stderr.strip()}")
    return out


def ensure_network() -> None:
    found = docker("network", "inspect", NETWORK, "--format", "{{(index .IPAM.Config 0).Subnet}}", check=False)
    if found.returncode == 0:
        if found.stdout.strip() != SUBNET:
            raise RuntimeError(f"docker network {NETWORK} exists with subnet {found.stdout.strip()}, want {SUBNET}")
        return
    docker("network", "create", "--driver=bridge", f"--subnet={SUBNET}", f"--gateway={GATEWAY}",
           "--label", LABEL, NETWORK)  # fmt: skip


def remove_leftovers() -> None:
    """Node containers of an earlier run that was killed before it could clean up."""
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}").stdout.split()
    if ids:
        docker("rm", "-f", "-v", *ids)


def kubelet_config(node: NodeAddr) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # The API server cannot verify the kubelets' self-signed serving certificates
        # or present a client certificate to them; logs/exec then need these.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,  # this VM has cgroup v1
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "clusterDNS": [GATEWAY],
        "clusterDomain": DNS_DOMAIN,
        "resolvConf": "/etc/kdistill-node/resolv.conf",
        "podCIDR": node.pod_cidr,
        "failSwapOn": False,
        # Fast, for tests: a lease renewed every 3 s; the controller-manager's 20 s grace
        # then notices a dead node within seconds, like a tuned production cluster.
        "nodeStatusUpdateFrequency": "4s",
        "nodeLeaseDurationSeconds": 12,
        # The disk is shared with other work; never evict pods for it.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "0%",
            "nodefs.inodesFree": "0%",
            "imagefs.available": "0%",
        },
        "imageGCHighThresholdPercent": 100,
        "serializeImagePulls": False,
        "kubeAPIQPS": 50,
        "kubeAPIBurst": 100,
    }


def kube_proxy_config() -> dict[str, object]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": "/etc/kdistill-node/kube-proxy.kubeconfig"},
        "mode": "iptables",
        "clusterCIDR": CLUSTER_CIDR,
        # conntrack limits are host-wide sysctls: leave the shared VM's alone.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False},
    }


@dataclass
class Node:
    addr: NodeAddr
    image: str
    config_dir: Path
    log_dir: Path
    shared_dirs: tuple[Path, ...]  # mounted at the same path in every node (hostPath volumes)

    @property
    def name(self) -> str:
        return self.addr.name

    @property
    def containerd_volume(self) -> str:
        return f"{self.name}-containerd"

    def write_config(self, all_nodes: list[NodeAddr], kubelet_kc: Path, proxy_kc: Path) -> None:
        d = self.config_dir
        d.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        routes = " ".join(f"{n.pod_cidr}={n.ip}" for n in all_nodes if n != self.addr)
        (d / "node.env").write_text(
            f"NODE_NAME={self.name}\nNODE_IP={self.addr.ip}\nPOD_CIDR={self.addr.pod_cidr}\n"
            f"CLUSTER_CIDR={CLUSTER_CIDR}\nROUTES='{routes}'\n"
        )
        (d / "resolv.conf").write_text(f"nameserver {GATEWAY}\n")
        (d / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(self.addr)))
        (d / "kube-proxy.yaml").write_text(yaml.safe_dump(kube_proxy_config()))
        (d / "kubelet.kubeconfig").write_bytes(kubelet_kc.read_bytes())
        (d / "kube-proxy.kubeconfig").write_bytes(proxy_kc.read_bytes())

    def create(self) -> None:
        mounts: list[str] = [
            "-v", f"{self.config_dir}:/etc/kdistill-node:ro",
            "-v", f"{self.log_dir}:/var/log/kdistill",
            "-v", "/lib/modules:/lib/modules:ro",
        ]  # fmt: skip
        for shared in self.shared_dirs:
            mounts += ["-v", f"{shared}:{shared}"]
        docker(
            "run", "-d", "--name", self.name, "--hostname", self.name, "--label", LABEL,
            # --privileged works through scripts/dockerd.sh's runtime shim, which drops the
            # one capability (CAP_SYS_RESOURCE) this VM cannot grant.
            "--privileged", "--cgroupns=private",
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
            "--tmpfs", "/run", "--tmpfs", "/tmp",
            "--network", NETWORK, "--ip", self.addr.ip,
            # A named volume outlives the node: images loaded once stay for the next cluster.
            "-v", f"{self.containerd_volume}:/var/lib/containerd",
            *mounts, self.image,
        )  # fmt: skip

    def kill(self) -> None:
        """A power cut: SIGKILL to everything in the node, pods included."""
        docker("kill", self.name)

    def start(self) -> None:
        """Boots a stopped node again; containerd's images survive on its volume."""
        docker("start", self.name)

    def running(self) -> bool:
        out = docker("inspect", "-f", "{{.State.Running}}", self.name, check=False)
        return out.stdout.strip() == "true"

    def remove(self, keep_images: bool = True) -> None:
        docker("rm", "-f", "-v", self.name, check=False)
        if not keep_images:
            docker("volume", "rm", self.containerd_volume, check=False)

    def has_image(self, image_id: str) -> bool:
        """Whether `image_id` (docker's ID) was imported into this node's store before."""
        marker = f"{LOADED_MARKERS}/{image_id.replace(':', '-')}"
        return docker("exec", self.name, "test", "-e", marker, check=False).returncode == 0

    def mark_image(self, image_id: str) -> None:
        marker = f"{LOADED_MARKERS}/{image_id.replace(':', '-')}"
        docker("exec", self.name, "sh", "-c", f"mkdir -p {LOADED_MARKERS} && touch {marker}")

    def drop_image(self, image: str) -> None:
        """Removes the earlier build held under `image`'s tag and lets containerd collect its
        layers at once: the volume keeps every build otherwise, and two builds of the multi-GB
        trainer image per node do not fit on the disk. The markers go too (one of them may name
        a build that docker's cache gives back later).

        The CRI plugin adds a `sha256:<image id>` reference beside every tag it sees, and that
        reference alone keeps all the layers; so every reference to the tag's manifest goes,
        and so does any ID reference left without a name by an earlier run."""
        ref = image if "." in image.split("/", 1)[0] else f"docker.io/{image}"
        listing = docker("exec", self.name, "ctr", "-n", "k8s.io", "images", "ls", check=False).stdout
        for stale in refs_to_drop(listing, ref):
            docker("exec", self.name, "ctr", "-n", "k8s.io", "images", "rm", "--sync", stale, check=False)
        docker("exec", self.name, "rm", "-rf", LOADED_MARKERS, check=False)

    def exec(self, *argv: str, input_bytes: bytes | None = None) -> str:
        return docker("exec", "-i", self.name, *argv, input_bytes=input_bytes).stdout

    def wait_containerd(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"node {self.name} exited; see {self.log_dir}")
            if docker("exec", self.name, "ctr", "version", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"containerd did not answer on {self.name} within {timeout:.0f}s")


def refs_to_drop(listing: str, ref: str) -> list[str]:
    """The references of a `ctr images ls` listing to remove before `ref` is imported again.

    Those are `ref`, every reference to the same manifest (the CRI plugin's `sha256:<id>` one),
    and every `sha256:` reference whose manifest no named reference shares: an earlier build's,
    which nothing can use and which holds its layers on the disk.
    """
    rows = [line.split() for line in listing.splitlines()[1:] if line.strip()]
    digest_of = {row[0]: row[2] for row in rows if len(row) >= 3}
    named = {digest for name, digest in digest_of.items() if not name.startswith("sha256:")}
    drop_digest = digest_of.get(ref)
    return [
        name
        for name, digest in digest_of.items()
        if name == ref or digest == drop_digest or (name.startswith("sha256:") and digest not in named)
    ]


def free_bytes_for_images() -> int | None:
    """Free bytes where docker keeps the nodes' containerd volumes; None when it cannot be read."""
    root = docker("info", "-f", "{{.DockerRootDir}}", check=False).stdout.strip()
    if not root or not Path(root).exists():
        return None
    stat = os.statvfs(root)
    return stat.f_bavail * stat.f_frsize


def image_bytes(image: str) -> int:
    return int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout.strip())


def load_image(nodes: list[Node], image: str) -> float:
    """`ctr import` of `image` into every node that lacks it, from one `docker save` stream. Returns seconds.

    The trainer image is several GB: the one stream is copied to all imports at once, so
    nothing is written to disk twice (no tar file) and nodes import side by side. A node
    that imported this image ID before (its marker, on the containerd volume) is skipped.
    """
    t0 = time.monotonic()
    image_id = docker("image", "inspect", "-f", "{{.Id}}", image).stdout.strip()
    nodes = [n for n in nodes if not n.has_image(image_id)]
    if not nodes:
        return 0.0
    for node in nodes:
        node.drop_image(image)
    # Each node holds the layers twice (the archive's blobs and the unpacked snapshots).
    needed, free = 2 * image_bytes(image) * len(nodes), free_bytes_for_images()
    if free is not None and free < needed:
        raise RuntimeError(
            f"loading {image} into {len(nodes)} nodes needs about {needed / 1e9:.1f} GB free in docker's "
            f"data root and {free / 1e9:.1f} GB is free; `docker volume rm` old kdistill-e2e-node*-containerd "
            "volumes or `docker image prune` to make room"
        )
    errors = _stream_import(image, nodes)
    if errors:
        raise RuntimeError(f"loading {image} failed: " + "; ".join(errors))
    for node in nodes:
        node.mark_image(image_id)
    return time.monotonic() - t0


def _stream_import(image: str, nodes: list[Node]) -> list[str]:
    """Feeds `docker save` to one `ctr import` per node; returns an error line per failed step."""
    env = docker_env()
    with contextlib.ExitStack() as stack:
        # stderr to files: a pipe nobody reads could fill and stall an import.
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(len(nodes) + 1)]
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE, stderr=logs[0], env=env)
        ctr_import = ["ctr", "-n", "k8s.io", "images", "import", "--all-platforms", "-"]
        imports = []
        for node, log in zip(nodes, logs[1:], strict=True):
            argv = ["docker", "exec", "-i", node.name, *ctr_import]
            pipe, out = subprocess.PIPE, subprocess.DEVNULL
            imports.append(subprocess.Popen(argv, stdin=pipe, stdout=out, stderr=log, env=env))
        assert save.stdout is not None
        alive = list(imports)
        while chunk := save.stdout.read(4 << 20):
            for proc in list(alive):
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(chunk)
                except BrokenPipeError:  # that import failed; its stderr says why
                    alive.remove(proc)
        for proc in imports:
            with contextlib.suppress(BrokenPipeError):
                assert proc.stdin is not None
                proc.stdin.close()
        codes = [save.wait(), *(proc.wait() for proc in imports)]
        errors = []
        for name, code, log in zip(["docker save", *(n.name for n in nodes)], codes, logs, strict=True):
            if code != 0:
                log.seek(0)
                errors.append(f"{name}: exit {code}: {log.read().decode(errors='replace').strip()[-2000:]}")
        return errors
