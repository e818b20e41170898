"""etcd, kube-apiserver, kube-controller-manager and kube-scheduler as plain processes.

Everything listens on 127.0.0.1 on free ports and keeps its data in one temporary
folder. The timeouts that decide how fast a lost node is noticed and its pods
evicted are shortened so that tests see it within seconds.

The e2e cluster (e2e/cluster, real kubelets in node containers) uses the same control
plane with the API server bound to an address the nodes reach (`api_host`) and static
tokens for its kubelets, kube-proxy and CoreDNS (`extra_users`).
"""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .binaries import Binaries
from .kubeconfig import write_kubeconfig
from .pki import Pki, make_pki
from .procs import Process, stop_all, wait_for

SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Timings:
    """Controller timings. Real clusters use 5s / 40s / 300s for node failures; tests want seconds."""

    node_monitor_period: str = "1s"
    # Well above kwok's 1 s lease renewals, so a loaded CI machine does not flap nodes.
    node_monitor_grace_period: str = "15s"
    node_startup_grace_period: str = "20s"
    # Default tolerations of not-ready/unreachable taints that the DefaultTolerationSeconds
    # admission plugin adds to every pod: how long a pod stays on a lost node.
    eviction_toleration_seconds: int = 2
    # How often the PV controller resyncs claims (real clusters: 15s). A claim created with its
    # volume pre-bound is often seen before that volume reaches the controller's cache, and then
    # binds only at the next resync: each test's claims would wait up to 30 s for nothing.
    pv_binder_sync_period: str = "1s"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _get(url: str, context: ssl.SSLContext | None = None, token: str | None = None) -> bool:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=3, context=context) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _insecure() -> ssl.SSLContext:
    # The controller-manager and scheduler serve /healthz with self-signed certs.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class ControlPlane:
    bins: Binaries
    workdir: Path
    timings: Timings = field(default_factory=Timings)
    # Where the API server listens. Off loopback, the `kubernetes` Service gets real
    # endpoints (pods reach the API server through it) and the certificate names it.
    api_host: str = "127.0.0.1"
    extra_users: Mapping[str, str] = field(default_factory=dict)  # user -> groups, with static tokens
    processes: list[Process] = field(default_factory=list)
    pki: Pki | None = None
    server: str = ""
    admin_kubeconfig: Path | None = None
    kwok_kubeconfig: Path | None = None

    @property
    def loopback(self) -> bool:
        return self.api_host.startswith("127.")

    def kubeconfig_for(self, user: str, path: Path) -> Path:
        """A kubeconfig for one of `extra_users` (or a built-in role), with its static token."""
        assert self.pki is not None, "the control plane is not started"
        return write_kubeconfig(path, self.server, self.pki.ca_cert, user, self.pki.tokens[user])

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        w = self.workdir
        logs = w / "logs"
        sans = () if self.loopback else (f"IP:{self.api_host}",)
        self.pki = pki = make_pki(w / "pki", sans, self.extra_users)

        etcd_port, etcd_peer = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        etcd = self._run("etcd", [
            str(self.bins["etcd"]), "--name=default", f"--data-dir={w / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
            # A test cluster's data is thrown away; fsync only costs time.
            "--unsafe-no-fsync", "--log-level=warn",
        ], logs)  # fmt: skip
        wait_for(lambda: _get(f"{etcd_url}/health"), "etcd /health", 30, procs=[etcd])

        host = self.api_host
        api_port = free_port(host)
        self.server = f"https://{host}:{api_port}"
        tolerate = str(self.timings.eviction_toleration_seconds)
        # Endpoints may not hold loopback addresses, so there the `kubernetes` Service gets none;
        # off loopback there are real kubelets, which logs/exec reach by address.
        by_host = "--endpoint-reconciler-type=none" if self.loopback else "--kubelet-preferred-address-types=InternalIP"
        apiserver = self._run("kube-apiserver", [
            str(self.bins["kube-apiserver"]),
            f"--etcd-servers={etcd_url}",
            f"--bind-address={host}", f"--advertise-address={host}", f"--secure-port={api_port}",
            f"--tls-cert-file={pki.server_cert}", f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_cert}", f"--token-auth-file={pki.token_file}",
            f"--requestheader-client-ca-file={pki.ca_cert}", "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.proxy_cert}", f"--proxy-client-key-file={pki.proxy_key}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            by_host,
            f"--cert-dir={w / 'apiserver'}",
            "--allow-privileged=true",
            # As on managed GPU clusters: pods that request nvidia.com/gpu tolerate the GPU taint.
            # NodeRestriction: real kubelets (off loopback) may change only their own Node and pods.
            "--enable-admission-plugins=ExtendedResourceToleration" + ("" if self.loopback else ",NodeRestriction"),
            f"--default-not-ready-toleration-seconds={tolerate}",
            f"--default-unreachable-toleration-seconds={tolerate}",
            "--profiling=false", "--v=1",
        ], logs)  # fmt: skip
        ca_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        admin_token = pki.tokens["admin"]
        wait_for(lambda: _get(f"{self.server}/readyz", ca_ctx, admin_token), "kube-apiserver /readyz", 120,
                 procs=[etcd, apiserver])  # fmt: skip

        kc = w / "kubeconfigs"
        self.admin_kubeconfig = write_kubeconfig(kc / "admin.yaml", self.server, pki.ca_cert, "kdistill-admin",
                                                 admin_token)  # fmt: skip
        self.kwok_kubeconfig = write_kubeconfig(kc / "kwok.yaml", self.server, pki.ca_cert, "kdistill-kwok",
                                                pki.tokens["kwok"])  # fmt: skip
        cm_kc = write_kubeconfig(kc / "controller-manager.yaml", self.server, pki.ca_cert,
                                 "system:kube-controller-manager", pki.tokens["controller-manager"])  # fmt: skip
        sched_kc = write_kubeconfig(kc / "scheduler.yaml", self.server, pki.ca_cert, "system:kube-scheduler",
                                    pki.tokens["scheduler"])  # fmt: skip

        t = self.timings
        cm_port = free_port()
        cm = self._run("kube-controller-manager", [
            str(self.bins["kube-controller-manager"]),
            f"--kubeconfig={cm_kc}", f"--authentication-kubeconfig={cm_kc}", f"--authorization-kubeconfig={cm_kc}",
            "--bind-address=127.0.0.1", f"--secure-port={cm_port}", f"--cert-dir={w / 'controller-manager'}",
            "--leader-elect=false",
            # Each controller acts as its own ServiceAccount, with the bootstrap RBAC roles.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}", f"--cluster-signing-key-file={pki.ca_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*",
            f"--node-monitor-period={t.node_monitor_period}",
            f"--node-monitor-grace-period={t.node_monitor_grace_period}",
            f"--node-startup-grace-period={t.node_startup_grace_period}",
            f"--pvclaimbinder-sync-period={t.pv_binder_sync_period}",
            "--profiling=false", "--v=1",
        ], logs)  # fmt: skip
        sched_port = free_port()
        sched = self._run("kube-scheduler", [
            str(self.bins["kube-scheduler"]),
            f"--kubeconfig={sched_kc}", f"--authentication-kubeconfig={sched_kc}",
            f"--authorization-kubeconfig={sched_kc}",
            "--bind-address=127.0.0.1", f"--secure-port={sched_port}", f"--cert-dir={w / 'scheduler'}",
            "--leader-elect=false", "--profiling=false", "--v=1",
        ], logs)  # fmt: skip
        insecure = _insecure()
        wait_for(lambda: _get(f"https://127.0.0.1:{cm_port}/healthz", insecure), "kube-controller-manager /healthz",
                 90, procs=[etcd, apiserver, cm, sched])  # fmt: skip
        wait_for(lambda: _get(f"https://127.0.0.1:{sched_port}/healthz", insecure), "kube-scheduler /healthz",
                 90, procs=[etcd, apiserver, cm, sched])  # fmt: skip

    def _run(self, name: str, argv: list[str], logs: Path) -> Process:
        proc = Process(name, argv, logs / f"{name}.log")
        self.processes.append(proc)
        return proc

    def add(self, proc: Process) -> None:
        """Adopts a process (kwok) so that it is stopped with the control plane."""
        self.processes.append(proc)

    def check_alive(self) -> None:
        for proc in self.processes:
            proc.check_alive()

    def stop(self) -> None:
        stop_all(self.processes)
        self.processes.clear()
