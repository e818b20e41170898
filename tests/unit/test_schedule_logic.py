"""The scheduler's decisions (operator/schedule_logic.py): due runs, missed runs after a restart,
concurrency, history limits and the promotion gate's decision table."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest

from kdistill.api.cron import Cron, parse_cron
from kdistill.api.schedule import Gate
from kdistill.operator.schedule_logic import (
    Decision,
    FinishedJob,
    Scores,
    decide,
    gate_decision,
    job_name,
    jobs_to_delete,
)

EVERY_MINUTE = parse_cron("* * * * *")
NIGHTLY = parse_cron("0 3 * * *")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def decide_at(
    now: datetime,
    since: datetime,
    cron: Cron = NIGHTLY,
    active: Sequence[str] = (),
    policy: Literal["Forbid", "Replace"] = "Forbid",
    **kw: Any,
) -> Decision:
    return decide(
        name="nightly",
        cron=cron,
        time_zone=kw.pop("time_zone", "UTC"),
        now=now,
        since=since,
        active=list(active),
        concurrency_policy=policy,
        **kw,
    )


def test_job_names_are_the_schedule_and_unix_minutes() -> None:
    t = utc(2026, 12, 5, 3, 0)
    assert job_name("nightly", t) == f"nightly-{int(t.timestamp()) // 60}"
    assert job_name("nightly", t + timedelta(seconds=59)) == job_name("nightly", t)


def test_nothing_is_due_before_the_first_run_time() -> None:
    d = decide_at(utc(2026, 12, 5, 2, 59), since=utc(2026, 12, 4, 12, 0))
    assert d.action == "wait" and d.next_time == utc(2026, 12, 5, 3, 0) and d.job is None


def test_a_run_is_due_at_its_time_and_once() -> None:
    d = decide_at(utc(2026, 12, 5, 3, 0, 5), since=utc(2026, 12, 4, 12, 0))
    assert (d.action, d.run_time, d.missed) == ("start", utc(2026, 12, 5, 3, 0), 0)
    assert d.job == job_name("nightly", utc(2026, 12, 5, 3, 0))
    # Once started, lastScheduleTime is that run time: nothing more is due until tomorrow.
    again = decide_at(utc(2026, 12, 5, 3, 30), since=d.run_time)
    assert again.action == "wait" and again.next_time == utc(2026, 12, 6, 3, 0)


def test_missed_runs_after_a_restart_start_once_for_the_latest() -> None:
    # The operator was down from 2026-12-01 04:00 to 2026-12-05 10:00: four nightly runs were missed.
    d = decide_at(utc(2026, 12, 5, 10, 0), since=utc(2026, 12, 1, 3, 0))
    assert (d.action, d.run_time, d.missed) == ("start", utc(2026, 12, 5, 3, 0), 3)
    # An every-minute schedule down for a day: one job, 1439 earlier ticks counted.
    d = decide_at(utc(2026, 12, 5, 0, 0, 30), since=utc(2026, 12, 4, 0, 0), cron=EVERY_MINUTE)
    assert (d.action, d.run_time, d.missed) == ("start", utc(2026, 12, 5, 0, 0), 1439)


def test_a_restart_between_creating_the_job_and_recording_it_names_the_same_job() -> None:
    # lastScheduleTime was not written: the next evaluation decides the same run, the same name.
    first = decide_at(utc(2026, 12, 5, 3, 0, 1), since=utc(2026, 12, 4, 3, 0))
    second = decide_at(utc(2026, 12, 5, 3, 0, 40), since=utc(2026, 12, 4, 3, 0))
    assert first.job == second.job and first.action == second.action == "start"


def test_starting_deadline_refuses_a_late_run() -> None:
    now = utc(2026, 12, 5, 3, 10)
    assert decide_at(now, utc(2026, 12, 4, 3, 0), starting_deadline_seconds=600).action == "start"
    late = decide_at(now + timedelta(seconds=1), utc(2026, 12, 4, 3, 0), starting_deadline_seconds=600)
    assert late.action == "too-late" and "601s late" in late.reason


def test_suspend_starts_nothing() -> None:
    d = decide_at(utc(2026, 12, 5, 3, 0, 5), since=utc(2026, 12, 4, 12, 0), suspend=True)
    assert d.action == "suspended" and d.job is None


def test_forbid_leaves_the_tick_for_later_and_replace_deletes_the_active_jobs() -> None:
    since = utc(2026, 12, 4, 3, 0)
    forbid = decide_at(utc(2026, 12, 5, 3, 0, 5), since, active=["nightly-1"], policy="Forbid")
    assert forbid.action == "forbid" and "nightly-1" in forbid.reason and forbid.delete == ()
    # The active job ends at 05:00: the tick, never consumed, starts then.
    after = decide_at(utc(2026, 12, 5, 5, 0), since, active=[], policy="Forbid")
    assert (after.action, after.run_time) == ("start", utc(2026, 12, 5, 3, 0))
    replace = decide_at(utc(2026, 12, 5, 3, 0, 5), since, active=["nightly-1", "nightly-2"], policy="Replace")
    assert replace.action == "replace" and replace.delete == ("nightly-1", "nightly-2")
    assert replace.job == job_name("nightly", utc(2026, 12, 5, 3, 0))


def test_run_times_follow_the_time_zone() -> None:
    # 03:00 in Tokyo (UTC+9) is 18:00 UTC the day before.
    d = decide_at(utc(2026, 12, 4, 18, 0, 1), since=utc(2026, 12, 4, 0, 0), time_zone="Asia/Tokyo")
    assert (d.action, d.run_time) == ("start", utc(2026, 12, 4, 18, 0))


def _finished(name: str, hour: int, ok: bool) -> FinishedJob:
    return FinishedJob(name, utc(2026, 12, 5, hour), ok)


def test_history_limits_delete_the_oldest_beyond_each_limit() -> None:
    jobs = [
        _finished("s1", 1, True),
        _finished("f1", 2, False),
        _finished("s2", 3, True),
        _finished("f2", 4, False),
        _finished("s3", 5, True),
        _finished("s4", 6, True),
    ]
    assert jobs_to_delete(jobs, successful_limit=2, failed_limit=1) == ["s1", "f1", "s2"]
    assert jobs_to_delete(jobs, successful_limit=10, failed_limit=10) == []
    assert jobs_to_delete(jobs, successful_limit=0, failed_limit=0) == ["s1", "f1", "s2", "f2", "s3", "s4"]


def test_the_promoted_job_is_never_deleted_and_does_not_count() -> None:
    jobs = [_finished("s1", 1, True), _finished("s2", 2, True), _finished("s3", 3, True)]
    assert jobs_to_delete(jobs, successful_limit=1, failed_limit=1, keep=["s1"]) == ["s2"]
    assert jobs_to_delete(jobs, successful_limit=0, failed_limit=0, keep=["s3"]) == ["s1", "s2"]


# -- the gate's decision table ----------------------------------------------------------------

GATE = Gate(min_retention=0.9, must_beat_serving=True, tolerance=0.01, max_forgetting=0.02)

# (case, gate, scores, promote, failed checks)
TABLE = [
    ("first-run-clears-retention", GATE, Scores("accuracy", 0.90, 0.85), True, ()),
    ("first-run-below-retention", GATE, Scores("accuracy", 0.90, 0.80), False, ("minRetention",)),
    ("beats-champion", GATE, Scores("accuracy", 0.9, 0.86, 0.85, 0.80, 0.80), True, ()),
    ("within-tolerance", GATE, Scores("accuracy", 0.9, 0.845, 0.85, 0.80, 0.80), True, ()),
    ("beyond-tolerance", GATE, Scores("accuracy", 0.9, 0.83, 0.85, 0.80, 0.80), False, ("mustBeatServing",)),
    (
        "worse-but-not-required",
        Gate(min_retention=0.9, must_beat_serving=False, tolerance=0.0, max_forgetting=0.02),
        Scores("accuracy", 0.9, 0.83, 0.85, 0.80, 0.80),
        True,
        (),
    ),
    ("forgets-too-much", GATE, Scores("accuracy", 0.9, 0.88, 0.85, 0.77, 0.80), False, ("maxForgetting",)),
    ("forgets-within-limit", GATE, Scores("accuracy", 0.9, 0.88, 0.85, 0.785, 0.80), True, ()),
    (
        "everything-fails",
        GATE,
        Scores("accuracy", 0.9, 0.70, 0.85, 0.50, 0.80),
        False,
        ("minRetention", "mustBeatServing", "maxForgetting"),
    ),
    # Perplexity: lower is better; retention is teacher / student.
    ("perplexity-better", GATE, Scores("perplexity", 10.0, 10.5, 10.8, 12.0, 12.1), True, ()),
    ("perplexity-retention", GATE, Scores("perplexity", 10.0, 11.5), False, ("minRetention",)),
    ("perplexity-forgets", GATE, Scores("perplexity", 10.0, 10.5, 10.8, 13.0, 12.0), False, ("maxForgetting",)),
    ("no-old-data-yet", GATE, Scores("accuracy", 0.9, 0.86, 0.85), True, ()),
]


@pytest.mark.parametrize(("case", "gate", "scores", "promote", "failed"), TABLE, ids=[t[0] for t in TABLE])
def test_gate_decision_table(case: str, gate: Gate, scores: Scores, promote: bool, failed: tuple[str, ...]) -> None:
    d = gate_decision(gate, scores)
    assert d.promote is promote, d.reason
    assert d.failed == failed, d.reason
    assert d.reason.startswith("promoted: " if promote else "refused: ")
    assert f"retention {d.retention:.4f}" in d.reason
    if scores.champion_old is not None:
        assert d.forgetting is not None and f"forgetting {d.forgetting:.4f}" in d.reason
    assert d.serving_metric == scores.champion_new and d.challenger_metric == scores.challenger_new


def test_gate_figures() -> None:
    d = gate_decision(GATE, Scores("accuracy", 0.9, 0.88, 0.85, 0.77, 0.80))
    assert d.retention == pytest.approx(0.88 / 0.9)
    assert d.forgetting == pytest.approx(1 - 0.77 / 0.80)
    p = gate_decision(GATE, Scores("perplexity", 10.0, 12.5, None, 13.0, 12.0))
    assert p.retention == pytest.approx(10.0 / 12.5)
    assert p.forgetting == pytest.approx(1 - 12.0 / 13.0)
    # An improvement on old data is no forgetting.
    assert gate_decision(GATE, Scores("accuracy", 0.9, 0.88, 0.85, 0.82, 0.80)).forgetting == 0.0
