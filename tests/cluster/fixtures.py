"""pytest fixtures for the real control plane (registered by tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .binaries import MissingBinariesError
from .cluster import Cluster, start_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """One control plane with kwok GPU nodes for the whole test session.

    Missing binaries fail the tests (they are not skipped): run `make cluster-bins`.
    """
    try:
        running = start_cluster()
    except MissingBinariesError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    name = cluster.create_namespace()
    yield name
    cluster.core().delete_namespace(name)
