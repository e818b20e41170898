"""Certificates and keys for a throwaway control plane, made with the openssl CLI.

ECDSA P-256 keys: fast to generate, and accepted by kube-apiserver both for TLS
and for signing ServiceAccount tokens (ES256).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Names a client may use to reach the API server; the in-cluster ones matter once
# real pods (rung 4) talk to it.
_SERVER_SANS = (
    "IP:127.0.0.1",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
    "IP:10.0.0.1",
)


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sa_key: Path  # private key: signs ServiceAccount tokens
    sa_pub: Path  # its public half: verifies them
    proxy_cert: Path  # the API server's client cert towards aggregated APIs (front proxy)
    proxy_key: Path
    tokens: dict[str, str]  # user name -> static bearer token
    token_file: Path


# Static identities. The controller-manager and scheduler users are the ones the
# bootstrap RBAC policy already binds, so they get exactly their real permissions.
_USERS: dict[str, tuple[str, str]] = {
    "admin": ("kdistill-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", ""),
    "scheduler": ("system:kube-scheduler", ""),
    "kwok": ("kdistill-kwok", "system:masters"),
}


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _ec_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def make_pki(folder: Path, extra_sans: Sequence[str] = (), extra_users: Mapping[str, str] | None = None) -> Pki:
    """Keys, certificates and static tokens in `folder`.

    `extra_sans` adds names to the API server's certificate (e.g. ``IP:172.29.0.1`` when
    it listens where node containers reach it); `extra_users` maps further user names to
    their groups ("" for none), each with a token under its own name in `Pki.tokens`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = folder / "ca.key", folder / "ca.crt"
    server_key, server_cert = folder / "apiserver.key", folder / "apiserver.crt"
    sa_key, sa_pub = folder / "sa.key", folder / "sa.pub"
    for key in (ca_key, server_key, sa_key):
        _ec_key(key)
    # kube-apiserver reads public keys only from PUBLIC KEY / SEC1 PEM, not from PKCS#8.
    _openssl("pkey", "-in", str(sa_key), "-pubout", "-out", str(sa_pub))
    _openssl(
        "req", "-x509", "-new", "-key", str(ca_key), "-out", str(ca_cert), "-days", "7",
        "-subj", "/CN=kdistill-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip
    _openssl(
        "req", "-x509", "-new", "-key", str(server_key), "-out", str(server_cert), "-days", "7",
        "-CA", str(ca_cert), "-CAkey", str(ca_key), "-subj", "/CN=kube-apiserver",
        "-addext", "subjectAltName=" + ",".join((*_SERVER_SANS, *extra_sans)),
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
        "-addext", "extendedKeyUsage=serverAuth",
    )  # fmt: skip
    # With a request-header CA in place, the controller-manager and scheduler can
    # delegate authentication without logging a missing-CA error every few seconds.
    proxy_key, proxy_cert = folder / "front-proxy-client.key", folder / "front-proxy-client.crt"
    _ec_key(proxy_key)
    _openssl(
        "req", "-x509", "-new", "-key", str(proxy_key), "-out", str(proxy_cert), "-days", "7",
        "-CA", str(ca_cert), "-CAkey", str(ca_key), "-subj", "/CN=front-proxy-client",
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
        "-addext", "extendedKeyUsage=clientAuth",
    )  # fmt: skip
    users = dict(_USERS)
    users.update({user: (user, groups) for user, groups in (extra_users or {}).items()})
    tokens = {role: secrets.token_hex(24) for role in users}
    token_file = folder / "tokens.csv"
    lines = []
    for role, (user, groups) in users.items():
        # token,user,uid[,"group1,group2"]
        lines.append(f"{tokens[role]},{user},{user}" + (f',"{groups}"' if groups else ""))
    token_file.write_text("\n".join(lines) + "\n")
    token_file.chmod(0o600)
    return Pki(ca_cert, ca_key, server_cert, server_key, sa_key, sa_pub, proxy_cert, proxy_key, tokens, token_file)


def serving_cert(pki: Pki, folder: Path, sans: Sequence[str] = ("IP:127.0.0.1", "DNS:localhost")) -> tuple[Path, Path]:
    """A serving certificate signed by the cluster's CA (tls.crt, tls.key in `folder`): for a webhook
    server the API server calls at https://127.0.0.1:<port> with the CA as its caBundle."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "tls.key", folder / "tls.crt"
    _ec_key(key)
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "7",
        "-CA", str(pki.ca_cert), "-CAkey", str(pki.ca_key), "-subj", "/CN=webhook",
        "-addext", "subjectAltName=" + ",".join(sans),
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
        "-addext", "extendedKeyUsage=serverAuth",
    )  # fmt: skip
    return cert, key
