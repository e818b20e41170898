"""Real servers (``kdistill serve`` child processes on loopback) over tiny real INT8 artifacts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.helpers import ServerProcess, make_artifact, running_server


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
