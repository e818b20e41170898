"""``kdistill operator`` rejects bad settings before it touches a cluster."""

from __future__ import annotations

import os
import subprocess
import sys


def _operator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "kdistill.cli.main", "operator", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )  # rich wraps its error box at the width


def test_unknown_image_pull_policy_is_a_usage_error() -> None:
    proc = _operator("--image-pull-policy", "Sometimes", "--kubeconfig", "/nonexistent/kubeconfig")
    assert proc.returncode == 2, proc.stderr
    assert "'Sometimes' is not one of Always, IfNotPresent, Never" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pull_policy_option_is_documented() -> None:
    proc = _operator("--help")
    assert proc.returncode == 0 and "--image-pull-policy" in proc.stdout
