"""The attempt fence on the checkpoint volume: a rank of an older gang attempt cannot write.

A gang restart leaves the old gang's pods to die, but a rank on a partitioned node may keep
running for a while and share the checkpoint volume with the new gang. Every rank of a gang
attempt (``KDISTILL_ATTEMPT``) raises the fence file ``<checkpoints>/.fence`` to its attempt
when it starts (never lowering it); every commit of a checkpoint and every publication of the
final outputs holds the fence's lock, checks that no newer attempt raised it, and only then
renames its files into place. A rank whose attempt is older is refused with
``ExitCode.FENCED``. The lock is a ``flock`` on ``<checkpoints>/.fence.lock``, which NFSv4 and
CephFS honour across nodes. Without ``KDISTILL_ATTEMPT`` (local runs) there is no fence.

The lock is held only for a rename and a prune (well under a second), so a wait is bounded:
``KDISTILL_FENCE_LOCK_TIMEOUT_S`` (default 300 s). A holder that keeps it longer is a stopped or
hung process of some attempt (a frozen node still mounting the volume); waiting for it forever
would hang the gang, so the rank fails retryable instead (``ExitCode.RETRYABLE``, naming the lock
file): the gang restarts from its checkpoint and the restart counts against ``maxRestarts``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdistill.api.failures import ExitCode
from kdistill.api.metadata import ATTEMPT_ENV

from .errors import TrainerError
from .fsio import write_text_atomic

log = logging.getLogger(__name__)

FENCE_FILE = ".fence"
LOCK_FILE = ".fence.lock"
LOCK_TIMEOUT_ENV = "KDISTILL_FENCE_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 300.0
_LOCK_POLL_S = 0.05


def attempt_from_env() -> int | None:
    """This gang's attempt from ``KDISTILL_ATTEMPT``; None when unset (a local run)."""
    raw = os.environ.get(ATTEMPT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise TrainerError(ExitCode.BAD_SPEC, f"{ATTEMPT_ENV}={raw!r}: expected a whole number >= 0") from None
    if value < 0:
        raise TrainerError(ExitCode.BAD_SPEC, f"{ATTEMPT_ENV}={raw!r}: expected a whole number >= 0")
    return value


def lock_timeout() -> float:
    """``KDISTILL_FENCE_LOCK_TIMEOUT_S`` seconds, or the default."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise TrainerError(ExitCode.BAD_SPEC, f"{LOCK_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def _acquire(fd: int, path: Path, timeout: float) -> None:
    """Take the exclusive flock within ``timeout`` seconds, else fail retryable (see the module doc)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            raise TrainerError(
                ExitCode.RETRYABLE,
                f"the checkpoint fence lock {path} was held by another process for over {timeout:g} s "
                f"(a stopped or hung rank still mounting the volume?); see {LOCK_TIMEOUT_ENV}",
            )
        time.sleep(_LOCK_POLL_S)


def fenced_error(attempt: int, newer: int, what: str) -> TrainerError:
    return TrainerError(
        ExitCode.FENCED,
        f"fenced: gang attempt {attempt} was superseded by attempt {newer}; {what} refused",
    )


class Fence:
    """The fence of one checkpoint directory for one attempt (None: no fencing)."""

    def __init__(self, root: Path, attempt: int | None) -> None:
        self.root = root
        self.attempt = attempt

    @classmethod
    def from_env(cls, root: Path) -> Fence:
        return cls(root, attempt_from_env())

    def current(self) -> int | None:
        """The newest attempt that raised the fence, or None."""
        try:
            return int(json.loads((self.root / FENCE_FILE).read_text())["attempt"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+") as fh:
            _acquire(fh.fileno(), self.root / LOCK_FILE, lock_timeout())
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def raise_to_mine(self) -> None:
        """At start: raise the fence to this attempt; refused if a newer attempt already did."""
        if self.attempt is None:
            return
        with self._locked():
            current = self.current()
            if current is not None and current > self.attempt:
                raise fenced_error(self.attempt, current, "starting")
            if current != self.attempt:
                write_text_atomic(self.root / FENCE_FILE, json.dumps({"attempt": self.attempt}) + "\n")
                log.info("checkpoint fence raised to gang attempt %d (was %s)", self.attempt, current)

    def check(self, what: str) -> None:
        """Raise ``ExitCode.FENCED`` if a newer attempt raised the fence (no lock: a quick look)."""
        if self.attempt is None:
            return
        current = self.current()
        if current is not None and current > self.attempt:
            raise fenced_error(self.attempt, current, what)

    @contextmanager
    def holding(self, what: str) -> Iterator[None]:
        """Hold the fence's lock while ``what`` is committed; refused if a newer attempt raised it."""
        if self.attempt is None:
            yield
            return
        with self._locked():
            self.check(what)
            yield
