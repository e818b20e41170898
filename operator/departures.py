"""What the pod watch saw that a LIST can no longer show: the last state of deleted worker pods.

An evicted pod carries its `DisruptionTarget` condition only while it exists. On a fast
kubelet (or kwok) it is gone within milliseconds, so a reconcile pass that LISTs the pods
afterwards sees only a missing worker and could not tell an eviction from a deletion. The
watch, however, delivers the pod's final state with its DELETED event. This tracker keeps
that final state for a while, and tells the reconciler which missing pods the watch has not
reported gone yet (a LIST may run ahead of the watch), so that it can wait for the watch
instead of guessing.

It lives in memory: an operator restarted in the short window between an eviction and its
next pass counts that eviction as a failure restart (the conservative side).
Thread-safe: the watch handlers write from kopf's event loop, reconcile passes read from
worker threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .observe import PodView

PodKey = tuple[str, str]  # (namespace, pod name)


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
