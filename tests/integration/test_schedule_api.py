"""The DistillationSchedule CRD on the real API server (rung 3): the schedule table checked by the
API server's schema and CEL rules against pydantic, kubectl's columns and short name, the status
subresource, and the template's defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kdistill.api import JobValidationError, parse_schedule
from tests.cluster import Cluster
from tests.schedule_table import BAD_SCHEDULES, GOOD_SCHEDULES, base_schedule

pytestmark = pytest.mark.cluster

CRD = Path(__file__).resolve().parents[2] / "crds" / "kdistill.io_distillationschedules.yaml"
GROUP, VERSION, PLURAL = "kdistill.io", "v1alpha1", "distillationschedules"


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> None:
    cluster.install_crd(CRD)


def create(cluster: Cluster, namespace: str, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    api = client.CustomObjectsApi(cluster.api_client())
    kwargs: dict[str, Any] = {"field_validation": "Strict"}
    if dry_run:
        kwargs["dry_run"] = "All"
    return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, **kwargs)


def api_error(exc: client.ApiException) -> tuple[str, list[str]]:
    body = json.loads(exc.body)
    causes = (body.get("details") or {}).get("causes") or []
    return body.get("message", ""), [c.get("field", "") for c in causes]


@pytest.mark.parametrize(("name", "schedule"), GOOD_SCHEDULES, ids=[g[0] for g in GOOD_SCHEDULES])
def test_good_schedules_are_accepted_by_the_api_server_and_pydantic(
    cluster: Cluster, crd: None, name: str, schedule: dict[str, Any]
) -> None:
    parse_schedule(schedule)
    create(cluster, "default", schedule, dry_run=True)


@pytest.mark.parametrize(("name", "schedule", "path"), BAD_SCHEDULES, ids=[b[0] for b in BAD_SCHEDULES])
def test_bad_schedules_are_rejected_by_the_api_server_and_pydantic(
    cluster: Cluster, crd: None, name: str, schedule: dict[str, Any], path: str
) -> None:
    with pytest.raises(JobValidationError):
        parse_schedule(schedule)
    with pytest.raises(client.ApiException) as info:
        create(cluster, "default", schedule, dry_run=True)
    assert info.value.status in (400, 422), info.value.body
    message, fields = api_error(info.value)
    assert path in fields or path in message, f"{name}: expected {path} in {fields} / {message}"


def test_defaults_fill_the_template_and_pydantic_reads_them_back(cluster: Cluster, crd: None, namespace: str) -> None:
    created = create(cluster, namespace, base_schedule("defaults"))
    spec = created["spec"]
    assert (spec["timeZone"], spec["concurrencyPolicy"], spec["successfulJobsHistoryLimit"]) == ("UTC", "Forbid", 3)
    assert spec["promotion"]["gate"]["minRetention"] == 0.9
    # The template's absent data section is defaulted with the job's data defaults, no train/eval.
    data = spec["jobTemplate"]["spec"]["data"]
    assert data["textField"] == "text" and "train" not in data and "eval" not in data
    assert spec["jobTemplate"]["spec"]["distillation"]["loss"] == "forward-kl"
    parsed = parse_schedule(
        {k: created[k] for k in ("apiVersion", "kind", "spec")} | {"metadata": {"name": "defaults"}}
    )
    assert parsed.spec == parse_schedule(base_schedule("defaults")).spec


def test_kubectl_get_dsch_shows_the_columns_and_status_is_a_subresource(
    cluster: Cluster, crd: None, namespace: str
) -> None:
    resources = cluster.kubectl("api-resources", f"--api-group={GROUP}", "-o", "wide").stdout
    assert "distillationschedules" in resources and " dsch " in resources
    create(cluster, namespace, base_schedule("columns"))
    api = client.CustomObjectsApi(cluster.api_client())
    status = {
        "lastScheduleTime": "2026-12-05T03:00:00Z",
        "active": ["columns-29417220"],
        "promoted": {"job": "columns-29415780", "version": 2, "retention": 0.95},
        "history": [
            {"job": "columns-29415780", "version": 2, "retention": 0.95, "promoted": True, "reason": "promoted: ..."}
        ],
    }
    # A status written through the main resource is dropped; through /status it sticks.
    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "columns", {"status": status})
    assert "status" not in api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "columns")
    api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "columns", {"status": status})
    out = cluster.kubectl("get", "dsch", "columns", "-n", namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "SCHEDULE", "SUSPEND", "LAST", "RUN", "PROMOTED", "AGE"]
    row = out[1].split()
    assert row[0] == "columns" and " ".join(row[1:6]) == "0 3 * * *" and row[6] == "false"
    assert row[8] == "columns-29415780"
