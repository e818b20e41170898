"""Cron schedules in time zones (api/cron.py): fields, macros, day rules and daylight saving time."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime

import pytest

from kdistill.api.cron import CRON_PATTERN, CronError, last_at_or_before, next_after, parse_cron, runs_between, zone

NEW_YORK = zone("America/New_York")
BERLIN = zone("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_fields_lists_ranges_steps_and_names() -> None:
    c = parse_cron("*/15 1-3,22 * jan,JUL mon-fri")
    assert c.minutes == (0, 15, 30, 45)
    assert c.hours == (1, 2, 3, 22)
    assert c.months == {1, 7}
    assert c.weekdays == {1, 2, 3, 4, 5}
    assert parse_cron("5/20 * * * *").minutes == (5, 25, 45)
    assert parse_cron("0 0 * * 7").weekdays == {0}  # 7 is Sunday, like 0


def test_macros_stand_for_their_fields() -> None:
    for macro, fields in (("@daily", "0 0 * * *"), ("@hourly", "0 * * * *"), ("@weekly", "0 0 * * 0")):
        a, b = parse_cron(macro), parse_cron(fields)
        assert (a.minutes, a.hours, a.days, a.months, a.weekdays) == (b.minutes, b.hours, b.days, b.months, b.weekdays)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("60 * * * *", "minute: 60 is outside 0-59"),
        ("* 24 * * *", "hour: 24 is outside 0-23"),
        ("* * 32 * *", "day of month: 32 is outside 1-31"),
        ("* * * 13 *", "month: 13 is outside 1-12"),
        ("* * * * 8", "day of week: 8 is outside 0-7"),
        ("* * * foo *", "month: 'foo' is not a number or a name"),
        ("*/0 * * * *", "step '0' must be a whole number >= 1"),
        ("5-1 * * * *", "range '5-1' starts after it ends"),
        ("1,,2 * * * *", "empty list item"),
        ("* * * *", "has 4 field(s)"),
        ("0 0 31 apr,jun *", "never runs"),
    ],
)
def test_bad_schedules_name_their_field(text: str, needle: str) -> None:
    with pytest.raises(CronError, match=re.escape(needle)):
        parse_cron(text)


def test_both_day_fields_restricted_means_either() -> None:
    # The 13th, and every Friday (cron's rule); only Fridays when the day of month is *.
    c = parse_cron("0 0 13 * fri")
    runs = runs_between(c, utc(2026, 2, 1), utc(2026, 3, 1), zone("UTC"))
    assert [r.day for r in runs] == [6, 13, 20, 27]  # 2026-02-13 is a Friday too
    c = parse_cron("0 0 1 * fri")  # the 1st (run bounds: after 1 February, up to 1 March included) or Friday
    assert [r.day for r in runs_between(c, utc(2026, 2, 1), utc(2026, 3, 1), zone("UTC"))] == [6, 13, 20, 27, 1]
    c = parse_cron("0 0 * * fri")
    assert [r.day for r in runs_between(c, utc(2026, 2, 1), utc(2026, 3, 1), zone("UTC"))] == [6, 13, 20, 27]
    c = parse_cron("0 0 1 * *")
    assert [(r.month, r.day) for r in runs_between(c, utc(2026, 1, 15), utc(2026, 4, 15), zone("UTC"))] == [
        (2, 1),
        (3, 1),
        (4, 1),
    ]


def test_next_and_last_in_a_time_zone() -> None:
    c = parse_cron("0 3 * * *")
    # 03:00 in Berlin (UTC+1 in winter) is 02:00 UTC.
    assert next_after(c, utc(2026, 1, 10, 1, 0), BERLIN) == utc(2026, 1, 10, 2, 0)
    assert next_after(c, utc(2026, 1, 10, 2, 0), BERLIN) == utc(2026, 1, 11, 2, 0)  # strictly after
    assert last_at_or_before(c, utc(2026, 1, 10, 2, 0), BERLIN) == utc(2026, 1, 10, 2, 0)
    assert last_at_or_before(c, utc(2026, 1, 10, 1, 59), BERLIN) == utc(2026, 1, 9, 2, 0)
    # In summer Berlin is UTC+2.
    assert next_after(c, utc(2026, 7, 1), BERLIN) == utc(2026, 7, 1, 1, 0)


def test_a_skipped_wall_time_runs_as_late_as_the_gap_is_long() -> None:
    # 2026-03-08: New York's clocks go from 02:00 EST to 03:00 EDT; 02:30 does not exist that day.
    c = parse_cron("30 2 * * *")
    runs = runs_between(c, utc(2026, 3, 6), utc(2026, 3, 10), NEW_YORK)
    local = [r.astimezone(NEW_YORK).strftime("%m-%d %H:%M") for r in runs]
    assert local == ["03-06 02:30", "03-07 02:30", "03-08 03:30", "03-09 02:30"]


def test_skipped_times_landing_on_one_instant_run_once() -> None:
    # Every 30 minutes: 02:00 and 02:30 are skipped, landing on 03:00 and 03:30, which exist too.
    c = parse_cron("*/30 * * * *")
    # From 01:00 EST (06:00 UTC) to 04:00 EDT (08:00 UTC).
    runs = runs_between(c, utc(2026, 3, 8, 6, 0), utc(2026, 3, 8, 8, 0), NEW_YORK)
    assert [r.astimezone(NEW_YORK).strftime("%H:%M") for r in runs] == ["01:30", "03:00", "03:30", "04:00"]
    assert len(set(runs)) == len(runs)


def test_a_repeated_wall_time_runs_once_at_its_first_occurrence() -> None:
    # 2026-11-01: New York's clocks go back from 02:00 EDT to 01:00 EST; 01:30 happens twice.
    c = parse_cron("30 1 * * *")
    runs = runs_between(c, utc(2026, 10, 31), utc(2026, 11, 3), NEW_YORK)
    assert runs == [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]
    # An hourly schedule runs 24 times on that 25-hour day: 01:00 once, then 02:00 two hours later.
    hourly = runs_between(parse_cron("0 * * * *"), utc(2026, 11, 1, 3, 59), utc(2026, 11, 2, 4, 59), NEW_YORK)
    assert len(hourly) == 24 and len(set(hourly)) == 24
    gaps = [(b - a).total_seconds() / 3600 for a, b in itertools.pairwise(hourly)]
    assert gaps.count(2.0) == 1 and gaps.count(1.0) == 22


def test_leap_day_schedule_runs_every_four_years() -> None:
    c = parse_cron("0 0 29 feb *")
    assert next_after(c, utc(2026, 3, 1), zone("UTC")) == utc(2028, 2, 29)


def test_the_crd_pattern_accepts_what_parses_and_rejects_the_table_of_bad_shapes() -> None:
    good = ["0 3 * * *", "*/15 1-3,22 * jan,JUL mon-fri", "@daily", "5/20 * * * 7", "0 0 29 feb *"]
    for text in good:
        parse_cron(text)
        assert re.fullmatch(CRON_PATTERN, text), text
    for text in ["60 * * * *", "* 24 * * *", "*/0 * * * *", "* * * *", "0 0 3 * * *", "every night", "@fortnightly"]:
        assert not re.fullmatch(CRON_PATTERN, text), text
