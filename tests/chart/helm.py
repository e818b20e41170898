"""Runs the pinned helm (from `make cluster-bins`) on the chart and parses what it renders."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.binaries import REPO, MissingBinariesError, locate

CHART = REPO / "charts" / "kdistill"
# The rendering Kubernetes version; the same as scripts/render-manifests.sh.
KUBE_VERSION = "1.34.0"


def helm_binary() -> Path:
    try:
        return locate(required=("helm",))["helm"]
    except MissingBinariesError as exc:
        pytest.fail(str(exc), pytrace=False)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def set_args(values: dict[str, Any] | None) -> list[str]:
    """--set-json flags for a flat {dotted.key: value} map."""
    import json

    args: list[str] = []
    for key, value in (values or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def render(values: dict[str, Any] | None = None, namespace: str = "kdistill-system",
           include_crds: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """The chart's objects for these values (`helm template`), parsed."""
    args = ["template", "kdistill", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    if include_crds:
        args.append("--include-crds")
    out = helm(*args, *set_args(values)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_error(values: dict[str, Any]) -> str:
    """The error helm prints when it refuses these values."""
    proc = helm("template", "kdistill", str(CHART), "--kube-version", KUBE_VERSION, *set_args(values), check=False)
    assert proc.returncode != 0, f"helm accepted {values}"
    return proc.stderr


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
