"""Rank 0's status patches against a real kube-apiserver, and the Prometheus endpoint over HTTP."""

from __future__ import annotations

import logging
import socket
import time
import urllib.request

import pytest
from kubernetes import client

from kdistill.api import GROUP, PLURAL, VERSION
from kdistill.trainer.metrics import TrainerMetrics
from kdistill.trainer.progress import ProgressReporter, status_body
from tests.cluster.cluster import Cluster

from . import helpers


def test_status_body_holds_only_trainer_fields() -> None:
    body = status_body(
        stage="output", step=34, total_steps=100, loss=2.5, tokens_per_second=1234.56, last_checkpoint=(30, 0.0)
    )
    assert body == {
        "status": {
            "stage": "output",
            "step": 34,
            "totalSteps": 100,
            "progress": "34%",
            "loss": 2.5,
            "tokensPerSecond": 1234.6,
            "lastCheckpoint": {"step": 30, "time": "1970-01-01T00:00:00Z"},
        }
    }


@pytest.mark.cluster
def test_reporter_patches_status_subresource(
    cluster: Cluster, namespace: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.install_crd()
    job = helpers.job_dict("progress", "causal-lm", "pvc://models/t", "pvc://data/train.jsonl", "pvc://data/eval.jsonl")
    job["metadata"]["namespace"] = namespace
    api = client.CustomObjectsApi(cluster.api_client())
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    api.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "progress",
        {"status": {"phase": "Running", "restarts": 1}},
        _content_type="application/merge-patch+json",
    )
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("KDISTILL_JOB_NAME", "progress")
    monkeypatch.setenv("KDISTILL_JOB_NAMESPACE", namespace)
    reporter = ProgressReporter.from_env(min_interval=1.0)
    assert reporter is not None
    started = time.monotonic()
    for step in range(1, 21):  # 20 updates in well under a second: the rate limit sends few
        reporter.update(
            status_body(
                stage="output",
                step=step,
                total_steps=40,
                loss=1.0 / step,
                tokens_per_second=100.0,
                last_checkpoint=(10, time.time()) if step >= 10 else None,
            )
        )
    reporter.close()
    assert time.monotonic() - started < 15
    assert 1 <= reporter.patches_sent <= 3
    status = api.get_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "progress")["status"]
    assert status["step"] == 20 and status["progress"] == "50%" and status["stage"] == "output"
    assert status["lastCheckpoint"]["step"] == 10
    # Operator-owned fields are left alone.
    assert status["phase"] == "Running" and status["restarts"] == 1
    # A job that does not exist: the failed patch is logged, never raised.
    bad = ProgressReporter("no-such-job", namespace, min_interval=0.0)
    with caplog.at_level(logging.WARNING):
        bad.update(
            status_body(stage="x", step=1, total_steps=2, loss=None, tokens_per_second=None, last_checkpoint=None)
        )
        bad.close()
    assert bad.patches_sent == 0 and "no-such-job" in caplog.text


def test_metrics_served_on_the_configured_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("KDISTILL_METRICS_PORT", str(port))
    metrics = TrainerMetrics()
    assert metrics.serve_from_env() == port
    metrics.record_step(
        step=7,
        parts={"kd": 0.5, "ce": 2.0},
        temperature=3.0,
        tokens_per_second=900.0,
        step_seconds=0.2,
        learning_rate=1e-3,
    )
    metrics.checkpoint_seconds.observe(0.4)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'kdistill_train_loss{part="kd"} 0.5' in text and 'kdistill_train_loss{part="ce"} 2.0' in text
    assert "kdistill_train_temperature 3.0" in text and "kdistill_train_tokens_per_second 900.0" in text
    assert "kdistill_train_step_seconds_count 1.0" in text and "kdistill_train_checkpoint_seconds_count 1.0" in text
