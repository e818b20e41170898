"""Kubernetes Events on the operator's objects (jobs and schedules): one Event per fact, best effort."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from . import names
from .kube import ApiError, Kube


def event_object(body: dict[str, Any], type_: str, reason: str, message: str, identity: str) -> dict[str, Any]:
    """A core/v1 Event about the object `body`."""
    meta = body["metadata"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": names.MANAGER},
        "reportingComponent": names.MANAGER,
        "reportingInstance": identity,
    }


def post_event(
    kube: Kube, body: dict[str, Any], type_: str, reason: str, message: str, identity: str, log: Any
) -> None:
    """Create the Event; a failure is logged, never raised: no pass fails for an Event."""
    try:
        kube.create(event_object(body, type_, reason, message, identity))
    except ApiError as exc:
        log.warning("could not post event %s: %s", reason, exc)
