"""Shared pytest plugins. The `cluster` fixture (a real control plane) lives in tests/cluster/fixtures.py."""

pytest_plugins = ["tests.cluster.fixtures"]
