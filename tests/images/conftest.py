"""Fixtures for the image tests: dockerd (started by the session) and the images."""

from __future__ import annotations

import pytest

from .docker import Docker, start_dockerd


@pytest.fixture(scope="session")
def docker() -> Docker:
    return Docker(start_dockerd())


@pytest.fixture(scope="session")
def operator_image(docker: Docker) -> str:
    return docker.ensure_image("operator")


@pytest.fixture(scope="session")
def trainer_image(docker: Docker) -> str:
    return docker.ensure_image("trainer")
