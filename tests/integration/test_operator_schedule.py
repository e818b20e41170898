"""DistillationSchedules run by the real operator (`kdistill operator`, a subprocess) on the real
control plane with kwok GPU nodes (rung 3). The test plays the trainer: it ends each run's
worker pod with the termination message rank 0 writes, metrics included.

One schedule every minute goes through: a run created on its tick with its data and the
schedule as owner; Forbid holding the next tick while a run is active, and starting it once the
run ends; the first run promoted (the schedule's serving Deployment); an operator killed and
restarted without a duplicate run; Replace deleting the active run at the next tick; a worse
run refused with the serving Deployment untouched; the history limits deleting finished runs
but never the promoted one; a better run served as a canary beside the champion and rolled back
when its servers show no traffic within analysisSeconds. A second schedule, created with a lastScheduleTime long past,
starts one run for its missed ticks, not one per tick.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kdistill.operator import names
from tests.cluster import Cluster
from tests.operator import cluster_helpers as h
from tests.operator.cluster_helpers import Jobs, OperatorProcess, eventually, job_body

pytestmark = pytest.mark.cluster
lease_namespace, claims = h.lease_namespace, h.claims

GROUP, VERSION, PLURAL = "kdistill.io", "v1alpha1", "distillationschedules"


class Schedules:
    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.ns = namespace
        self.api = client.CustomObjectsApi(cluster.api_client())
        self.core = cluster.core()

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.api.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def get(self, name: str) -> dict[str, Any]:
        return self.api.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def patch_status(self, name: str, status: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object_status(GROUP, VERSION, self.ns, PLURAL, name, {"status": status})

    def events(self, name: str) -> list[Any]:
        return self.core.list_namespaced_event(
            self.ns, field_selector=f"involvedObject.name={name},involvedObject.kind=DistillationSchedule"
        ).items


def schedule_body(name: str, **spec: Any) -> dict[str, Any]:
    template = job_body("x", nodes=1, gpus=1)["spec"]
    del template["data"]  # each run fills data.train and data.eval
    template["serving"]["qualityGate"] = {"minRetention": 0.5}
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistillationSchedule",
        "metadata": {"name": name},
        "spec": {
            "schedule": "* * * * *",
            "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": 0,
            "failedJobsHistoryLimit": 1,
            "data": {"partitions": "pvc://data/parts/", "replay": {"fraction": 0.2}},
            "warmStart": "lastPromoted",
            "promotion": {
                "gate": {"minRetention": 0.8, "tolerance": 0.01, "maxForgetting": 0.05},
                "canary": {"weight": 10, "analysisSeconds": 5},
            },
            "jobTemplate": {"metadata": {"labels": {"team": "nlp"}}, "spec": template},
        },
    }
    body["spec"].update(spec)
    return body


def run_metrics(student: float, *, champion: float | None = None, older: float | None = None) -> dict[str, Any]:
    """What rank 0 writes on success: perplexities (lower is better) against a teacher at 10."""
    metrics: dict[str, Any] = {"metric": "perplexity", "teacher": 10.0, "student": student, "retention": 10 / student}
    if champion is not None:
        metrics.update(champion=champion, studentOlder=older, championOlder=champion)
    return {"reason": "Succeeded", "retryable": False, "message": "done", "result": {"metrics": metrics}}


def scheduled_jobs(jobs: Jobs, schedule: str) -> list[dict[str, Any]]:
    items = jobs.api.list_namespaced_custom_object(
        "kdistill.io", "v1alpha1", jobs.ns, "distillationjobs", label_selector=f"kdistill.io/schedule={schedule}"
    )["items"]
    return sorted((j for j in items if not j["metadata"].get("deletionTimestamp")), key=lambda j: j["metadata"]["name"])


def tick(name: str, job: str) -> datetime:
    return datetime.fromtimestamp(int(job.removeprefix(f"{name}-")) * 60, UTC)


def finish(cluster: Cluster, jobs: Jobs, job: str, message: dict[str, Any]) -> None:
    (pod,) = jobs.wait_running_gang(job, 1, attempt=0)
    # Not waited for here: with successfulJobsHistoryLimit 0 the job goes as soon as it is judged.
    cluster.succeed_pod(jobs.ns, pod.metadata.name, message)


def wait_until(when: datetime) -> None:
    delay = (when - datetime.now(UTC)).total_seconds()
    if delay > 0:
        time.sleep(delay)


@pytest.fixture
def env(
    cluster: Cluster, claims: str, lease_namespace: str, tmp_path: Path
) -> Iterator[tuple[Jobs, Schedules, OperatorProcess]]:
    op = h.operator_for(cluster, claims, lease_namespace, tmp_path / "operator.log").start()
    try:
        op.wait_started()
        yield Jobs(cluster, claims), Schedules(cluster, claims), op
    finally:
        code = op.stop()
        print(op.log_path.read_text()[-4000:])
        assert code in (0, None), f"operator exited {code}"


def test_a_schedule_runs_on_its_ticks_gates_promotes_and_keeps_its_history(
    cluster: Cluster, env: tuple[Jobs, Schedules, OperatorProcess]
) -> None:
    jobs, schedules, op = env
    ns, name = jobs.ns, "every-minute"
    created = schedules.create(schedule_body(name))
    created_at = datetime.fromisoformat(created["metadata"]["creationTimestamp"].replace("Z", "+00:00"))

    # 1. The first tick after creation starts run A, the template with its data and no rollout.
    (a,) = eventually(lambda: scheduled_jobs(jobs, name), "the first run", 90)
    a_name = a["metadata"]["name"]
    assert created_at < tick(name, a_name) <= created_at + timedelta(seconds=61)
    assert a["metadata"]["labels"]["team"] == "nlp"
    assert a["metadata"]["ownerReferences"][0]["kind"] == "DistillationSchedule"
    run_data = a["spec"]["data"]["runData"]
    assert run_data["partitions"] == "pvc://data/parts/" and run_data["run"] == a_name
    assert run_data["replayFraction"] == 0.2 and "champion" not in run_data
    assert a["spec"]["data"]["train"] == f"/mnt/checkpoints/{ns}/{a_name}/data/train.jsonl"
    assert a["spec"]["serving"]["enabled"] is False
    eventually(lambda: schedules.status(name).get("active") == [a_name], "status.active names run A", 30)
    assert schedules.status(name)["lastScheduleTime"] == tick(name, a_name).strftime("%Y-%m-%dT%H:%M:%SZ")

    # 2. Forbid: the next tick passes while A runs; no new job.
    wait_until(tick(name, a_name) + timedelta(seconds=65))
    assert [j["metadata"]["name"] for j in scheduled_jobs(jobs, name)] == [a_name]

    # 3. A succeeds and is promoted; the held tick then starts run B at once, against champion A.
    finish(cluster, jobs, a_name, run_metrics(11.0))
    status = eventually(lambda: (s := schedules.status(name)).get("promoted") and s, "A promoted", 60)
    assert status["promoted"]["job"] == a_name and status["promoted"]["version"] == 1
    (entry,) = status["history"]
    assert entry["promoted"] and entry["job"] == a_name and "no student served yet" in entry["reason"]
    serving = jobs.apps.read_namespaced_deployment(f"{name}-serving", ns)
    assert serving.metadata.annotations[names.ANNOTATION_MODEL_PATH] == f"/mnt/checkpoints/{ns}/{a_name}/student-int8"
    assert serving.metadata.owner_references[0].kind == "DistillationSchedule"
    b = eventually(lambda: [j for j in scheduled_jobs(jobs, name) if j["metadata"]["name"] != a_name], "run B", 30)[0]
    b_name = b["metadata"]["name"]
    # The held tick (or, on a machine slow enough to miss it too, a later one).
    assert tick(name, a_name) < tick(name, b_name) <= datetime.now(UTC)
    assert b["spec"]["data"]["runData"]["champion"] == f"pvc://ckpt/{ns}/{a_name}"
    assert b["spec"]["student"] == {"model": f"pvc://ckpt/{ns}/{a_name}/student"}  # warmStart lastPromoted
    assert any(e.reason == "Promoted" for e in schedules.events(name))

    # 4. The operator is killed and restarted: the same runs, no duplicate.
    op.kill()
    op.start()
    op.wait_started()
    eventually(lambda: schedules.status(name).get("active") == [b_name], "status.active names run B", 30)
    assert {j["metadata"]["name"] for j in scheduled_jobs(jobs, name)} == {a_name, b_name}

    # 5. Replace: the next tick deletes the active run B and starts C.
    schedules.patch_spec(name, {"concurrencyPolicy": "Replace"})
    c = eventually(
        lambda: [j for j in scheduled_jobs(jobs, name) if j["metadata"]["name"] not in (a_name, b_name)],
        "run C at the next tick",
        90,
    )[0]
    c_name = c["metadata"]["name"]
    eventually(lambda: not jobs.exists(b_name), "run B deleted by Replace", 30)

    # 6. C is worse than the champion on the newest data: refused, the serving Deployment unchanged.
    finish(cluster, jobs, c_name, run_metrics(11.5, champion=11.0, older=11.0))
    status = eventually(
        lambda: (s := schedules.status(name)) and any(e["job"] == c_name for e in s.get("history", [])) and s,
        "C judged",
        60,
    )
    refused = next(e for e in status["history"] if e["job"] == c_name)
    assert not refused["promoted"] and "beyond tolerance" in refused["reason"], refused
    assert refused["servingMetric"] == 11.0 and refused["challengerMetric"] == 11.5
    assert status["promoted"]["job"] == a_name
    serving = jobs.apps.read_namespaced_deployment(f"{name}-serving", ns)
    assert serving.metadata.annotations[names.ANNOTATION_MODEL_PATH].endswith(f"/{a_name}/student-int8")
    assert any(e.reason == "NotPromoted" and c_name in e.message for e in schedules.events(name))

    # 7. successfulJobsHistoryLimit 0: C is deleted; A, promoted, stays.
    eventually(lambda: not jobs.exists(c_name), "C deleted by the history limit", 30)
    assert jobs.exists(a_name)

    # 8. The next run, D, beats the champion: it serves beside it as a canary first. Its servers
    #    answer no /metrics here (kwok pods), so after analysisSeconds without traffic it is
    #    rolled back: the canary Deployment goes, the champion's is untouched.
    d = eventually(
        lambda: [j for j in scheduled_jobs(jobs, name) if j["metadata"]["name"] not in (a_name, c_name)],
        "run D at the next tick",
        90,
    )[0]
    d_name = d["metadata"]["name"]
    finish(cluster, jobs, d_name, run_metrics(10.5, champion=11.0, older=11.0))
    canary = eventually(lambda: schedules.status(name).get("canary"), "D's canary started", 60)
    assert canary["job"] == d_name and canary["version"] == 2 and canary["replicas"] == 1 and canary["share"] == 0.5
    dep = jobs.apps.read_namespaced_deployment(f"{name}-serving-canary", ns)
    assert dep.spec.template.metadata.labels["kdistill.io/track"] == "canary"
    assert dep.metadata.annotations[names.ANNOTATION_MODEL_PATH].endswith(f"/{d_name}/student-int8")
    status = eventually(
        lambda: (s := schedules.status(name)) and any(e["job"] == d_name for e in s.get("history", [])) and s,
        "D's canary judged",
        90,
    )
    rolled = next(e for e in status["history"] if e["job"] == d_name)
    assert not rolled["promoted"] and "canary rolled back: not enough traffic" in rolled["reason"], rolled
    assert "canary" not in status and status["promoted"]["job"] == a_name
    eventually(
        lambda: (
            f"{name}-serving-canary" not in {x.metadata.name for x in jobs.apps.list_namespaced_deployment(ns).items}
        ),
        "the canary Deployment deleted",
        30,
    )
    serving = jobs.apps.read_namespaced_deployment(f"{name}-serving", ns)
    assert serving.metadata.annotations[names.ANNOTATION_MODEL_PATH].endswith(f"/{a_name}/student-int8")
    assert any(e.reason == "RolledBack" and d_name in e.message for e in schedules.events(name))


def test_missed_ticks_start_one_run_not_one_per_tick(
    cluster: Cluster, env: tuple[Jobs, Schedules, OperatorProcess]
) -> None:
    jobs, schedules, _ = env
    name = "missed"
    schedules.create(schedule_body(name, suspend=True))
    # As if the operator had been down for ten minutes since the last run.
    long_ago = (datetime.now(UTC) - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    schedules.patch_status(name, {"lastScheduleTime": long_ago})
    schedules.patch_spec(name, {"suspend": False})
    (run,) = eventually(lambda: scheduled_jobs(jobs, name), "one run for the missed ticks", 30)
    # The latest missed tick, not the oldest.
    assert datetime.now(UTC) - tick(name, run["metadata"]["name"]) < timedelta(seconds=70)
    deadline = time.monotonic() + 3  # the next passes start nothing more
    while time.monotonic() < deadline:
        assert len(scheduled_jobs(jobs, name)) == 1
        time.sleep(0.5)
    assert any(e.reason == "RunStarted" and "missed" in e.message for e in schedules.events(name))
