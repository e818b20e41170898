"""Rank 0's progress reports into the job's status subresource.

Only the fields in ``kdistill.api.TRAINER_STATUS_FIELDS`` are patched (the operator owns the
rest), at most every ``min_interval`` seconds, from a background thread so a slow API server
never stalls a step. A failed patch is logged and forgotten: progress is advisory.
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
    if last_checkpoint is not None:
        fields["lastCheckpoint"] = {"step": last_checkpoint[0], "time": rfc3339(last_checkpoint[1])}
    unknown = set(fields) - set(TRAINER_STATUS_FIELDS)
    assert not unknown, f"not trainer-owned status fields: {unknown}"
    return {"status": fields}


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
    def __init__(self, name: str, namespace: str, min_interval: float = 5.0) -> None:
        from kubernetes import client

        self.name = name
        self.namespace = namespace
        self.min_interval = min_interval
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
        return cls(name, namespace, min_interval)

    def update(self, body: dict[str, Any], *, force: bool = False) -> None:
        """Queue ``body``; only the newest pending body is sent. ``force`` skips the rate limit."""
        with self._cond:
            self._pending = body
            if force:
                self._last_sent = 0.0
            self._cond.notify()

    def _send(self, body: dict[str, Any]) -> None:
        try:
            self._api.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                body,
                _content_type="application/merge-patch+json",
                _request_timeout=10,
            )
            self.patches_sent += 1
        except Exception as exc:  # ApiException, connection errors: never fatal
            log.warning("status patch of %s/%s failed: %s", self.namespace, self.name, exc)

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
