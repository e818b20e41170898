"""Fenced restarts with real trainer processes: a rank of an older gang attempt that is still
alive (a partitioned node; here a process stopped with SIGSTOP and resumed with SIGCONT) cannot
write a checkpoint or a result once the next attempt started on the same checkpoint directory."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdistill.api.failures import ExitCode
from kdistill.trainer.checkpoint import CheckpointManager
from kdistill.trainer.fence import Fence

from .harness import REPO
from .jobs import make_job

STEPS, EVERY = 40, 4


def _start(job: Path, out: Path, attempt: int, logs: Path) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TRANSFORMERS_VERBOSITY="error",
        KDISTILL_ATTEMPT=str(attempt),
        KDISTILL_TERMINATION_LOG=str(logs / f"termination-{attempt}.log"),
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-P", "-m", "kdistill.trainer", "--config", str(job), "--output", str(out)]
    with (logs / f"attempt-{attempt}.log").open("wb") as sink:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)


def _wait_for(what: str, check: object, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        assert proc.poll() is None, f"the run exited {proc.returncode} before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _lock_is_free(root: Path) -> bool:
    with open(root / ".fence.lock", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return True


def _state(pid: int) -> str:
    """The process's state letter from /proc (``T``: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _stop_outside_the_lock(proc: subprocess.Popen[bytes], root: Path, timeout: float = 120) -> None:
    """SIGSTOP ``proc`` at a moment it does not hold the fence's flock. A process frozen inside a
    commit would hold a local flock for ever; on a partitioned node the NFS server's lease frees it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.send_signal(signal.SIGSTOP)
        # SIGSTOP takes effect asynchronously: look at the lock only once the process has stopped.
        while _state(proc.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.001)
        if _lock_is_free(root):
            return
        proc.send_signal(signal.SIGCONT)
        while not _lock_is_free(root) and time.monotonic() < deadline:
            time.sleep(0.01)
    raise AssertionError("attempt 1 never left the fence's lock")


def _attempt_of(checkpoint: Path) -> int | None:
    return json.loads((checkpoint / "trainer.json").read_text()).get("attempt")


@pytest.mark.timeout(900)
def test_an_older_attempt_left_running_cannot_write_a_checkpoint_or_a_result(tmp_path: Path) -> None:
    job = make_job(tmp_path / "job", world=1, steps=STEPS, every=EVERY, batch_size=4, layers=2, name="fence")
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    ckpt = CheckpointManager(out / "checkpoints", keep=2)
    first = _start(job, out, 1, logs)
    second: subprocess.Popen[bytes] | None = None
    try:
        # Attempt 1 writes its first checkpoint, then its node is cut off: the process stops but lives.
        _wait_for("attempt 1's first checkpoint", lambda: ckpt.latest() is not None, first)
        _stop_outside_the_lock(first, out / "checkpoints")
        resumed_at = ckpt.latest()
        assert resumed_at is not None and _attempt_of(resumed_at.path) == 1
        # Attempt 2 starts on the same checkpoint directory and raises the fence before it reads.
        second = _start(job, out, 2, logs)
        _wait_for("attempt 2's fence", lambda: Fence(out / "checkpoints", None).current() == 2, second)
        # The partition heals while attempt 2 trains: attempt 1 runs on, and its next save is refused.
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=600) == ExitCode.FENCED
        assert second.wait(timeout=600) == 0, (logs / "attempt-2.log").read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
    old_log = (logs / "attempt-1.log").read_text()
    assert "fenced: gang attempt 1 was superseded by attempt 2" in old_log
    termination = json.loads((logs / "termination-1.log").read_text())
    assert termination["reason"] == "FENCED" and termination["retryable"] is True
    assert json.loads((logs / "termination-2.log").read_text())["reason"] == "Succeeded"
    # Attempt 2 resumed from attempt 1's checkpoint and every checkpoint after it is attempt 2's.
    result = json.loads((out / "result.json").read_text())
    assert result["attempt"] == 2 and result["resumedFrom"] == resumed_at.step
    newest = ckpt.latest()
    assert newest is not None and newest.step == STEPS and _attempt_of(newest.path) == 2
    later = [p for p in ckpt.candidates() if int(p.name.split("-")[1]) > resumed_at.step]
    assert later and all(_attempt_of(p) == 2 for p in later)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    # The final student and the served artifact are attempt 2's (attempt 1 never reached them).
    assert (out / "student" / "model.safetensors").is_file() and (out / "student-int8").is_dir()
