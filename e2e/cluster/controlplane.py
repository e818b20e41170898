"""etcd, kube-apiserver, controller-manager and scheduler for real nodes.

tests/cluster's control plane listens on loopback only, where node containers
cannot reach it. This one reuses its PKI, process and kubeconfig helpers and
binds the API server to the docker network's gateway instead, with the
`kubernetes` Service pointing there (so in-cluster clients work through
kube-proxy) and static tokens for the kubelets, kube-proxy and CoreDNS.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.binaries import Binaries
from tests.cluster.kubeconfig import write_kubeconfig
from tests.cluster.pki import Pki, make_pki
from tests.cluster.procs import Process, stop_all, wait_for

from .layout import GATEWAY, SERVICE_CIDR

SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
_SERVER_SANS = (
    f"IP:{GATEWAY}", "IP:127.0.0.1", "IP:10.0.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local",
)  # fmt: skip


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ok(url: str, context: ssl.SSLContext, token: str | None = None) -> bool:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=3, context=context) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _reissue_server_cert(pki: Pki) -> None:
    """The API server's certificate again, now also valid for the gateway address."""
    subprocess.run(
        ["openssl", "req", "-x509", "-new", "-key", str(pki.server_key), "-out", str(pki.server_cert), "-days", "7",
         "-CA", str(pki.ca_cert), "-CAkey", str(pki.ca_key), "-subj", "/CN=kube-apiserver",
         "-addext", "subjectAltName=" + ",".join(_SERVER_SANS),
         "-addext", "basicConstraints=critical,CA:FALSE",
         "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
         "-addext", "extendedKeyUsage=serverAuth"],
        check=True, capture_output=True,
    )  # fmt: skip


@dataclass
class Identities:
    """Static bearer tokens, appended to the PKI's token file before the API server starts."""

    tokens: dict[str, str] = field(default_factory=dict)  # user name -> token

    def add(self, pki: Pki, user: str, groups: str = "") -> str:
        token = secrets.token_hex(24)
        with pki.token_file.open("a") as fh:
            fh.write(f"{token},{user},{user}" + (f',"{groups}"' if groups else "") + "\n")
        self.tokens[user] = token
        return token


@dataclass
class ControlPlane:
    bins: Binaries
    workdir: Path
    node_names: list[str]
    # Real kubelets renew their lease every few seconds (see nodes.py); 20 s of
    # silence makes a node NotReady, and its pods are evicted 2 s later.
    node_monitor_grace_period: str = "20s"
    eviction_toleration_seconds: int = 2
    processes: list[Process] = field(default_factory=list)
    server: str = ""
    pki: Pki | None = None
    ids: Identities = field(default_factory=Identities)
    admin_kubeconfig: Path | None = None

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def kubeconfig_for(self, user: str, path: Path) -> Path:
        assert self.pki is not None
        return write_kubeconfig(path, self.server, self.pki.ca_cert, user, self.ids.tokens[user])

    def _start(self) -> None:
        w = self.workdir
        logs = w / "logs"
        self.pki = pki = make_pki(w / "pki")
        _reissue_server_cert(pki)
        for name in self.node_names:
            self.ids.add(pki, f"system:node:{name}", "system:nodes")
        self.ids.add(pki, "system:kube-proxy")
        self.ids.add(pki, "kdistill-coredns", "system:masters")

        etcd_port, etcd_peer = free_port("127.0.0.1"), free_port("127.0.0.1")
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        etcd = self._run("etcd", [
            str(self.bins["etcd"]), "--name=default", f"--data-dir={w / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--log-level=warn",
        ], logs)  # fmt: skip
        wait_for(lambda: _ok(f"{etcd_url}/health", _insecure()), "etcd /health", 30, procs=[etcd])

        port = free_port(GATEWAY)
        self.server = f"https://{GATEWAY}:{port}"
        tolerate = str(self.eviction_toleration_seconds)
        apiserver = self._run("kube-apiserver", [
            str(self.bins["kube-apiserver"]),
            f"--etcd-servers={etcd_url}",
            f"--bind-address={GATEWAY}", f"--advertise-address={GATEWAY}", f"--secure-port={port}",
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
            f"--cert-dir={w / 'apiserver'}",
            "--allow-privileged=true",
            "--enable-admission-plugins=NodeRestriction",
            # logs/exec reach the kubelets, whose self-signed serving certs nothing can verify here.
            "--kubelet-preferred-address-types=InternalIP",
            f"--default-not-ready-toleration-seconds={tolerate}",
            f"--default-unreachable-toleration-seconds={tolerate}",
            "--profiling=false", "--v=1",
        ], logs)  # fmt: skip
        ca_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        admin_token = pki.tokens["admin"]
        wait_for(lambda: _ok(f"{self.server}/readyz", ca_ctx, admin_token), "kube-apiserver /readyz", 120,
                 procs=[etcd, apiserver])  # fmt: skip

        kc = w / "kubeconfigs"
        self.admin_kubeconfig = write_kubeconfig(kc / "admin.yaml", self.server, pki.ca_cert, "kdistill-admin",
                                                 admin_token)  # fmt: skip
        cm_kc = write_kubeconfig(kc / "controller-manager.yaml", self.server, pki.ca_cert,
                                 "system:kube-controller-manager", pki.tokens["controller-manager"])  # fmt: skip
        sched_kc = write_kubeconfig(kc / "scheduler.yaml", self.server, pki.ca_cert, "system:kube-scheduler",
                                    pki.tokens["scheduler"])  # fmt: skip
        cm_port = free_port("127.0.0.1")
        cm = self._run("kube-controller-manager", [
            str(self.bins["kube-controller-manager"]),
            f"--kubeconfig={cm_kc}", f"--authentication-kubeconfig={cm_kc}", f"--authorization-kubeconfig={cm_kc}",
            "--bind-address=127.0.0.1", f"--secure-port={cm_port}", f"--cert-dir={w / 'controller-manager'}",
            "--leader-elect=false", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}", f"--cluster-signing-key-file={pki.ca_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--controllers=*",
            "--node-monitor-period=2s", f"--node-monitor-grace-period={self.node_monitor_grace_period}",
            "--node-startup-grace-period=60s",
            "--profiling=false", "--v=1",
        ], logs)  # fmt: skip
        sched_port = free_port("127.0.0.1")
        sched = self._run("kube-scheduler", [
            str(self.bins["kube-scheduler"]),
            f"--kubeconfig={sched_kc}", f"--authentication-kubeconfig={sched_kc}",
            f"--authorization-kubeconfig={sched_kc}",
            "--bind-address=127.0.0.1", f"--secure-port={sched_port}", f"--cert-dir={w / 'scheduler'}",
            "--leader-elect=false", "--profiling=false", "--v=1",
        ], logs)  # fmt: skip
        procs = [etcd, apiserver, cm, sched]
        wait_for(lambda: _ok(f"https://127.0.0.1:{cm_port}/healthz", _insecure()), "kube-controller-manager", 90,
                 procs=procs)  # fmt: skip
        wait_for(lambda: _ok(f"https://127.0.0.1:{sched_port}/healthz", _insecure()), "kube-scheduler", 90,
                 procs=procs)  # fmt: skip

    def _run(self, name: str, argv: list[str], logs: Path) -> Process:
        proc = Process(name, argv, logs / f"{name}.log")
        self.processes.append(proc)
        return proc

    def adopt(self, proc: Process) -> None:
        self.processes.append(proc)

    def check_alive(self) -> None:
        for proc in self.processes:
            proc.check_alive()

    def stop(self) -> None:
        stop_all(self.processes)
        self.processes.clear()
