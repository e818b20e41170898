"""The local teacher server of ``kdistill run`` for a job with ``teacher.serve.enabled``.

``kdistill run`` starts ``kdistill serve`` on teacher.model at a free loopback port, with the
job's ``teacher.serve.batching``, waits until it is ready, hands its URL to the ranks in
``KDISTILL_TEACHER_URL`` (the variable the operator sets in the cluster) and stops it when the
run ends, whether it succeeded, failed or was interrupted. Its log goes to
``OUT/teacher-server.log``. A ``KDISTILL_TEACHER_URL`` already set names a teacher that runs
elsewhere, and then none is started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdistill.api.metadata import TEACHER_URL_ENV
from kdistill.api.teacher_serve import teacher_serve_options

READY_TIMEOUT_ENV = "KDISTILL_TEACHER_READY_TIMEOUT_S"
READY_TIMEOUT_S = 600.0


class TeacherServerFailed(RuntimeError):
    """The teacher server exited or did not become ready."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(spec: Any, model_dir: Path, port: int) -> list[str]:
    """``kdistill serve`` for the job's teacher on a loopback port, with the options the
    operator's teacher Deployment uses too."""
    return [
        sys.executable,
        "-P",
        "-m",
        "kdistill.cli.main",
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *teacher_serve_options(spec),
        "--log-level",
        "warning",
    ]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as answer:
            return int(answer.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def local_teacher_server(job: Any, job_file: Path, out: Path) -> Iterator[str | None]:
    """The URL of a teacher server for the duration of the block (module docstring); None when the
    job does not ask for one or one is given in ``KDISTILL_TEACHER_URL``."""
    spec = job.spec
    if not spec.teacher.serve.enabled or os.environ.get(TEACHER_URL_ENV, "").strip():
        yield None
        return
    from kdistill.trainer.sources import resolve_source

    model_dir = resolve_source(spec.teacher.model, job_file.resolve().parent)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "teacher-server.log"
    timeout = float(os.environ.get(READY_TIMEOUT_ENV, "") or READY_TIMEOUT_S)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(serve_command(spec, model_dir, port), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not _ready(url):
                if proc.poll() is not None:
                    raise TeacherServerFailed(f"the teacher server exited with {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise TeacherServerFailed(f"the teacher server was not ready after {timeout:g}s; see {log_path}")
                time.sleep(0.2)
            os.environ[TEACHER_URL_ENV] = url
            try:
                yield url
            finally:
                os.environ.pop(TEACHER_URL_ENV, None)
        finally:
            _stop(proc)
