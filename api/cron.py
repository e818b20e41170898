"""Five-field cron schedules, as Kubernetes CronJobs read them, in a time zone.

The standard library only, so that `kdistill validate` checks a schedule without extra packages
and the operator computes run times with the same code. Fields: minute, hour, day of month,
month, day of week; each a list of `*`, `N`, `N-M`, with an optional `/STEP`; months and days
of the week also by name (`jan`, `mon`); day of week 7 is Sunday, like 0. The macros `@yearly`,
`@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight` and `@hourly` stand for their five fields.
When both day fields are restricted (neither starts with `*`), a day matches either, as in cron.

Time zones and daylight saving time (wall-clock times in `zone`):
  - a wall time that occurs twice (the clock goes back) runs once, at its first occurrence;
  - a wall time the clock skips (the clock goes forward) runs as late as the skipped interval
    is long: 02:30 on a day the clock jumps from 02:00 to 03:00 runs at 03:30. Two wall times
    that land on one instant run once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]
    cel_atom: str  # the field's values as a regular expression (for the CRD's pattern)


_FIELDS = (
    _Field("minute", 0, 59, {}, r"[0-5]?[0-9]"),
    _Field("hour", 0, 23, {}, r"(1?[0-9]|2[0-3])"),
    _Field("day of month", 1, 31, {}, r"([1-9]|[12][0-9]|3[01])"),
    _Field(
        "month",
        1,
        12,
        {n: i + 1 for i, n in enumerate(MONTH_NAMES)},
        r"([1-9]|1[0-2]|[A-Za-z]{3})",
    ),
    _Field("day of week", 0, 7, {n: i for i, n in enumerate(DAY_NAMES)}, r"([0-7]|[A-Za-z]{3})"),
)


def _field_pattern(atom: str) -> str:
    part = rf"(\*|{atom}(-{atom})?)(/[1-9][0-9]*)?"
    return rf"{part}(,{part})*"


# What the API server can check without a cron library: five fields of the right characters and
# ranges, or a macro. A range whose start is after its end, an unknown month or day name and a
# date that never occurs (30 February) pass it; `kdistill validate` and the operator catch them.
CRON_PATTERN = (
    "^(" + "|".join(re.escape(m) for m in MACROS) + "|" + " +".join(_field_pattern(f.cel_atom) for f in _FIELDS) + ")$"
)


class CronError(ValueError):
    """A schedule that does not parse; the message names the field."""


@dataclass(frozen=True)
class Cron:
    """A parsed schedule: the allowed values of each field."""

    text: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = day.isoweekday() % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        if self.days_restricted:
            return dom
        if self.weekdays_restricted:
            return dow
        return True


def _value(text: str, field: _Field) -> int:
    key = text.lower()
    if key in field.names:
        return field.names[key]
    if not text.isdigit():
        known = f" or a name ({', '.join(field.names)})" if field.names else ""
        raise CronError(f"{field.name}: {text!r} is not a number{known}")
    value = int(text)
    if not field.low <= value <= field.high:
        raise CronError(f"{field.name}: {value} is outside {field.low}-{field.high}")
    return value


def _parse_field(text: str, field: _Field) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{field.name}: empty list item in {text!r}")
        span, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{field.name}: step {step_text!r} must be a whole number >= 1")
            step = int(step_text)
        if span == "*":
            low, high = field.low, field.high
        elif "-" in span:
            first, _, last = span.partition("-")
            low, high = _value(first, field), _value(last, field)
            if low > high:
                raise CronError(f"{field.name}: range {span!r} starts after it ends")
        else:
            low = _value(span, field)
            # N/STEP means N to the end of the field, every STEP.
            high = field.high if slash else low
        values.update(range(low, high + 1, step))
    return values


# The longest month of each month number, in a leap year: a day-of-month schedule runs if any
# of its months has one of its days.
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def parse_cron(text: str) -> Cron:
    """Parse a schedule; raise CronError naming the field that is wrong."""
    source = text
    text = MACROS.get(text.strip().lower(), text)
    parts = text.split()
    if len(parts) != 5:
        raise CronError(
            f"{source!r} has {len(parts)} field(s); a schedule has five (minute hour day-of-month month "
            f"day-of-week) or is one of {', '.join(MACROS)}"
        )
    minutes, hours, days, months, weekdays = (_parse_field(p, f) for p, f in zip(parts, _FIELDS, strict=True))
    weekdays = {d % 7 for d in weekdays}
    cron = Cron(
        text=source,
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=frozenset(days),
        months=frozenset(months),
        weekdays=frozenset(weekdays),
        days_restricted=not parts[2].startswith("*"),
        weekdays_restricted=not parts[4].startswith("*"),
    )
    only_days = cron.days_restricted and not cron.weekdays_restricted
    if only_days and not any(d <= _MONTH_DAYS[m - 1] for m in cron.months for d in cron.days):
        raise CronError(f"{source!r} never runs: none of its months has one of its days of the month")
    return cron


def zone(name: str) -> tzinfo:
    """The IANA time zone `name`; ValueError if it is unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as UTC or Europe/Berlin)") from exc


def _day_times(cron: Cron, day: date, tz: tzinfo) -> list[datetime]:
    """The instants (UTC) at which `cron` runs on local day `day`, in order, each once."""
    if not cron.matches_day(day):
        return []
    times = set()
    for hour in cron.hours:
        for minute in cron.minutes:
            # fold=0: a repeated wall time is its first occurrence; a skipped one takes the offset
            # from before the change, which places it as late after the change as it was in the gap.
            local = datetime(day.year, day.month, day.day, hour, minute, tzinfo=tz)
            times.add(local.astimezone(UTC))
    return sorted(times)


# A schedule that never runs within this many days (it cannot, once parse_cron accepted it, but
# a bound keeps the search finite): 5 years, 29 February included.
_SEARCH_DAYS = 5 * 366 + 1


def next_after(cron: Cron, after: datetime, tz: tzinfo) -> datetime:
    """The first run strictly after `after` (an aware datetime), in UTC."""
    day = after.astimezone(tz).date() - timedelta(days=1)
    best: datetime | None = None
    for _ in range(_SEARCH_DAYS):
        later = [t for t in _day_times(cron, day, tz) if t > after]
        if later and (best is None or later[0] < best):
            best = later[0]
        # A skipped wall time can move a run past midnight: look one day beyond the first find.
        if best is not None and datetime(day.year, day.month, day.day, tzinfo=tz) > best + timedelta(days=1):
            return best
        day += timedelta(days=1)
    if best is not None:
        return best
    raise CronError(f"{cron.text!r} does not run within {_SEARCH_DAYS} days")


def last_at_or_before(cron: Cron, at: datetime, tz: tzinfo) -> datetime | None:
    """The latest run at or before `at`, in UTC (None if there was none in the search bound)."""
    day = at.astimezone(tz).date() + timedelta(days=1)
    best: datetime | None = None
    for _ in range(_SEARCH_DAYS):
        earlier = [t for t in _day_times(cron, day, tz) if t <= at]
        if earlier and (best is None or earlier[-1] > best):
            best = earlier[-1]
        if best is not None and datetime(day.year, day.month, day.day, tzinfo=tz) < best - timedelta(days=2):
            return best
        day -= timedelta(days=1)
    return best


def runs_between(cron: Cron, after: datetime, until: datetime, tz: tzinfo, limit: int = 1000) -> list[datetime]:
    """Runs in (after, until], oldest first, at most `limit` of them (walked day by day)."""
    out: set[datetime] = set()
    day = after.astimezone(tz).date() - timedelta(days=1)
    last_day = until.astimezone(tz).date() + timedelta(days=1)
    while day <= last_day:
        out.update(t for t in _day_times(cron, day, tz) if after < t <= until)
        # A skipped wall time can move a run into the next day: go one day past the limit.
        if len(out) > limit and datetime(day.year, day.month, day.day, tzinfo=tz) > max(sorted(out)[:limit]):
            break
        day += timedelta(days=1)
    return sorted(out)[:limit]
