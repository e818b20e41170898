"""Rank 0's progress reports into the job's status subresource.

Only the fields in ``kdistill.api.TRAINER_STATUS_FIELDS`` are patched (the operator owns the
rest), at most every ``min_interval`` seconds, from a background thread so a slow API server
never stalls a step. A failed patch is logged and forgotten: progress is advisory.

With a gang attempt (``KDISTILL_ATTEMPT``) each patch is a JSON patch whose first operation
tests ``/status/attempt``: the API server applies it only while this rank's attempt is the
job's current one, in the same write, so a rank of an older gang (e.g. on a partitioned node)
cannot move the progress fields and there is no check-then-write race. A refused patch whose
job names a newer attempt marks the reporter ``fenced``; the trainer then stops with
``ExitCode.FENCED``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kdistill.api import GROUP, PLURAL, TRAINER_STATUS_FIELDS, VERSION
from kdistill.api.metadata import JOB_NAME_ENV, JOB_NAMESPACE_ENV

from .fence import attempt_from_env

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(
    *,
    stage: str,
    step: int,
    total_steps: int,
    loss: float | None,
    tokens_per_second: float | None,
    last_checkpoint: tuple[int, float] | None,
    productive_seconds: float | None = None,
) -> dict[str, Any]:
    """The merge-patch body for the progress fields (pure)."""
    fields: dict[str, Any] = {
        "stage": stage,
        "step": step,
        "totalSteps": total_steps,
        "progress": f"{(100 * step) // total_steps if total_steps else 0}%",
    }
    if loss is not None:
        fields["loss"] = round(float(loss), 6)
    if tokens_per_second is not None:
        fields["tokensPerSecond"] = round(float(tokens_per_second), 1)
    if productive_seconds is not None:
        fields["productiveSeconds"] = round(float(productive_seconds), 1)
    if last_checkpoint is not None:
        fields["lastCheckpoint"] = {"step": last_checkpoint[0], "time": rfc3339(last_checkpoint[1])}
    unknown = set(fields) - set(TRAINER_STATUS_FIELDS)
    assert not unknown, f"not trainer-owned status fields: {unknown}"
    return {"status": fields}


def fenced_patch(body: dict[str, Any], attempt: int) -> list[dict[str, Any]]:
    """The JSON patch of ``status_body``'s fields that applies only while ``status.attempt`` is
    ``attempt`` (pure)."""
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/status/attempt", "value": attempt}]
    ops += [{"op": "add", "path": f"/status/{k}", "value": v} for k, v in body["status"].items()]
    return ops


def _load_kube_config() -> bool:
    from kubernetes import config

    try:
        if SERVICE_ACCOUNT_TOKEN.is_file() and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            return True
        if os.environ.get("KUBECONFIG"):
            # Explicit path: the client reads KUBECONFIG only once, when it is imported.
            config.load_kube_config(config_file=os.environ["KUBECONFIG"])
            return True
    except Exception as exc:  # the client raises its own ConfigException and file errors
        log.warning("progress reports off: cannot load Kubernetes credentials: %s", exc)
    return False


class ProgressReporter:
    def __init__(self, name: str, namespace: str, min_interval: float = 5.0, attempt: int | None = None) -> None:
        from kubernetes import client

        self.name = name
        self.namespace = namespace
        self.min_interval = min_interval
        self.attempt = attempt
        # Set once the API server refused a patch because the job runs a newer attempt.
        self.fenced: int | None = None
        self._api = client.CustomObjectsApi()
        self._pending: dict[str, Any] | None = None
        self._last_sent = 0.0
        self._cond = threading.Condition()
        self._closed = False
        self.patches_sent = 0
        self._thread = threading.Thread(target=self._run, name="kdistill-progress", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, min_interval: float = 5.0) -> ProgressReporter | None:
        name, namespace = os.environ.get(JOB_NAME_ENV), os.environ.get(JOB_NAMESPACE_ENV)
        if not name or not namespace or not _load_kube_config():
            return None
        return cls(name, namespace, min_interval, attempt_from_env())

    def update(self, body: dict[str, Any], *, force: bool = False) -> None:
        """Queue ``body``; only the newest pending body is sent. ``force`` skips the rate limit."""
        with self._cond:
            self._pending = body
            if force:
                self._last_sent = 0.0
            self._cond.notify()

    def _send(self, body: dict[str, Any]) -> None:
        if self.fenced is not None:
            return
        patch: Any = body
        content_type = "application/merge-patch+json"
        if self.attempt is not None:
            patch, content_type = fenced_patch(body, self.attempt), "application/json-patch+json"
        try:
            self._api.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                patch,
                _content_type=content_type,
                _request_timeout=10,
            )
            self.patches_sent += 1
        except Exception as exc:  # ApiException, connection errors: never fatal
            if self.attempt is not None and getattr(exc, "status", None) == 422 and self._superseded():
                return
            log.warning("status patch of %s/%s failed: %s", self.namespace, self.name, exc)

    def _superseded(self) -> bool:
        """After a refused fenced patch: does the job run a newer attempt than ours?"""
        try:
            job = self._api.get_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=10
            )
        except Exception as exc:
            log.warning("cannot read the attempt of %s/%s: %s", self.namespace, self.name, exc)
            return False
        if not isinstance(job, dict):
            return False
        current = (job.get("status") or {}).get("attempt")
        if isinstance(current, int) and self.attempt is not None and current > self.attempt:
            self.fenced = current
            log.error(
                "fenced: status patch of %s/%s refused: gang attempt %d was superseded by attempt %d",
                self.namespace,
                self.name,
                self.attempt,
                current,
            )
            return True
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None and self._closed:
                    return
                wait = self._last_sent + self.min_interval - time.monotonic()
                if wait > 0 and not self._closed:
                    self._cond.wait(wait)
                    continue
                body, self._pending = self._pending, None
                self._last_sent = time.monotonic()
            if body is not None:
                self._send(body)

    def close(self, timeout: float = 15.0) -> None:
        """Send what is pending now, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
