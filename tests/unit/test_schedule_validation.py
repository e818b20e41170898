"""The pydantic side of the schedule table, the template's data rule, and loading by kind."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kdistill.api import DistillationSchedule, JobValidationError, load_resource, parse_job, parse_schedule
from kdistill.api.schedule import FILLED_PER_RUN
from tests.schedule_table import BAD_SCHEDULES, GOOD_SCHEDULES, base_schedule
from tests.spec_table import base_job


@pytest.mark.parametrize(("name", "schedule"), GOOD_SCHEDULES, ids=[g[0] for g in GOOD_SCHEDULES])
def test_good_schedules_are_accepted(name: str, schedule: dict) -> None:
    parse_schedule(schedule)


@pytest.mark.parametrize(("name", "schedule", "path"), BAD_SCHEDULES, ids=[b[0] for b in BAD_SCHEDULES])
def test_bad_schedules_are_rejected_at_their_field(name: str, schedule: dict, path: str) -> None:
    with pytest.raises(JobValidationError) as info:
        parse_schedule(schedule)
    paths = [e.path for e in info.value.errors]
    assert path in paths, f"{name}: expected an error at {path}, got {info.value}"
    for err in info.value.errors:
        assert len(err.message) > 10, f"message too vague: {err}"


def test_table_is_large_and_distinct() -> None:
    assert len(BAD_SCHEDULES) >= 25
    assert len({b[0] for b in BAD_SCHEDULES}) == len(BAD_SCHEDULES)


def test_cron_messages_name_the_problem() -> None:
    cases = {
        "61 * * * *": "minute: 61 is outside 0-59",
        "0 3 * *": "has 4 field(s)",
        "0 3 * * funday": "day of week: 'funday' is not a number",
        "0 3 10-2 * *": "range '10-2' starts after it ends",
        "0 0 30 feb *": "never runs",
    }
    for cron, needle in cases.items():
        with pytest.raises(JobValidationError) as info:
            parse_schedule({**base_schedule(), "spec": {**base_schedule()["spec"], "schedule": cron}})
        assert needle in str(info.value), (cron, str(info.value))


def test_unknown_time_zone_is_refused_by_pydantic() -> None:
    schedule = base_schedule()
    schedule["spec"]["timeZone"] = "Mars/Olympus_Mons"
    with pytest.raises(JobValidationError, match=r"spec\.timeZone: unknown time zone"):
        parse_schedule(schedule)


def test_defaults_follow_design() -> None:
    spec = parse_schedule(base_schedule()).spec
    assert (spec.time_zone, spec.suspend, spec.concurrency_policy) == ("UTC", False, "Forbid")
    assert (spec.successful_jobs_history_limit, spec.failed_jobs_history_limit) == (3, 1)
    assert (spec.data.window, spec.data.replay.fraction, spec.warm_start) == (1, 0.0, "none")
    gate, canary = spec.promotion.gate, spec.promotion.canary
    assert (gate.min_retention, gate.must_beat_serving, gate.tolerance, gate.max_forgetting) == (0.9, True, 0.005, 0.02)
    assert (canary.weight, canary.analysis_seconds, canary.max_error_rate, canary.max_p99_ms) == (10, 600, 0.01, 300)
    assert spec.starting_deadline_seconds is None


def test_template_round_trips_without_the_placeholders() -> None:
    schedule = parse_schedule(base_schedule())
    wire = schedule.to_wire()
    data = wire["spec"]["jobTemplate"]["spec"]["data"]
    assert "train" not in data and "eval" not in data and data["textField"] == "text"
    assert FILLED_PER_RUN not in yaml.safe_dump(wire)
    assert parse_schedule(wire) == schedule


def test_a_run_spec_is_the_template_with_its_data() -> None:
    template = parse_schedule(base_schedule()).spec.job_template
    spec = template.job_spec("/runs/1/train.jsonl", "/runs/1/eval.jsonl")
    assert (spec.data.train, spec.data.eval) == ("/runs/1/train.jsonl", "/runs/1/eval.jsonl")
    expected = copy.deepcopy(base_job())
    expected["spec"]["data"] = {"train": "/runs/1/train.jsonl", "eval": "/runs/1/eval.jsonl"}
    assert spec == parse_job(expected).spec


def test_load_resource_dispatches_on_kind(tmp_path: Path) -> None:
    job_file, schedule_file, other = tmp_path / "job.yaml", tmp_path / "schedule.yaml", tmp_path / "other.yaml"
    job_file.write_text(yaml.safe_dump(base_job()))
    schedule_file.write_text(yaml.safe_dump(base_schedule()))
    other.write_text(yaml.safe_dump({**base_job(), "kind": "CronJob"}))
    assert load_resource(job_file).kind == "DistillationJob"
    assert isinstance(load_resource(schedule_file), DistillationSchedule)
    with pytest.raises(JobValidationError, match="kind: got 'CronJob'"):
        load_resource(other)
