"""Kubeconfig files for the admin, the control-plane components and ServiceAccounts."""

from __future__ import annotations

import base64
from pathlib import Path

import yaml


def write_kubeconfig(path: Path, server: str, ca_cert: Path, user: str, token: str) -> Path:
    ca_data = base64.b64encode(ca_cert.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kdistill", "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "kdistill", "context": {"cluster": "kdistill", "user": user}}],
        "current-context": "kdistill",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def read_server_and_ca(kubeconfig: Path) -> tuple[str, bytes | None, bool]:
    """(server URL, CA bytes if embedded or referenced, insecure-skip-tls-verify) of the current context."""
    config = yaml.safe_load(kubeconfig.read_text())
    contexts = {c["name"]: c["context"] for c in config.get("contexts", [])}
    clusters = {c["name"]: c["cluster"] for c in config.get("clusters", [])}
    current = config.get("current-context") or next(iter(contexts))
    cluster = clusters[contexts[current]["cluster"]]
    ca: bytes | None = None
    if "certificate-authority-data" in cluster:
        ca = base64.b64decode(cluster["certificate-authority-data"])
    elif "certificate-authority" in cluster:
        ca_path = Path(cluster["certificate-authority"])
        if not ca_path.is_absolute():
            ca_path = kubeconfig.parent / ca_path
        ca = ca_path.read_bytes()
    return cluster["server"], ca, bool(cluster.get("insecure-skip-tls-verify"))


def write_token_kubeconfig(path: Path, base: Path, user: str, token: str) -> Path:
    """A kubeconfig for `user` with `token`, pointing at the same server as `base`."""
    server, ca, insecure = read_server_and_ca(base)
    cluster: dict[str, object] = {"server": server}
    if ca is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
    if insecure:
        cluster["insecure-skip-tls-verify"] = True
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kdistill", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "kdistill", "context": {"cluster": "kdistill", "user": user}}],
        "current-context": "kdistill",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
