"""The serving Deployment's command carries ``serving.fallback`` to ``kdistill serve``, in flags
the command line really takes (parsed by the real CLI, not compared with a hand-written list)."""

from __future__ import annotations

from typing import Any

import click
import pytest
import typer

from kdistill.api import parse_job
from kdistill.cli.main import app
from kdistill.cli.serve import fallback_options
from kdistill.operator import builders
from kdistill.serving.cascade import FallbackOptions


def job(serving: dict[str, Any]):  # type: ignore[no-untyped-def]
    return parse_job(
        {
            "apiVersion": "kdistill.io/v1alpha1",
            "kind": "DistillationJob",
            "metadata": {"name": "intent", "namespace": "ml", "uid": "u-1"},
            "spec": {
                "task": "sequence-classification",
                "teacher": {"model": "pvc://models/teacher"},
                "student": {"fromTeacher": {"numLayers": 2}},
                "data": {"train": "pvc://data/t.jsonl", "eval": "pvc://data/e.jsonl", "labelField": "label"},
                "checkpoint": {"volume": {"claimName": "ckpt"}},
                "serving": serving,
            },
        }
    )


def parsed(command: list[str]) -> dict[str, Any]:
    """``kdistill serve ...`` parsed by the CLI's own parser (types, ranges), without running it."""
    assert command[:2] == ["kdistill", "serve"]
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    ctx: click.Context = serve.make_context("serve", command[2:])
    return dict(ctx.params)


def options(params: dict[str, Any]) -> FallbackOptions | None:
    return fallback_options(
        params["fallback_url"],
        params["min_confidence"],
        params["fallback_timeout"],
        params["fallback_model"],
        params["fallback_on_error"],
        params["fallback_max_in_flight"],
    )


def test_no_fallback_no_cascade_flags() -> None:
    command = builders.serving_command(job({}))
    assert not [a for a in command if a.startswith("--fallback") or a == "--min-confidence"]
    assert options(parsed(command)) is None


def test_fallback_defaults_reach_the_server() -> None:
    j = job({"fallback": {"endpoint": "http://intent-teacher.ml.svc:8080"}})
    got = options(parsed(builders.serving_command(j)))
    assert got == FallbackOptions(url="http://intent-teacher.ml.svc:8080", min_confidence=0.6, timeout_s=30.0)


@pytest.mark.parametrize("model", ["", "teacher-7b"])
def test_every_fallback_option_reaches_the_server(model: str) -> None:
    fb = {
        "endpoint": "https://gw.example.com/teacher/",
        "minConfidence": 0.123456789,
        "timeoutSeconds": 2.5,
        "model": model,
        "onTeacherError": "student",
        "maxInFlight": 7,
    }
    params = parsed(builders.serving_command(job({"fallback": fb, "port": 9000})))
    assert params["port"] == 9000  # the rest of the command still parses alongside
    assert options(params) == FallbackOptions(
        url="https://gw.example.com/teacher/",
        min_confidence=0.123456789,
        timeout_s=2.5,
        model=model,
        on_teacher_error="student",
        max_in_flight=7,
    )
