"""Operator settings, read from flags with KDISTILL_* environment fallbacks."""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

DEFAULT_TRAINER_IMAGE = "ghcr.io/kdistill/trainer:latest"
DEFAULT_SERVER_IMAGE = "ghcr.io/kdistill/server:latest"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


def _env_pull_policy() -> str:
    # Read here rather than as a CLI flag so that the chart's `image.pullPolicy` reaches worker
    # and serving pods through the Deployment's env (KDISTILL_IMAGE_PULL_POLICY).
    return os.environ.get("KDISTILL_IMAGE_PULL_POLICY", "")


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()  # empty: cluster-wide
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    server_image: str = DEFAULT_SERVER_IMAGE
    # A node NotReady/Unknown this long counts as lost (its pods are force-deleted, the gang restarts).
    notready_seconds: float = 30.0
    resync_seconds: float = 30.0
    workers: int = 16
    # Watch timeouts: the server ends each watch after `watch_server_timeout`, and the client gives
    # up on a connection silent for `watch_client_timeout`, so a stuck watch cannot freeze us.
    watch_server_timeout: int = 120
    watch_client_timeout: int = 150
    request_timeout: float = 30.0
    max_backoff_seconds: int = 3600
    metrics_port: int = 8080
    health_port: int = 8081
    leader_election: bool = True
    lease_name: str = "kdistill-operator"
    lease_namespace: str = "kdistill-system"
    lease_duration_seconds: float = 15.0
    lease_renew_seconds: float = 5.0
    identity: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    # imagePullPolicy of worker and serving containers; "" leaves Kubernetes' default.
    image_pull_policy: str = field(default_factory=_env_pull_policy)
    # Jobs labelled kueue.x-k8s.io/queue-name wait for a Kueue Workload's admission (the chart's
    # kueue.enabled: it also grants the RBAC on workloads). Off, such a job fails with a clear message.
    kueue: bool = False

    def __post_init__(self) -> None:
        if self.image_pull_policy and self.image_pull_policy not in PULL_POLICIES:
            raise ValueError(f"image pull policy {self.image_pull_policy!r} is not one of {', '.join(PULL_POLICIES)}")


def default(name: str) -> Any:
    """The default of one Settings field: the CLI's flags take their defaults from here."""
    for f in fields(Settings):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise KeyError(f"Settings.{name} has no default")
    raise KeyError(f"Settings has no field {name!r}")
