"""CoreDNS on the host, serving cluster.local from the API server to every pod."""

from __future__ import annotations

import os
import random
import socket
import struct
from pathlib import Path

from tests.cluster.binaries import cache_root
from tests.cluster.procs import Process, wait_for

from .layout import DNS_DOMAIN, GATEWAY

COREDNS_VERSION = "v1.15.0"  # hack/coredns/go.mod pins the same


def binary() -> Path:
    path = cache_root() / f"coredns-{COREDNS_VERSION}" / "bin" / "coredns"
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is missing: run scripts/e2e-bins.sh")
    return path


def corefile(kubeconfig: Path) -> str:
    return (
        f"{DNS_DOMAIN}:53 in-addr.arpa:53 {{\n"
        f"    bind {GATEWAY}\n"
        "    errors\n"
        f"    kubernetes {DNS_DOMAIN} in-addr.arpa {{\n"
        f"        kubeconfig {kubeconfig} kdistill\n"
        "        pods insecure\n"
        "        ttl 5\n"
        "    }\n"
        "}\n"
    )


def query_a(name: str, server: str = GATEWAY, timeout: float = 2.0) -> list[str]:
    """The A records of `name` from `server`: a plain UDP DNS query, no resolver library."""
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, 53))
        data = sock.recv(4096)
    rid, flags, _qd, ancount, _ns, _ar = struct.unpack(">HHHHHH", data[:12])
    if rid != qid or flags & 0xF:
        return []
    pos = 12 + len(question) + 4
    answers = []
    for _ in range(ancount):
        # Names in answers are compressed pointers (2 bytes) to the question.
        pos += 2 if data[pos] & 0xC0 == 0xC0 else len(question)
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", data[pos : pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            answers.append(socket.inet_ntoa(data[pos : pos + 4]))
        pos += rdlen
    return answers


def start(workdir: Path, kubeconfig: Path) -> Process:
    conf = workdir / "Corefile"
    conf.write_text(corefile(kubeconfig))
    proc = Process("coredns", [str(binary()), "-conf", str(conf)], workdir / "logs" / "coredns.log")
    wait_for(lambda: query_a(f"kubernetes.default.svc.{DNS_DOMAIN}") == ["10.0.0.1"],
             "CoreDNS answering kubernetes.default.svc", 60, interval=0.5, procs=[proc])  # fmt: skip
    return proc
