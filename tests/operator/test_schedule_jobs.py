"""The jobs a DistillationSchedule creates (operator/schedule_jobs.py), as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from kdistill.api import parse_job, parse_schedule
from kdistill.operator import builders, names
from kdistill.operator.schedule_jobs import (
    ScheduleBuildError,
    check_runnable,
    run_job,
    serving_job,
)
from kdistill.operator.settings import Settings
from tests.schedule_table import base_schedule

RUN_TIME = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)


def schedule_body(**spec: Any) -> dict[str, Any]:
    body = base_schedule("nightly")
    body["metadata"].update(namespace="ml", uid="0000-1111")
    body["spec"]["jobTemplate"]["spec"]["checkpoint"] = {"volume": {"claimName": "ckpt"}}
    body["spec"]["jobTemplate"]["spec"]["serving"] = {"replicas": 2, "qualityGate": {"minRetention": 0.5}}
    body["spec"]["jobTemplate"]["metadata"] = {"labels": {"team": "nlp"}}
    body["spec"].update(spec)
    return body


def parsed(body: dict[str, Any]) -> Any:
    schedule = parse_schedule({k: v for k, v in body.items() if k != "status"})
    schedule.metadata.namespace = body["metadata"]["namespace"]
    return schedule


def test_a_run_job_is_the_template_with_its_data_its_champion_and_no_rollout() -> None:
    body = schedule_body(data={"partitions": "pvc://data/intents/", "window": 2, "replay": {"fraction": 0.2}})
    job = run_job(parsed(body), body, RUN_TIME, champion="nightly-29416000")
    minutes = int(RUN_TIME.timestamp()) // 60
    meta = job["metadata"]
    assert meta["name"] == f"nightly-{minutes}" and meta["namespace"] == "ml"
    assert meta["labels"] == {"team": "nlp", names.LABEL_SCHEDULE: "nightly", names.LABEL_MANAGED_BY: names.MANAGER}
    assert meta["annotations"][names.ANNOTATION_SCHEDULED_TIME] == "2026-12-05T03:00:00Z"
    (owner,) = meta["ownerReferences"]
    assert owner["kind"] == "DistillationSchedule" and owner["uid"] == "0000-1111" and owner["controller"]
    spec = job["spec"]
    out = f"/mnt/checkpoints/ml/nightly-{minutes}"
    assert spec["data"]["train"] == f"{out}/data/train.jsonl" and spec["data"]["eval"] == f"{out}/data/eval-new.jsonl"
    assert spec["data"]["runData"] == {
        "partitions": "pvc://data/intents/",
        "window": 2,
        "replayFraction": 0.2,
        "replayPartitions": 7,
        "seed": 0,
        "run": f"nightly-{minutes}",
        "champion": "pvc://ckpt/ml/nightly-29416000",
    }
    assert spec["serving"]["enabled"] is False
    assert spec["student"] == {"fromTeacher": {"numLayers": 2}}  # warmStart none
    # The job passes the API's own rules, and its pods mount the partitions and the champion.
    job_obj = parse_job(job)
    pod = builders.worker_pod(job_obj, 0, 0, Settings())
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"ckpt", "data", "models"}


def test_warm_start_points_the_student_at_the_champions_float_weights() -> None:
    body = schedule_body(warmStart="lastPromoted")
    first = run_job(parsed(body), body, RUN_TIME, champion=None)
    assert first["spec"]["student"] == {"fromTeacher": {"numLayers": 2}}
    assert "champion" not in first["spec"]["data"]["runData"]
    later = run_job(parsed(body), body, RUN_TIME, champion="nightly-1")
    assert later["spec"]["student"] == {"model": "pvc://ckpt/ml/nightly-1/student"}


def test_a_per_run_claim_names_the_champions_own_claim() -> None:
    body = schedule_body()
    body["spec"]["jobTemplate"]["spec"]["checkpoint"] = {"volume": {"size": "10Gi", "storageClassName": "nfs"}}
    job = run_job(parsed(body), body, RUN_TIME, champion="nightly-1")
    assert job["spec"]["data"]["runData"]["champion"] == f"pvc://{names.checkpoint_claim('nightly-1')}/ml/nightly-1"


def test_the_promoted_run_serves_under_the_schedules_one_name() -> None:
    body = schedule_body()
    job = serving_job(parsed(body), "nightly-7")
    dep = builders.serving_deployment(job, Settings())
    assert dep["metadata"]["name"] == "nightly-serving" and dep["spec"]["replicas"] == 2
    assert dep["metadata"]["annotations"][names.ANNOTATION_MODEL_PATH] == "/mnt/checkpoints/ml/nightly-7/student-int8"
    body["spec"]["jobTemplate"]["spec"]["serving"]["name"] = "intents"
    assert builders.serving_service(serving_job(parsed(body), "nightly-7"))["metadata"]["name"] == "intents"


def test_a_schedule_without_a_checkpoint_volume_cannot_run_in_a_cluster() -> None:
    body = schedule_body()
    del body["spec"]["jobTemplate"]["spec"]["checkpoint"]
    with pytest.raises(ScheduleBuildError, match=r"spec\.jobTemplate\.spec\.checkpoint\.volume"):
        check_runnable(parsed(body))
    body = schedule_body(data={"partitions": "hf://org/data"})
    with pytest.raises(ScheduleBuildError, match=r"spec\.data\.partitions"):
        check_runnable(parsed(body))
