"""Running the operator: logging, metrics, leader election, then kopf with our handlers."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from contextlib import nullcontext

import kopf
from prometheus_client import start_http_server

from . import logs, metrics
from .kube import Kube
from .leader import LeaseElector
from .reconciler import Reconciler
from .scheduler import ScheduleReconciler
from .settings import Settings
from .standby import StandbyHealth

log = logging.getLogger("kdistill.operator")


def run(settings: Settings, kubeconfig: str | None = None, log_level: str = "INFO") -> int:
    """Blocks until stopped; returns the exit code (1 if the leader lease was lost)."""
    logs.configure(log_level)
    from kubernetes import client, config

    if kubeconfig:
        api = config.new_client_from_config(config_file=kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.ApiClient()
    # One pooled connection per reconcile worker, plus watches.
    api.rest_client.pool_manager.connection_pool_kw["maxsize"] = settings.workers + 4
    kube = Kube(api, settings.request_timeout)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.REGISTRY)

    from . import handlers  # registers the kopf handlers

    if settings.kueue:
        handlers.register_kueue()  # the Workloads of queued jobs

    waiting = threading.Event()
    lost = threading.Event()
    elector = None
    if settings.leader_election:
        elector = LeaseElector(
            kube,
            settings.lease_namespace,
            settings.lease_name,
            settings.identity,
            settings.lease_duration_seconds,
            settings.lease_renew_seconds,
        )
        log.info("waiting for lease %s/%s", settings.lease_namespace, settings.lease_name)
        # A standby stopped while it waits exits cleanly (kopf handles signals only later).
        previous = signal.signal(signal.SIGTERM, lambda *_: waiting.set())
        lease = f"{settings.lease_namespace}/{settings.lease_name}"
        try:
            with StandbyHealth(settings.health_port, lease) if settings.health_port else nullcontext():
                if not elector.acquire(waiting):
                    return 0
        finally:
            signal.signal(signal.SIGTERM, previous)
    runtime = handlers.Runtime(
        settings=settings,
        reconciler=Reconciler(kube, settings),
        leader=elector,
        scheduler=ScheduleReconciler(kube, settings),
    )
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None

    async def operate() -> None:
        # An asyncio.Event in kopf's own loop: kopf would wait on a threading.Event or a
        # concurrent Future in an executor thread that outlives a SIGTERM-initiated stop.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if elector is not None:

            def on_lost() -> None:
                lost.set()
                loop.call_soon_threadsafe(stop.set)

            elector.keep_renewing(on_lost)
        await kopf.operator(
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            standalone=True,
            liveness_endpoint=liveness,
            stop_flag=stop,
            memo=kopf.Memo(runtime=runtime),
        )

    try:
        asyncio.run(operate())
    finally:
        if elector is not None and not lost.is_set():
            elector.release()
    return 1 if lost.is_set() else 0
