"""A real Kubernetes control plane for tests (rung 3 of the testing ladder).

``start_cluster()`` runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and kwok (fake GPU nodes) from the binaries ``make cluster-bins`` builds; the pytest
fixture ``cluster`` (tests/cluster/fixtures.py) starts one per session, and
``python -m tests.cluster`` starts one for a person. The pod annotation contract
that lets tests play the trainer is documented in ``tests.cluster.kwok``.
"""

from .binaries import MissingBinariesError
from .cluster import Cluster, CommandError, start_cluster
from .kwok import DELAY, EXIT_CODE, MESSAGE, OUTCOME, REASON, outcome_annotations

__all__ = [
    "DELAY",
    "EXIT_CODE",
    "MESSAGE",
    "OUTCOME",
    "REASON",
    "Cluster",
    "CommandError",
    "MissingBinariesError",
    "outcome_annotations",
    "start_cluster",
]
