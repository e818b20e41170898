"""The compression benchmark's configurations reach the job it runs: every field a configuration
names is in the job's gradientCompression block, and the rest keep the spec's defaults."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from kdistill.api import parse_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("compression_bench", ROOT / "benchmarks" / "compression.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _compression_block(bench, text: str, tmp_path: Path) -> dict:  # type: ignore[no-untyped-def]
    from parallel_common import write_job

    config = bench.parse_config(text)
    job = write_job(
        tmp_path / "job.yaml",
        tmp_path,
        world=2,
        steps=10,
        batch_size=8,
        top_k=config["top_k"],
        spec_defaults=True,
        spec_fields=bench.spec_fields(config, 400),
    )
    spec = yaml.safe_load(job.read_text())
    parse_job(spec)  # the API accepts what the benchmark writes
    return spec["spec"]["parallelism"]["gradientCompression"]


def test_a_field_left_at_its_default_does_not_drop_the_others(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The warm-up left at the spec's default ("-") once made the ramp after it vanish.
    assert _compression_block(bench, "r:0.01:-:200:-", tmp_path) == {"topK": 0.01, "rampSteps": 200}


def test_every_named_field_reaches_the_job(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    block = _compression_block(bench, "g:0.1:20:0:1:magnitude:gradient", tmp_path)
    assert block == {
        "topK": 0.1,
        "warmupSteps": 20,
        "rampSteps": 0,
        "freezeVariance": True,
        "selection": "magnitude",
        "compress": "gradient",
    }
    assert _compression_block(bench, "default:0.01:-:-:-", tmp_path) == {"topK": 0.01}
    assert _compression_block(bench, "f:0.01:-:15%:-:-:-:1", tmp_path) == {
        "topK": 0.01,
        "rampSteps": 60,  # 15% of the 400 steps
        "rampFrom": 1.0,
    }
    assert _compression_block(bench, "b:0.01:-:-:-:-:-:-:0.1", tmp_path) == {"topK": 0.01, "byteBudget": 0.1}


def test_a_malformed_configuration_is_refused(bench) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit, match="LABEL:P:WARMUP"):
        bench.parse_config("x:0.01:10")
