"""The canary's pure parts: replica splits, window arithmetic, Prometheus' histogram_quantile, the
verdict's decision table, and the parser over the server's own metric definitions."""

from __future__ import annotations

import math
import random

import pytest

from kdistill.api.schedule import Canary
from kdistill.operator import canary_logic as cl
from kdistill.operator import server_metrics as sm

INF = math.inf
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, INF)


def latencies(values_s: list[float]) -> tuple[tuple[float, float], ...]:
    """Cumulative buckets of these latencies, as the server's histogram counts them (le: <=)."""
    return tuple((le, float(sum(v <= le for v in values_s))) for le in BOUNDS)


def window(ok_s: list[float], errors: dict[str, int] | None = None) -> cl.Scrape:
    """A window of answers: ``ok_s`` latencies plus, per status, that many answers at 1 ms."""
    errors = errors or {}
    failed = [0.001 for n in errors.values() for _ in range(n)]
    values = ok_s + failed
    return cl.Scrape(float(len(values)), {s: float(n) for s, n in errors.items()}, latencies(values))


# -- replica splits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "weight", "canary", "share"),
    [
        (1, 10, 1, 0.5),  # one replica: half the traffic whatever the weight
        (2, 10, 1, 1 / 3),
        (4, 10, 1, 0.2),
        (10, 10, 1, 1 / 11),
        (10, 11, 2, 2 / 12),  # ceil(1.1) = 2
        (20, 10, 2, 2 / 22),
        (3, 50, 2, 0.4),  # ceil(1.5) = 2
        (10, 99, 10, 0.5),
        (100, 1, 1, 1 / 101),
    ],
)
def test_canary_replicas(replicas: int, weight: int, canary: int, share: float) -> None:
    split = cl.canary_replicas(replicas, weight)
    assert tuple(split) == (replicas, canary)
    assert split.share == pytest.approx(share)


def test_canary_replicas_refuses_no_champion_and_bad_weight() -> None:
    with pytest.raises(ValueError, match="at least one replica"):
        cl.canary_replicas(0, 10)
    with pytest.raises(ValueError, match="weight"):
        cl.canary_replicas(3, 0)
    with pytest.raises(ValueError, match="weight"):
        cl.canary_replicas(3, 100)


# -- windows ------------------------------------------------------------------------------------------


def test_window_is_the_difference_per_pod_summed() -> None:
    a0 = window([0.01] * 10, {"500": 1})
    a1 = window([0.01] * 30 + [0.4] * 5, {"500": 3, "429": 2})
    b0 = window([0.02] * 4)
    b1 = window([0.02] * 9)
    w = cl.window({"a": a0, "b": b0}, {"a": a1, "b": b1})
    # a: 40 - 11 = 29 requests, b: 9 - 4 = 5
    assert w.requests == 34
    assert dict(w.errors) == {"500": 2, "429": 2}
    assert dict(w.buckets)[INF] == 34
    assert dict(w.buckets)[0.3] == 34 - 5  # the five 0.4 s requests are above 0.3


def test_window_counts_a_restarted_pod_from_zero_and_a_new_pod_whole() -> None:
    before = window([0.01] * 50)
    restarted = window([0.01] * 7)  # fewer than before: the process started again
    new = window([0.01] * 3, {"503": 1})
    w = cl.window({"a": before}, {"a": restarted, "c": new})
    assert w.requests == 7 + 4
    assert dict(w.errors) == {"503": 1}


def test_window_leaves_out_a_pod_that_is_gone() -> None:
    w = cl.window({"a": window([0.01] * 5), "gone": window([0.01] * 9)}, {"a": window([0.01] * 8)})
    assert w.requests == 3


# -- histogram_quantile -------------------------------------------------------------------------------


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    b = [(0.1, 50.0), (0.2, 90.0), (INF, 100.0)]
    assert cl.histogram_quantile(0.5, b) == pytest.approx(0.1)  # rank 50: the top of the first bucket
    assert cl.histogram_quantile(0.25, b) == pytest.approx(0.05)  # from 0 inside the first bucket
    assert cl.histogram_quantile(0.75, b) == pytest.approx(0.1 + 0.1 * 25 / 40)
    assert cl.histogram_quantile(0.9, b) == pytest.approx(0.2)
    # rank 99 falls in +Inf: Prometheus answers the highest finite bound
    assert cl.histogram_quantile(0.99, b) == pytest.approx(0.2)
    assert cl.quantile_above_top(0.99, b) and not cl.quantile_above_top(0.9, b)


def test_histogram_quantile_edge_cases_as_prometheus() -> None:
    assert math.isnan(cl.histogram_quantile(0.99, []))
    assert math.isnan(cl.histogram_quantile(0.99, [(0.1, 0.0), (INF, 0.0)]))  # no observations
    assert math.isnan(cl.histogram_quantile(0.99, [(0.1, 3.0), (0.2, 4.0)]))  # no +Inf bucket
    assert cl.histogram_quantile(-0.1, [(0.1, 1.0), (INF, 1.0)]) == -INF
    assert cl.histogram_quantile(1.5, [(0.1, 1.0), (INF, 1.0)]) == INF
    # unsorted and non-monotonic input (a scrape racing an observation) is sorted and evened out
    shuffled = [(INF, 10.0), (0.2, 9.0), (0.1, 10.0)]
    assert cl.histogram_quantile(0.5, shuffled) == pytest.approx(0.05)


def test_histogram_quantile_lands_in_the_bucket_of_the_true_quantile() -> None:
    rng = random.Random(7)
    for _ in range(50):
        values = [rng.lognormvariate(-3.0, 1.2) for _ in range(rng.randint(100, 2000))]
        for q in (0.5, 0.9, 0.99):
            true = sorted(values)[math.ceil(q * len(values)) - 1]
            est = cl.histogram_quantile(q, latencies(values))
            upper = next(le for le in BOUNDS if true <= le)
            lower = max([0.0, *(le for le in BOUNDS if le < upper)])
            if math.isinf(upper):
                assert est == BOUNDS[-2]
            else:
                assert lower <= est <= upper, (q, true, est)


# -- the verdict ----------------------------------------------------------------------------------------

CANARY = Canary(weight=10, analysis_seconds=600, max_error_rate=0.01, max_p99_ms=300)


def test_min_requests() -> None:
    assert cl.min_requests(CANARY) == 100
    assert cl.min_requests(Canary(max_error_rate=0.002)) == 500
    assert cl.min_requests(Canary(max_error_rate=0.0)) == 100
    assert cl.min_requests(Canary(max_error_rate=1e-7)) == cl.MAX_MIN_REQUESTS
    assert cl.min_requests(Canary(max_error_rate=0.5)) == 100


FAST = [0.02] * 200
SLOW_TAIL = [0.02] * 190 + [0.45] * 10  # 5% of requests at 450 ms: p99 in (0.3, 0.5]


@pytest.mark.parametrize(
    ("name", "win", "elapsed", "decision", "in_reason"),
    [
        ("healthy, window over", window(FAST), 600, "promote", "error rate 0.00%"),
        ("healthy, window running", window(FAST), 120, "wait", "so far, 120 of 600 s"),
        # rank 198 of 200, 8 into the 10 of (0.3, 0.5]: 300 + 200 * 8 / 10 = 460 ms
        ("slow tail", window(SLOW_TAIL), 30, "rollback", "p99 latency 460 ms above maxP99Ms 300"),
        ("slow tail after the window", window(SLOW_TAIL), 600, "rollback", "p99 latency"),
        ("5xx", window(FAST, {"500": 5}), 30, "rollback", "by status: 500: 5"),
        ("queue full", window(FAST, {"429": 40}), 30, "rollback", "error rate 16.67%"),
        ("client errors count without a champion", window(FAST, {"400": 3}), 30, "rollback", "by status: 400: 3"),
        ("one error in 200 is within 1%", window(FAST, {"500": 1}), 600, "promote", "error rate 0.50%"),
        ("two in 200 are not above 1%", window(FAST, {"503": 2}), 600, "promote", "error rate 0.99%"),
        ("three in 200 are", window(FAST, {"503": 3}), 600, "rollback", "error rate 1.48%"),
        ("too few, window running", window([0.02] * 60), 300, "wait", "60 of 100 requests"),
        ("too few, window over", window([0.02] * 60), 600, "rollback", "only 60 requests"),
        ("no traffic at all", cl.Scrape(), 900, "rollback", "no requests"),
        ("no traffic, window running", cl.Scrape(), 10, "wait", "0 of 100"),
        ("everything above the top bucket", window([60.0] * 150), 5, "rollback", "above the highest bucket"),
    ],
)
def test_verdict_table(name: str, win: cl.Scrape, elapsed: float, decision: str, in_reason: str) -> None:
    v = cl.verdict(win, CANARY, elapsed)
    assert v.decision == decision, (name, v.reason)
    assert in_reason in v.reason, (name, v.reason)


def test_p99_above_top_rolls_back_even_with_a_generous_limit() -> None:
    generous = Canary(max_p99_ms=600_000)
    v = cl.verdict(window([0.02] * 90 + [45.0] * 10), generous, 1000)
    assert v.decision == "rollback" and "above the highest bucket, 30000 ms" in v.reason


def test_the_champions_client_errors_are_discounted() -> None:
    # Clients send 5% bad requests; champion and canary refuse them alike: not the challenger's fault.
    champion = window([0.02] * 1900, {"400": 100})
    alike = window([0.02] * 190, {"400": 10})
    v = cl.verdict(alike, CANARY, 600, champion_window=champion)
    assert v.decision == "promote", v.reason
    assert cl.verdict(alike, CANARY, 600).decision == "rollback"  # without the champion, every 4xx counts
    # A challenger refusing 15% (a shorter context, say) is 10 points above the champion: rolled back.
    worse = window([0.02] * 170, {"400": 30})
    v = cl.verdict(worse, CANARY, 30, champion_window=champion)
    assert v.decision == "rollback" and "20 of its 30 client errors above the champion's rate of 5.00%" in v.reason, (
        v.reason
    )
    # Server errors always count, whatever the champion does.
    v = cl.verdict(window(FAST, {"429": 5}), CANARY, 600, champion_window=window(FAST, {"429": 5}))
    assert v.decision == "rollback"


def test_verdict_carries_the_figures() -> None:
    v = cl.verdict(window(SLOW_TAIL), CANARY, 42)
    assert v.requests == 200 and v.error_rate == 0.0 and v.min_requests == 100 and v.elapsed_seconds == 42
    assert v.p99_ms == pytest.approx(1000 * cl.histogram_quantile(0.99, latencies(SLOW_TAIL)))
    assert cl.verdict(cl.Scrape(), CANARY, 1).p99_ms != cl.verdict(cl.Scrape(), CANARY, 1).p99_ms  # NaN
    assert cl.verdict(window(FAST), CANARY, 600, needed=500).decision == "rollback"
    assert cl.verdict(cl.Scrape(), CANARY, 600, needed=0).decision == "rollback"  # never promotes on nothing


# -- parsing the server's own metrics -------------------------------------------------------------------


def test_parse_the_servers_metric_definitions() -> None:
    from kdistill.serving.metrics import ServerMetrics

    m = ServerMetrics()
    for v in (0.004, 0.02, 0.02, 0.6):
        m.latency.labels("/v1/classify").observe(v)
    m.latency.labels("/v1/completions").observe(0.04)
    m.errors.labels("/v1/completions", "429").inc()
    m.latency.labels("/v2/models/{name}/infer").observe(0.001)
    m.errors.labels("/v2/models/{name}/infer", "400").inc()
    for probe in ("/v2/health/ready", "/metrics", "other"):  # not model traffic
        m.latency.labels(probe).observe(9.0)
        m.errors.labels(probe, "503").inc()
    s = sm.parse(m.render().decode())
    assert s.requests == 6
    assert dict(s.errors) == {"429": 1, "400": 1}
    b = dict(s.buckets)
    assert (b[0.005], b[0.025], b[0.05], b[0.5], b[1.0], b[INF]) == (2, 4, 5, 5, 6, 6)


def test_parse_refuses_other_metrics() -> None:
    with pytest.raises(ValueError, match="kdistill_request_latency_seconds"):
        sm.parse("# TYPE up gauge\nup 1\n")


def test_scrape_reports_unreachable_servers() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = sm.scrape_all([f"http://127.0.0.1:{port}"], timeout=2)
    assert out.scrapes == {} and "GET /metrics failed" in out.failed[f"http://127.0.0.1:{port}"]
    with pytest.raises(sm.ScrapeError, match="http:// or https://"):
        sm.scrape("file:///etc/passwd")


def test_the_docs_examples_are_the_verdicts_own_words() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "canary.md").read_text()
    for win, elapsed in ((window(SLOW_TAIL), 30), (window(FAST, {"503": 3}), 600), (cl.Scrape(), 900)):
        reason = cl.verdict(win, CANARY, elapsed).reason
        assert f"\n{reason}\n" in doc, reason
