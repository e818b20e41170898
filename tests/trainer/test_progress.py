"""Rank 0's status patches against a real kube-apiserver, and the Prometheus endpoint over HTTP."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client

from kdistill.api import GROUP, PLURAL, VERSION
from kdistill.trainer.metrics import TrainerMetrics
from kdistill.trainer.progress import ProgressReporter, fenced_patch, status_body
from tests.cluster.cluster import Cluster
from tests.parallel.harness import REPO

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


def test_fenced_patch_tests_the_attempt_first() -> None:
    body = status_body(
        stage="output", step=3, total_steps=10, loss=None, tokens_per_second=None, last_checkpoint=None,
        productive_seconds=12.34,
    )  # fmt: skip
    ops = fenced_patch(body, 4)
    assert ops[0] == {"op": "test", "path": "/status/attempt", "value": 4}
    assert {"op": "add", "path": "/status/productiveSeconds", "value": 12.3} in ops
    assert {op["path"] for op in ops[1:]} == {f"/status/{k}" for k in body["status"]}


@pytest.mark.cluster
def test_a_status_patch_of_an_older_attempt_is_refused_by_the_api_server(
    cluster: Cluster, namespace: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Rank 0 of attempt 1 still runs on a partitioned node while the operator started attempt 2:
    its progress patches are refused by the API server itself (the JSON patch's `test` of
    /status/attempt), under the per-job Role the operator creates, while attempt 2's go through."""
    from kdistill.api import parse_job
    from kdistill.operator import builders

    cluster.install_crd()
    body = helpers.job_dict("fenced", "causal-lm", "pvc://models/t", "pvc://data/train.jsonl", "pvc://data/eval.jsonl")
    body["metadata"]["namespace"] = namespace
    api = client.CustomObjectsApi(cluster.api_client())
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    job = parse_job(body)
    job.metadata.namespace = namespace
    core, rbac = cluster.core(), client.RbacAuthorizationV1Api(cluster.api_client())
    account = ""
    for obj in builders.trainer_rbac(job):
        if obj["kind"] == "ServiceAccount":
            core.create_namespaced_service_account(namespace, obj)
            account = obj["metadata"]["name"]
        elif obj["kind"] == "Role":
            rbac.create_namespaced_role(namespace, obj)
        else:
            rbac.create_namespaced_role_binding(namespace, obj)

    def operator_sets(status: dict[str, object]) -> None:
        api.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "fenced", {"status": status},
            _content_type="application/merge-patch+json",
        )  # fmt: skip

    def status() -> dict[str, object]:
        return api.get_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "fenced")["status"]

    def progress(step: int) -> dict[str, object]:
        return status_body(
            stage="output", step=step, total_steps=40, loss=1.0, tokens_per_second=10.0, last_checkpoint=(step, 0.0),
            productive_seconds=float(step),
        )  # fmt: skip

    operator_sets({"phase": "Running", "restarts": 1, "evictions": 0, "attempt": 1})
    monkeypatch.setenv("KUBECONFIG", str(cluster.serviceaccount_kubeconfig(namespace, account)))
    monkeypatch.setenv("KDISTILL_JOB_NAME", "fenced")
    monkeypatch.setenv("KDISTILL_JOB_NAMESPACE", namespace)
    monkeypatch.setenv("KDISTILL_ATTEMPT", "1")
    old = ProgressReporter.from_env(min_interval=0.0)
    assert old is not None and old.attempt == 1
    old.update(progress(4))
    deadline = time.monotonic() + 30
    while status().get("step") != 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status()["step"] == 4 and status()["productiveSeconds"] == 4.0  # attempt 1 is current: it writes
    # The operator restarts the gang: attempt 2. Rank 0 of attempt 1 lives on and reports again.
    operator_sets({"restarts": 2, "attempt": 2})
    monkeypatch.setenv("KDISTILL_ATTEMPT", "2")
    new = ProgressReporter.from_env(min_interval=0.0)
    assert new is not None and new.attempt == 2
    with caplog.at_level(logging.ERROR):
        old.update(progress(9))
        old.close()
    assert old.fenced == 2 and old.patches_sent == 1
    assert "fenced: status patch of" in caplog.text and "attempt 1 was superseded by attempt 2" in caplog.text
    after_old = status()
    assert after_old["step"] == 4 and after_old["lastCheckpoint"]["step"] == 4  # type: ignore[index]
    # The current attempt's patches go through.
    new.update(progress(6))
    new.close()
    assert new.fenced is None and new.patches_sent == 1
    current = status()
    assert current["step"] == 6 and current["lastCheckpoint"]["step"] == 6  # type: ignore[index]
    assert current["attempt"] == 2 and current["restarts"] == 2 and current["phase"] == "Running"


@pytest.mark.cluster
def test_a_trainer_run_reports_only_complete_checkpoints_and_its_productive_seconds(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """A real trainer process (attempt 0) patches a real job's status through the per-job Role:
    status.lastCheckpoint names a checkpoint whose manifest verifies, productiveSeconds is set."""
    from kdistill.api import parse_job
    from kdistill.operator import builders
    from kdistill.trainer.checkpoint import CheckpointManager
    from tests.parallel.jobs import make_job

    cluster.install_crd()
    body = helpers.job_dict("reports", "causal-lm", "pvc://models/t", "pvc://data/train.jsonl", "pvc://data/eval.jsonl")
    body["metadata"]["namespace"] = namespace
    api = client.CustomObjectsApi(cluster.api_client())
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    job = parse_job(body)
    job.metadata.namespace = namespace
    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    for obj in builders.trainer_rbac(job):
        kind = obj["kind"]
        if kind == "ServiceAccount":
            cluster.core().create_namespaced_service_account(namespace, obj)
        elif kind == "Role":
            rbac.create_namespaced_role(namespace, obj)
        else:
            rbac.create_namespaced_role_binding(namespace, obj)
    account = builders.trainer_service_account_name(job)
    api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "reports", {"status": {"phase": "Running", "attempt": 0}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    job_file = make_job(tmp_path / "job", world=1, steps=8, every=4, batch_size=4, layers=2, name="reports")
    out = tmp_path / "out"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TRANSFORMERS_VERBOSITY="error",
        KUBECONFIG=str(cluster.serviceaccount_kubeconfig(namespace, account)),
        KDISTILL_JOB_NAME="reports",
        KDISTILL_JOB_NAMESPACE=namespace,
        KDISTILL_ATTEMPT="0",
        KDISTILL_TERMINATION_LOG=str(tmp_path / "termination.log"),
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run(
        [sys.executable, "-P", "-m", "kdistill.trainer", "--config", str(job_file), "--output", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "status patch" not in run.stderr, run.stderr[-3000:]  # no patch failed
    status = api.get_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "reports")["status"]
    assert status["step"] == 8 and status["attempt"] == 0
    named = out / "checkpoints" / f"step-{status['lastCheckpoint']['step']:09d}"
    assert status["lastCheckpoint"]["step"] == 8 and CheckpointManager.verify(named) is None
    result = json.loads((out / "result.json").read_text())
    assert 0 < status["productiveSeconds"] <= result["trainSeconds"] + 0.1
