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


def test_every_flag_takes_its_default_from_the_settings() -> None:
    """The operator's defaults live in operator/settings.py only; the CLI reads them from there."""
    from dataclasses import fields

    from typer.main import get_command

    from kdistill.cli.main import app
    from kdistill.operator.settings import Settings

    command = get_command(app).commands["operator"]  # type: ignore[attr-defined]
    flags = {p.name: p.default for p in command.params}
    renamed = {"lease_duration": "lease_duration_seconds", "lease_renew": "lease_renew_seconds"}
    settings = Settings()
    checked = set()
    for cli_name, value in flags.items():
        field_name = renamed.get(cli_name, cli_name)
        if field_name in {f.name for f in fields(Settings)}:
            assert value == getattr(settings, field_name), cli_name
            checked.add(field_name)
    assert {"trainer_image", "workers", "metrics_port", "lease_name", "lease_duration_seconds"} <= checked
