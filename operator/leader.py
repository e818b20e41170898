"""Leader election on a coordination.k8s.io Lease, so that two replicas never both act.

The operator starts its watches only once it holds the Lease and stops itself (exits) when it
cannot renew it before `renew_deadline`, which is shorter than the lease duration: by the
time another replica may take over, this one has already stopped acting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from . import metrics
from .kube import ApiError, Kube, path_for
from .observe import parse_time

log = logging.getLogger("kdistill.operator.leader")
LEASE = ("coordination.k8s.io/v1", "Lease")


def micro_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def may_take(spec: dict[str, Any], identity: str, now: datetime) -> bool:
    """Whether `identity` may hold a lease whose current spec is `spec`."""
    holder = spec.get("holderIdentity") or ""
    if not holder or holder == identity:
        return True
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    if renewed is None:
        return True
    return now >= renewed + timedelta(seconds=float(spec.get("leaseDurationSeconds") or 15))


class LeaseElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, duration: float, renew: float):
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.duration, self.renew = duration, renew
        self.renew_deadline = max(duration - renew, renew)
        self.leading = False
        self._stop = threading.Event()

    def try_acquire(self) -> bool:
        now = datetime.now(UTC)
        lease = self.kube.get(*LEASE, self.namespace, self.name)
        fresh = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": round(self.duration),
            "renewTime": micro_time(now),
        }
        try:
            if lease is None:
                self.kube.create(
                    {
                        "apiVersion": LEASE[0],
                        "kind": LEASE[1],
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": {**fresh, "acquireTime": micro_time(now), "leaseTransitions": 0},
                    }
                )
                return self._confirm()
            spec = lease.get("spec") or {}
            if not may_take(spec, self.identity, now):
                return False
            new = {**spec, **fresh}
            if spec.get("holderIdentity") != self.identity:
                new["acquireTime"] = micro_time(now)
                new["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
            lease["spec"] = new
            self.kube.request("PUT", path_for(*LEASE, self.namespace, self.name), lease, verb="update")
            return True
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise

    def _confirm(self) -> bool:
        lease = self.kube.get(*LEASE, self.namespace, self.name) or {}
        return (lease.get("spec") or {}).get("holderIdentity") == self.identity

    def acquire(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                if self.try_acquire():
                    self.leading = True
                    metrics.LEADER.set(1)
                    log.info("acquired lease %s/%s as %s", self.namespace, self.name, self.identity)
                    return True
            except Exception as exc:  # API down: keep trying
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            stop.wait(self.renew)
        return False

    def keep_renewing(self, on_lost: Callable[[], None]) -> threading.Thread:
        def loop() -> None:
            last = time.monotonic()
            while not self._stop.wait(self.renew):
                try:
                    if self.try_acquire():
                        last = time.monotonic()
                        continue
                except Exception as exc:
                    log.warning("renewing lease failed: %s", exc)
                if time.monotonic() - last > self.renew_deadline:
                    log.error("lost lease %s/%s: stopping", self.namespace, self.name)
                    self.leading = False
                    metrics.LEADER.set(0)
                    on_lost()
                    return

        thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Hand the lease back on a clean exit, so a standby takes over at once."""
        self._stop.set()
        if not self.leading:
            return
        try:
            lease = self.kube.get(*LEASE, self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                self.kube.request("PUT", path_for(*LEASE, self.namespace, self.name), lease, verb="update")
        except Exception as exc:
            log.warning("releasing lease failed: %s", exc)
        self.leading = False
        metrics.LEADER.set(0)
