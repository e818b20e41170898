"""Structured (JSON) logs; lines about a job carry it in a `job` field, about a schedule in `schedule`."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        job = getattr(record, "job", None)
        schedule = getattr(record, "schedule", None)
        if job is None and schedule is None:
            # kopf names the object it is handling in its own records.
            k8s = getattr(record, "k8s_ref", None)
            if isinstance(k8s, dict) and k8s.get("name"):
                ref = f"{k8s.get('namespace') or ''}/{k8s['name']}"
                if k8s.get("kind") == "DistillationSchedule":
                    schedule = ref
                else:
                    job = ref
        if job is not None:
            out["job"] = job
        if schedule is not None:
            out["schedule"] = schedule
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kopf.objects says "Handler ... succeeded" for every watch event (each pod update, each node
    # heartbeat) and kopf.activities.probe for every probe: thousands of lines at scale, none
    # about a decision. Warnings and errors still come through; the reconciler logs what it does.
    for noisy in ("urllib3", "kubernetes", "aiohttp.access", "kopf.objects", "kopf.activities.probe"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class ObjectLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Every line names its object as a structured field: {"job": "ns/name"} or {"schedule": "ns/name"}."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("extra", {}).update(self.extra or {})
        return msg, kwargs
