"""Docker for the image tests: the private dockerd from scripts/dockerd.sh and the project's images.

The session starts dockerd itself (idempotent), and builds an image with scripts/images.sh
only when it is missing (`make images` builds both ahead of time).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.binaries import REPO

VERSION = next(line.split('"')[1] for line in (REPO / "kdistill" / "__init__.py").read_text().splitlines()
               if line.startswith("__version__ = "))  # fmt: skip


def start_dockerd() -> str:
    """DOCKER_HOST of the private dockerd, started if it does not answer."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "dockerd.sh"), "start"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/dockerd.sh start failed: {proc.stderr.strip()}")
    return proc.stdout.strip().splitlines()[-1]


@dataclass
class Docker:
    host: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return proc

    def ensure_image(self, name: str) -> str:
        """kdistill/<name>:VERSION, built by scripts/images.sh if missing.

        `make test` builds the images in a step of its own before pytest, so this builds only
        when a test runs alone. The whole build log goes to build/logs/images-<name>.log and a
        failure shows its tail.
        """
        image = f"kdistill/{name}:{VERSION}"
        if self("image", "inspect", image, check=False).returncode != 0:
            log = REPO / "build" / "logs" / f"images-{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as fh:
                build = subprocess.run(["bash", str(REPO / "scripts" / "images.sh"), name], stdout=fh,
                                       stderr=subprocess.STDOUT, env=self.env(), timeout=3600)  # fmt: skip
            if build.returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
                raise AssertionError(f"scripts/images.sh {name} failed; the last 60 lines of {log}:\n{tail}")
        return image

    def logs(self, container: str) -> str:
        proc = self("logs", container, check=False)
        return proc.stdout + proc.stderr

    def remove(self, container: str) -> None:
        self("rm", "-f", container, check=False)


# The pod securityContext the chart and the operator give their pods, as docker flags.
HARDENED = ["--read-only", "--tmpfs", "/tmp:rw,size=512m", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--user", "65532:65532"]  # fmt: skip


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_http(url: str, timeout: float, alive: callable = lambda: True) -> tuple[int, str]:  # type: ignore[valid-type]
    """Polls `url` until it answers 200; the last answer (or AssertionError) on timeout."""
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "no answer")
    while time.monotonic() < deadline:
        try:
            last = http_get(url)
            if last[0] == 200:
                return last
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = (0, str(exc))
        if not alive():
            break
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer 200 within {timeout}s: {last}")


def world_readable(path: Path) -> None:
    """The containers run as uid 65532: let them read the test's files."""
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o755 if p.is_dir() else p.stat().st_mode | 0o644)
