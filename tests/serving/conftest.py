"""Real servers (``kdistill serve`` child processes on loopback) over tiny real INT8 artifacts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.helpers import ServerProcess, make_artifact, running_server


@pytest.fixture(scope="session", autouse=True)
def int8_kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The servers' INT8 kernel choices go to a cache of this session (inherited by the server
    processes), not the user's home."""
    from kdistill.serving.kernel_choice import CACHE_DIR_ENV

    path = tmp_path_factory.mktemp("kernel-cache")
    before = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(path)
    yield path
    if before is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = before


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def lm_artifact(artifacts: Path) -> Path:
    return make_artifact(artifacts, "causal-lm", "ptq-int8")


@pytest.fixture(scope="session")
def cls_artifact(artifacts: Path) -> Path:
    return make_artifact(artifacts, "sequence-classification", "ptq-int8")


@pytest.fixture(scope="session")
def lm_server(lm_artifact: Path) -> Iterator[ServerProcess]:
    with running_server(lm_artifact, "--max-tokens-limit", "64", "--max-wait-ms", "5") as server:
        yield server


@pytest.fixture(scope="session")
def cls_server(cls_artifact: Path) -> Iterator[ServerProcess]:
    with running_server(cls_artifact, "--max-wait-ms", "5") as server:
        yield server
