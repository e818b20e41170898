"""Finds the control-plane binaries that `make cluster-bins` builds.

The versions come from the pinned Go modules under hack/, the same place
scripts/cluster-env.sh reads them from, so nothing else names a version.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# (hack/ module folder, Go module whose version names the cache folder, cache prefix)
_TOOLS: dict[str, tuple[str, str, str]] = {
    "k8s": ("k8s-bins", "k8s.io/kubernetes", "k8s"),
    "etcd": ("etcd", "go.etcd.io/etcd/server/v3", "etcd"),
    "kwok": ("kwok", "sigs.k8s.io/kwok", "kwok"),
    "helm": ("helm", "helm.sh/helm/v3", "helm"),
}

_BINARIES: dict[str, str] = {
    "etcd": "etcd",
    "kube-apiserver": "k8s",
    "kube-controller-manager": "k8s",
    "kube-scheduler": "k8s",
    "kubectl": "k8s",
    "kubelet": "k8s",
    "kwok": "kwok",
    "helm": "helm",
}


class MissingBinariesError(RuntimeError):
    """Raised when the control-plane binaries have not been built yet."""


def cache_root() -> Path:
    env = os.environ.get("KDISTILL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kdistill"


def module_version(folder: str, module: str) -> str:
    """The version hack/<folder>/go.mod requires of <module>."""
    text = (REPO / "hack" / folder / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", text, re.MULTILINE)
    if match is None:
        raise MissingBinariesError(f"hack/{folder}/go.mod does not require {module}")
    return match.group(1)


def versions() -> dict[str, str]:
    return {tool: module_version(folder, module) for tool, (folder, module, _) in _TOOLS.items()}


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of every binary the harness runs."""

    paths: dict[str, Path]
    versions: dict[str, str]

    def __getitem__(self, name: str) -> Path:
        return self.paths[name]


def locate(required: tuple[str, ...] = tuple(_BINARIES)) -> Binaries:
    """Paths of the cached binaries; a clear error naming `make cluster-bins` if any is missing."""
    vers = versions()
    paths: dict[str, Path] = {}
    for name, tool in _BINARIES.items():
        _, _, prefix = _TOOLS[tool]
        folder = f"{prefix}-{vers[tool]}"
        if tool == "helm":
            # scripts/cluster-env.sh: helm is built for one Kubernetes version (its ldflags).
            folder += f"-k8s-{vers['k8s']}"
        paths[name] = cache_root() / folder / "bin" / name
    missing = [str(paths[n]) for n in required if not os.access(paths[n], os.X_OK)]
    if missing:
        raise MissingBinariesError(
            "control-plane binaries are missing; build them with `make cluster-bins` "
            "(bash scripts/cluster-bins.sh, about 17 min on 2 cores the first time, cached afterwards). Missing: "
            + ", ".join(missing)
        )
    return Binaries(paths=paths, versions=vers)
