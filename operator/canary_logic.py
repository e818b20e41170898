"""The canary of a DistillationSchedule as pure functions: no I/O, no kopf, no clock.

The caller scrapes the servers (operator/server_metrics.py) and passes the scrapes and the time
elapsed; these functions say how many pods the canary gets and whether to promote, roll back or
wait. docs/canary.md states the same rules for users.

Replica split
  The challenger runs as its own Deployment whose pods carry the champion's Service labels, so the
  one Service spreads connections over both sets of pods (Argo Rollouts' basic canary, without a
  traffic router). The canary gets ceil(weight% of the champion's replicas), at least one pod, and
  the champion keeps all of its replicas, so a rollback only deletes the canary. The canary's real
  share is canary / (champion + canary), which with few replicas is far above the weight asked
  for: 1 champion replica and weight 10 gives 1 + 1 pods, a 50% share.

Analysis window
  The counters of each pod are read twice, at the start of the analysis and now; the window is
  their difference per pod, summed over the pods (a pod whose counters went down restarted, and
  counts from zero; a pod that appeared since the start counts whole; a pod that is gone is
  left out). Requests are the answers of the model endpoints (health, metadata and /metrics are
  not counted).

Failed requests
  A server error is an answer with status 429 (queue full) or >= 500. Other 4xx answers are the
  client's mistakes unless the challenger refuses requests the champion serves: with the
  champion's window given, only the challenger's client-error rate above the champion's counts;
  without it, every 4xx counts. The error rate is failed / requests.

Verdict
  - Fewer than ``min_requests(canary)`` requests in the window: wait until ``analysisSeconds``;
    then roll back, because a challenger that served (almost) nothing is unproven. Zero traffic
    never promotes.
  - Enough requests: roll back at once if the error rate is above ``maxErrorRate`` or the p99
    latency above ``maxP99Ms``; promote once ``analysisSeconds`` have passed; wait otherwise.
  The p99 is Prometheus' histogram_quantile over the window's latency buckets (linear inside a
  bucket); when it falls in the +Inf bucket it is only known to exceed the highest finite bound,
  and the challenger is rolled back whatever ``maxP99Ms`` is.

``min_requests`` is max(100, ceil(1 / maxErrorRate)): 100 so that the p99 is not just the slowest
request, and 1 / maxErrorRate so that one failed request is within the allowed rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from kdistill.api.schedule import Canary

# Fewest requests a verdict other than wait is drawn from (see the module docstring).
MIN_REQUESTS = 100
# Upper end of the resolution rule, so that a tiny maxErrorRate does not ask for millions.
MAX_MIN_REQUESTS = 10_000
# 429: the server refused for lack of capacity, its own failure as much as a 5xx.
SERVER_ERROR_STATUSES = frozenset({429})

Decision = Literal["promote", "rollback", "wait"]


# -- replica split ----------------------------------------------------------------------------------


class CanarySplit(NamedTuple):
    """Pods of the champion and of the canary under one Service, and the canary's real share."""

    champion: int
    canary: int

    @property
    def share(self) -> float:
        """The canary's share of the pods, hence of the traffic the Service spreads evenly."""
        return self.canary / (self.champion + self.canary)


def canary_replicas(champion_replicas: int, weight: int) -> CanarySplit:
    """``(champion, canary)`` pods for a replica-ratio canary of ``weight`` percent.

    The canary gets ceil(weight% of the champion's replicas), at least 1; the champion keeps every
    replica. The traffic share the canary really gets is ``canary / (champion + canary)``
    (``.share``), which with few replicas is much more than ``weight``: 1 replica at any weight
    gives 50%, 4 replicas at weight 10 give 1 / 5 = 20%, 10 at weight 10 give 1 / 11 = 9.1%.
    """
    if champion_replicas < 1:
        raise ValueError(f"the champion needs at least one replica to split traffic with, got {champion_replicas}")
    if not 1 <= weight <= 99:
        raise ValueError(f"weight: expected 1..99 percent, got {weight}")
    canary = max(1, -(-champion_replicas * weight // 100))  # integer ceil
    return CanarySplit(champion_replicas, canary)


# -- scrapes and windows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """A server's counters at one moment (or their difference over a window, or a sum over pods).

    ``requests``: answers of the model endpoints; ``errors``: those with status >= 400, by status
    code; ``buckets``: the latency histogram of the same answers, ``(upper bound in seconds,
    cumulative count)`` sorted by bound, ending with ``+Inf``."""

    requests: float = 0.0
    errors: Mapping[str, float] = field(default_factory=dict)
    buckets: tuple[tuple[float, float], ...] = ()


def add(a: Scrape, b: Scrape) -> Scrape:
    """The sum of two scrapes (two pods). Buckets are matched by bound."""
    errors = dict(a.errors)
    for status, n in b.errors.items():
        errors[status] = errors.get(status, 0.0) + n
    bounds: dict[float, float] = dict(a.buckets)
    for le, n in b.buckets:
        bounds[le] = bounds.get(le, 0.0) + n
    return Scrape(a.requests + b.requests, errors, tuple(sorted(bounds.items())))


def total(scrapes: Iterable[Scrape]) -> Scrape:
    out = Scrape()
    for s in scrapes:
        out = add(out, s)
    return out


def _went_down(start: Scrape, now: Scrape) -> bool:
    if now.requests < start.requests:
        return True
    if any(now.errors.get(status, 0.0) < n for status, n in start.errors.items()):
        return True
    now_buckets = dict(now.buckets)
    return any(now_buckets.get(le, 0.0) < n for le, n in start.buckets)


def delta(start: Scrape, now: Scrape) -> Scrape:
    """One pod's counters over the window. Counters that went down mean the server restarted:
    the window then holds what the new process counted (as Prometheus' ``increase`` does)."""
    if _went_down(start, now):
        return now
    start_buckets = dict(start.buckets)
    return Scrape(
        now.requests - start.requests,
        {status: n - start.errors.get(status, 0.0) for status, n in now.errors.items()},
        tuple((le, n - start_buckets.get(le, 0.0)) for le, n in now.buckets),
    )


def window(start: Mapping[str, Scrape], now: Mapping[str, Scrape]) -> Scrape:
    """Counters over the window summed over pods, keyed by pod (its address or name). A pod new
    since ``start`` counts from zero; a pod missing from ``now`` is left out."""
    return total(delta(start.get(pod, Scrape()), scrape) for pod, scrape in now.items())


# -- quantiles --------------------------------------------------------------------------------------


def _cumulative(buckets: Iterable[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Bounds in order and their counts, merged by bound and made non-decreasing (a scrape that
    races an observation can read a bucket before the one below it is incremented)."""
    merged: dict[float, float] = {}
    for le, n in buckets:
        merged[le] = merged.get(le, 0.0) + n
    bounds = sorted(merged)
    counts: list[float] = []
    for le in bounds:
        counts.append(max(merged[le], counts[-1]) if counts else merged[le])
    return bounds, counts


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Prometheus' ``histogram_quantile`` over cumulative ``(upper bound, count)`` buckets.

    NaN without observations or without a ``+Inf`` bucket; the upper bound of the highest finite
    bucket when the rank falls in ``+Inf``; otherwise linear interpolation inside the bucket the
    rank falls in, from the previous bucket's bound (0 for the first bucket)."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    bounds, counts = _cumulative(buckets)
    if len(bounds) < 2 or bounds[-1] != math.inf or counts[-1] == 0:
        return math.nan
    rank = q * counts[-1]
    b = next(i for i, c in enumerate(counts) if c >= rank)
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    lower, below = (bounds[b - 1], counts[b - 1]) if b > 0 else (0.0, 0.0)
    return lower + (bounds[b] - lower) * ((rank - below) / (counts[b] - below))


def quantile_above_top(q: float, buckets: Iterable[tuple[float, float]]) -> bool:
    """Whether the ``q`` quantile falls in the ``+Inf`` bucket, where histogram_quantile answers
    the highest finite bound: the real value is only known to be above it."""
    bounds, counts = _cumulative(buckets)
    if len(bounds) < 2 or bounds[-1] != math.inf or counts[-1] == 0:
        return False
    return counts[-2] < q * counts[-1]


# -- the verdict ------------------------------------------------------------------------------------


def is_server_error(status: str) -> bool:
    return not status.isdigit() or int(status) >= 500 or int(status) in SERVER_ERROR_STATUSES


@dataclass(frozen=True)
class WindowStats:
    """What the verdict reads from one window."""

    requests: float
    server_errors: float  # 429 and 5xx
    client_errors: float  # other 4xx
    counted_client_errors: float  # the client errors that count as failures
    champion_client_rate: float | None  # the champion's client-error rate, when its window was given
    p99_seconds: float  # NaN without requests
    p99_above_top: bool  # the p99 lies in +Inf: above the highest finite bucket
    top_bound_seconds: float  # the highest finite bucket bound

    @property
    def failed(self) -> float:
        return self.server_errors + self.counted_client_errors

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests > 0 else math.nan


def stats(canary: Scrape, champion: Scrape | None = None) -> WindowStats:
    """Failures and p99 of the canary's window; with the champion's window, only the canary's
    client errors above the champion's rate count (same traffic, so the excess is the challenger's)."""
    server = sum(n for s, n in canary.errors.items() if is_server_error(s))
    client = sum(n for s, n in canary.errors.items() if not is_server_error(s))
    counted = client
    champion_rate = None
    if champion is not None and champion.requests > 0:
        champion_rate = sum(n for s, n in champion.errors.items() if not is_server_error(s)) / champion.requests
        counted = max(0.0, client - champion_rate * canary.requests)
    finite = [le for le, _ in canary.buckets if not math.isinf(le)]
    return WindowStats(
        requests=canary.requests,
        server_errors=server,
        client_errors=client,
        counted_client_errors=counted,
        champion_client_rate=champion_rate,
        p99_seconds=histogram_quantile(0.99, canary.buckets),
        p99_above_top=quantile_above_top(0.99, canary.buckets),
        top_bound_seconds=max(finite) if finite else math.nan,
    )


def min_requests(canary: Canary) -> int:
    """Requests the window needs before the canary is judged on its figures."""
    if canary.max_error_rate <= 0:
        return MIN_REQUESTS
    return min(MAX_MIN_REQUESTS, max(MIN_REQUESTS, math.ceil(1 / canary.max_error_rate - 1e-9)))


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str  # the figures the decision rests on, for the history, the Event and the log
    requests: float
    error_rate: float  # NaN without requests
    p99_ms: float  # NaN without requests; the highest finite bound when above it
    elapsed_seconds: float
    min_requests: int


def _errors_text(canary: Scrape) -> str:
    parts = [f"{s}: {n:g}" for s, n in sorted(canary.errors.items()) if n > 0]
    return ", ".join(parts) if parts else "none"


def verdict(
    canary_window: Scrape,
    canary: Canary,
    elapsed_seconds: float,
    *,
    champion_window: Scrape | None = None,
    needed: int | None = None,
) -> Verdict:
    """Promote, roll back or wait, from the canary's window after ``elapsed_seconds`` of analysis.

    ``champion_window``: the champion's pods over the same window, to discount the client errors
    both serve alike. ``needed``: the fewest requests to judge on (default ``min_requests``)."""
    need = max(1, min_requests(canary) if needed is None else needed)
    st = stats(canary_window, champion_window)
    n = st.requests
    rate = st.error_rate
    p99_ms = st.p99_seconds * 1000.0
    limit_s = canary.analysis_seconds
    clock = f"{elapsed_seconds:.0f} of {limit_s} s"

    def done(decision: Decision, reason: str) -> Verdict:
        return Verdict(decision, reason, n, rate, p99_ms, elapsed_seconds, need)

    if n < need:
        if elapsed_seconds < limit_s:
            return done("wait", f"{n:g} of {need} requests needed to judge, {clock}")
        what = "no requests" if n == 0 else f"only {n:g} requests (errors: {_errors_text(canary_window)})"
        return done(
            "rollback",
            f"not enough traffic to judge the challenger: {what} in {elapsed_seconds:.0f} s, {need} needed",
        )
    counted = f"{st.failed:.4g} failed of {n:g} requests"
    if st.client_errors and st.champion_client_rate is not None:
        counted += (
            f", of which {st.counted_client_errors:.4g} of its {st.client_errors:g} client errors above "
            f"the champion's rate of {st.champion_client_rate:.2%}"
        )
    if rate > canary.max_error_rate:
        return done(
            "rollback",
            f"error rate {rate:.2%} above maxErrorRate {canary.max_error_rate:.2%} "
            f"({counted}; by status: {_errors_text(canary_window)}), {clock}",
        )
    if st.p99_above_top:
        return done(
            "rollback",
            f"p99 latency above the highest bucket, {st.top_bound_seconds * 1000:.0f} ms "
            f"(maxP99Ms {canary.max_p99_ms:g}), over {n:g} requests, {clock}",
        )
    if p99_ms > canary.max_p99_ms:
        return done(
            "rollback",
            f"p99 latency {p99_ms:.0f} ms above maxP99Ms {canary.max_p99_ms:g} over {n:g} requests, {clock}",
        )
    figures = (
        f"error rate {rate:.2%} (max {canary.max_error_rate:.2%}, {counted}), "
        f"p99 {p99_ms:.0f} ms (max {canary.max_p99_ms:g})"
    )
    if elapsed_seconds >= limit_s:
        return done("promote", f"{figures} after {elapsed_seconds:.0f} s")
    return done("wait", f"{figures} so far, {clock}")
