"""The cached helm is built for the Kubernetes version the clusters run (scripts/cluster-bins.sh)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .binaries import locate, versions


def test_helm_renders_for_the_clusters_kubernetes_version(tmp_path: Path) -> None:
    helm = str(locate(required=("helm",))["helm"])
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "kube: {{ .Capabilities.KubeVersion.Version }}\nminor: {{ .Capabilities.KubeVersion.Minor | quote }}\n"
    )
    out = subprocess.run([helm, "template", str(chart)], capture_output=True, text=True, check=True).stdout
    major, minor = versions()["k8s"].removeprefix("v").split(".")[:2]
    # Without the ldflags, helm renders for its built-in default, Kubernetes v1.20.
    assert f"kube: v{major}.{minor}.0" in out, out
    assert f'minor: "{minor}"' in out, out
    version = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert version.startswith(versions()["helm"]), version
