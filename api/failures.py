"""How a failed worker tells the operator why: exit codes and the termination message.

Any rank that fails writes ``{"reason", "retryable", "message"}`` as JSON to
``/dev/termination-log``. torchrun collapses worker exit codes, so the operator classifies a
failure by that message first and by the exit code only when no message is there. On success
rank 0 writes ``{"reason": "Succeeded", "retryable": false, "result": {...metrics...}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

TERMINATION_LOG = "/dev/termination-log"


class ExitCode(IntEnum):
    OK = 0
    # Retryable: the gang restarts from the last checkpoint.
    RETRYABLE = 10  # generic transient failure
    PEER_LOST = 11  # a rank vanished / collective timed out (NCCL or gloo)
    RENDEZVOUS_TIMEOUT = 12  # could not reach the rendezvous in time
    PREEMPTED = 13  # SIGTERM: checkpointed and exited cleanly
    # The served teacher (teacher.endpoint, teacher.serve, KDISTILL_TEACHER_URL) did not answer
    # within KDISTILL_TEACHER_TIMEOUT_S. Retryable: the gang restarts from its checkpoint and the
    # restart counts against failurePolicy.maxRestarts, so a teacher that never comes back ends the
    # job instead of looping.
    TEACHER_UNAVAILABLE = 14
    # A newer gang attempt took over (this rank outlived its gang, e.g. on a partitioned node): its
    # checkpoint, status patch or result was refused and it stopped. Retryable only so that the
    # operator, which never reads a stale attempt's pods, restarts rather than fails if it ever sees one.
    FENCED = 15
    # Permanent: restarting cannot help.
    BAD_SPEC = 20  # the job spec cannot run (e.g. student vocabulary differs from the teacher's)
    BAD_DATA = 21  # data missing, or too many bad lines
    MODEL_NOT_FOUND = 22  # teacher/student path missing or unreadable
    NETWORK_REQUIRED = 23  # an hf:// source without network access
    CHECKPOINT_INCOMPATIBLE = 24  # resume at a different world size that cannot be resharded
    INTERNAL = 30  # a bug: permanent, so it does not loop forever


RETRYABLE_CODES = frozenset(c for c in ExitCode if 10 <= c < 20)


@dataclass(frozen=True)
class Termination:
    reason: str
    retryable: bool
    message: str = ""
    result: dict[str, Any] | None = None

    def to_json(self) -> str:
        body: dict[str, Any] = {"reason": self.reason, "retryable": self.retryable, "message": self.message}
        if self.result is not None:
            body["result"] = self.result
        # The kubelet keeps at most 4096 bytes of a termination message.
        text = json.dumps(body, separators=(",", ":"))
        if len(text) > 4000:
            body["message"] = self.message[: max(0, len(self.message) - (len(text) - 4000))]
            text = json.dumps(body, separators=(",", ":"))
        return text


def termination_for(code: ExitCode, message: str) -> Termination:
    return Termination(reason=code.name, retryable=code in RETRYABLE_CODES, message=message)


def parse_termination(text: str | None, exit_code: int | None) -> Termination:
    """Classify a terminated container from its message, falling back to its exit code.

    A container killed by a signal or OOM (exit 137, 143, or no message) is retryable: the
    node or a peer is the likelier cause than the spec.
    """
    if text:
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("reason"), str):
            return Termination(
                reason=body["reason"],
                retryable=bool(body.get("retryable", False)),
                message=str(body.get("message", "")),
                result=body.get("result") if isinstance(body.get("result"), dict) else None,
            )
    if exit_code is not None and exit_code in {c.value for c in ExitCode}:
        code = ExitCode(exit_code)
        if code == ExitCode.OK:
            return Termination("Succeeded", False)
        return termination_for(code, (text or "").strip()[:500])
    return Termination("Unknown", True, f"exit code {exit_code}: {(text or '').strip()[:500]}")
