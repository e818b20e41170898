"""Child processes in their own process groups, always torn down.

Every process gets its own session (so killpg reaches anything it forks) and
PR_SET_PDEATHSIG, so that even if the Python process is SIGKILLed the kernel
stops the children. Normal teardown is SIGTERM to the group, then SIGKILL.

The kernel sends the death signal when the *thread* that started a child exits, so
start processes from a thread that lives as long as they should (the main thread).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_live: list[Process] = []
_lock = threading.Lock()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec.
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Process:
    """One long-running binary with its log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = log.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            env=env,
        )
        with _lock:
            _live.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}; last log lines:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL whatever is left after `timeout`."""
        if self.alive():
            _signal_group(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # The leader may be gone while children it forked linger in the group.
        _signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log_fh.close()
        with _lock:
            if self in _live:
                _live.remove(self)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_all(processes: Sequence[Process], timeout: float = 10.0) -> None:
    """Stops processes in reverse start order (clients before the servers they use)."""
    for proc in reversed(list(processes)):
        proc.stop(timeout)


@atexit.register
def _reap_leftovers() -> None:
    with _lock:
        leftovers = list(_live)
    stop_all(leftovers, timeout=3.0)


def wait_for(
    predicate: Callable[[], object], what: str, timeout: float, interval: float = 0.2, procs: Sequence[Process] = ()
) -> None:
    """Polls `predicate` until it is truthy; fails early if a watched process died."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check_alive()
        try:
            if predicate():
                return
        except Exception as exc:
            last_error = exc
        time.sleep(interval)
    detail = f" (last error: {last_error})" if last_error else ""
    logs = "".join(f"\n--- {p.name} ({p.log}):\n{p.tail()}" for p in procs)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{logs}")
