"""What the pod watch saw that a LIST can no longer show: the last state of deleted worker pods.

An evicted pod carries its `DisruptionTarget` condition only while it exists. On a fast
kubelet (or kwok) it is gone within milliseconds, so a reconcile pass that LISTs the pods
afterwards sees only a missing worker and could not tell an eviction from a deletion. The
watch, however, delivers the pod's final state with its DELETED event. This tracker keeps
that final state for a while, and tells the reconciler which missing pods the watch has not
reported gone yet (a LIST may run ahead of the watch), so that it can wait for the watch
instead of guessing.

The final state of a disrupted pod (evicted, preempted, deleted by the taint manager) also
goes into the API as soon as the watch shows it: ``status.departedWorkers[<index>]`` (one key
per replica index, so concurrent merge patches never lose one). A restarted operator, whose
memory is empty, reads it back there: an eviction stays an eviction. Only the window between
the pod's disappearance and that one patch is left unrecorded (and counted as a failure).
Thread-safe: the watch handlers write from kopf's event loop, reconcile passes read from
worker threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .observe import ContainerEnd, PodView

PodKey = tuple[str, str]  # (namespace, pod name)

STATUS_FIELD = "departedWorkers"
MESSAGE_CHARS = 500


def departure_record(view: PodView) -> dict[str, Any] | None:
    """What ``status.departedWorkers[<index>]`` keeps of a disrupted worker pod; None for a pod that
    was not disrupted (a plain deletion or a failure is told from what is left of the gang)."""
    if not view.disruption or view.index is None or view.attempt is None:
        return None
    record: dict[str, Any] = {"attempt": view.attempt, "reason": view.disruption, "phase": view.phase}
    if view.terminated is not None:
        record["exitCode"] = view.terminated.exit_code
        record["message"] = view.terminated.message[:MESSAGE_CHARS]
    return record


def departed_from_status(status: dict[str, Any], pods: dict[int, str]) -> dict[str, PodView]:
    """The recorded final state of the given missing pods (index -> name), as views."""
    recorded = status.get(STATUS_FIELD) or {}
    out: dict[str, PodView] = {}
    if not isinstance(recorded, dict):
        return out
    for index, name in pods.items():
        rec = recorded.get(str(index))
        if not isinstance(rec, dict) or not isinstance(rec.get("attempt"), int):
            continue
        end = None
        if "exitCode" in rec or rec.get("message"):
            end = ContainerEnd(rec.get("exitCode"), "", str(rec.get("message") or ""))
        out[name] = PodView(
            name=name,
            index=index,
            attempt=rec["attempt"],
            phase=str(rec.get("phase") or "Failed"),
            node=None,
            created=None,
            deleting=True,
            terminated=end,
            disruption=str(rec.get("reason") or ""),
        )
    return out


class PodTracker:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, keep_seconds: float = 600.0, confirm_seconds: float = 5.0
    ) -> None:
        self._clock = clock
        self._keep = keep_seconds
        # How long a pod missing from a LIST may wait for its DELETED event before the pass
        # decides without it (a broken watch must not stall a job forever).
        self._confirm = confirm_seconds
        self._lock = threading.Lock()
        self._alive: set[PodKey] = set()
        self._gone: dict[PodKey, tuple[float, PodView]] = {}
        self._missing_since: dict[PodKey, float] = {}
        # (pod, attempt, reason) already written to the job's status.departedWorkers.
        self._recorded: set[tuple[str, str, int | None, str]] = set()

    def seen(self, namespace: str, body: dict[str, Any], deleted: bool) -> PodView:
        """A watch event of one worker pod; returns its view."""
        view = PodView.from_dict(body)
        key = (namespace, view.name)
        now = self._clock()
        with self._lock:
            self._missing_since.pop(key, None)
            if deleted:
                self._alive.discard(key)
                self._gone[key] = (now, view)
            else:
                self._alive.add(key)
                self._gone.pop(key, None)  # a new pod took the name
            for old in [k for k, (t, _) in self._gone.items() if now - t > self._keep]:
                del self._gone[old]
        return view

    def to_record(self, namespace: str, view: PodView) -> dict[str, Any] | None:
        """The status record of a disrupted pod the first time the watch shows it so; else None."""
        record = departure_record(view)
        if record is None:
            return None
        key = (namespace, view.name, view.attempt, view.disruption)
        with self._lock:
            if key in self._recorded:
                return None
            self._recorded.add(key)
            if len(self._recorded) > 10_000:  # bounded: a pod's later events are recorded again at worst
                self._recorded.clear()
                self._recorded.add(key)
        return record

    def forget_record(self, namespace: str, view: PodView) -> None:
        """A record that could not be written: try again on the pod's next event."""
        with self._lock:
            self._recorded.discard((namespace, view.name, view.attempt, view.disruption))

    def departed(self, namespace: str, pods: Iterable[str]) -> dict[str, PodView]:
        """The final state of those of `pods` that the watch saw deleted."""
        with self._lock:
            return {name: got[1] for name in pods if (got := self._gone.get((namespace, name)))}

    def unconfirmed(self, namespace: str, missing: Iterable[str]) -> frozenset[str]:
        """Pods a LIST no longer shows but whose DELETED event has not arrived yet (bounded wait)."""
        now = self._clock()
        out = set()
        with self._lock:
            for name in missing:
                key = (namespace, name)
                if key not in self._alive:
                    continue
                since = self._missing_since.setdefault(key, now)
                if now - since < self._confirm:
                    out.add(name)
        return frozenset(out)
