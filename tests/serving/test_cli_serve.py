"""``kdistill serve`` refuses what is not a verified artifact."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.serving.helpers import ServerProcess


def test_serve_refuses_a_directory_without_kdistill_json(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kdistill.cli.main", "serve", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert "(no kdistill.json)" in " ".join(r.stderr.replace("│", " ").split())  # the message may be wrapped


def test_tampered_artifact_is_never_ready(tmp_path: Path, cls_artifact: Path) -> None:
    bad = tmp_path / "job" / "student-int8"
    shutil.copytree(cls_artifact, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF
    weights.write_bytes(bytes(data))
    server = ServerProcess(bad)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # alive, but the model must never become ready
            try:
                r = httpx.post(f"{server.url}/v1/classify", json={"texts": ["x"]}, timeout=5)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            if "checksum" in r.text:
                break
            time.sleep(0.2)
        assert r.status_code == 503 and "checksum mismatch for model.safetensors" in r.json()["error"]["message"]
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 503
    finally:
        server.terminate()
