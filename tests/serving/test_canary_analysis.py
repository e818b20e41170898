"""The canary analysis against real ``kdistill serve`` processes: a champion and a challenger behind
an emulated Service (requests spread at random over the pods of the replica split), judged on the
challenger's own /metrics read over HTTP, as the operator reads them.

The challengers are made healthy or unhealthy by how they run, never by a flag that fakes their
metrics: a much longer batching delay (the p99 goes up), a one-request queue under concurrent load
(429s), a model with a shorter context (400s for texts the champion serves). Thresholds and windows
come from the champion's speed measured on this machine, so a loaded machine makes the test
slower, not red.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from kdistill.api.schedule import Canary
from kdistill.operator import canary_logic as cl
from kdistill.operator import server_metrics as sm
from tests.serving.helpers import (
    ServerProcess,
    build_tiny_tokenizer,
    make_artifact,
    pydoc_texts,
    running_server,
    tiny_bert_classifier,
)

CONCURRENCY = 12


# -- traffic ---------------------------------------------------------------------------------------


@dataclass
class Load:
    """Closed-loop clients sending /v1/classify to pods picked at random, as kube-proxy spreads a
    Service's connections over its endpoints. Counts what each pod answered, client-side."""

    pods: list[str]
    texts: list[str]
    seed: int = 0
    answered: dict[str, Counter[int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        with httpx.Client(timeout=60) as http:
            while not self._stop.is_set():
                pod = rng.choice(self.pods)
                try:
                    status = http.post(f"{pod}/v1/classify", json={"texts": [rng.choice(self.texts)]}).status_code
                except httpx.HTTPError:
                    status = -1  # no answer at all: the server never counted it
                with self._lock:
                    self.answered.setdefault(pod, Counter())[status] += 1

    def __enter__(self) -> Load:
        for i in range(CONCURRENCY):
            t = threading.Thread(target=self._client, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def count(self, pod: str) -> int:
        with self._lock:
            return sum(self.answered.get(pod, Counter()).values())


def service_pods(champion: ServerProcess, canary: ServerProcess, weight: int) -> list[str]:
    """The Service's endpoints for one champion replica: the replica split, one URL per pod."""
    split = cl.canary_replicas(1, weight)
    return [champion.url] * split.champion + [canary.url] * split.canary


# -- the analysis loop, as the operator runs it ------------------------------------------------------------


@dataclass
class Analysis:
    verdict: cl.Verdict
    canary_window: cl.Scrape  # after the load stopped: every request of the analysis
    both_window: cl.Scrape  # the same, summed over the champion's and the canary's pods
    sent: dict[str, Counter[int]]  # what each pod answered, as the clients saw it
    canary_url: str

    @property
    def sent_to_canary(self) -> Counter[int]:
        return self.sent[self.canary_url]


def analyse(
    champion: ServerProcess, canary: ServerProcess, rules: Canary, texts: list[str], deadline_s: float
) -> Analysis:
    """Scrape both servers, run the load, judge every half second until the verdict is not wait."""
    urls = [champion.url, canary.url]
    start = sm.scrape_all(urls)
    assert not start.failed, start.failed
    began = time.monotonic()
    with Load(service_pods(champion, canary, rules.weight), texts) as load:
        while True:
            now = sm.scrape_all(urls)
            assert not now.failed, now.failed
            result = cl.verdict(
                cl.window({canary.url: start.scrapes[canary.url]}, {canary.url: now.scrapes[canary.url]}),
                rules,
                time.monotonic() - began,
                champion_window=cl.window(
                    {champion.url: start.scrapes[champion.url]}, {champion.url: now.scrapes[champion.url]}
                ),
            )
            if result.decision != "wait":
                break
            assert time.monotonic() - began < deadline_s, f"still waiting after {deadline_s:.0f} s: {result.reason}"
            time.sleep(0.5)  # the analysis interval; the loop ends on the verdict, not on the time
    end = sm.scrape_all(urls)
    assert not end.failed, end.failed
    return Analysis(
        verdict=result,
        canary_window=cl.delta(start.scrapes[canary.url], end.scrapes[canary.url]),
        both_window=cl.window(start.scrapes, end.scrapes),
        sent={url: load.answered.get(url, Counter()) for url in urls},
        canary_url=canary.url,
    )


# -- fixtures ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """The champion under the test's load on this machine: requests per second and p99."""

    rate: float
    p99_ms: float


@pytest.fixture(scope="module")
def texts(cls_artifact: Path) -> dict[str, list[str]]:
    """Texts of at most 24 tokens ("short") and of 48 to 120 ("long"), in the artifacts' tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cls_artifact))
    lengths = {t: len(tok(t, add_special_tokens=True)["input_ids"]) for t in pydoc_texts(2000)}
    pieces = [w for t in lengths for w in t.split()]
    short = [" ".join(pieces[i : i + 3]) for i in range(0, 3000, 3)]
    short = [t for t in short if len(tok(t, add_special_tokens=True)["input_ids"]) <= 24][:200]
    long = [t for t, n in lengths.items() if 48 <= n <= 120][:200]
    assert len(short) >= 50 and len(long) >= 50, (len(short), len(long))
    return {"short": short, "long": long}


@pytest.fixture(scope="module")
def champion(cls_artifact: Path) -> Iterator[ServerProcess]:
    with running_server(cls_artifact, "--max-wait-ms", "5") as server:
        yield server


@pytest.fixture(scope="module")
def baseline(champion: ServerProcess, texts: dict[str, list[str]]) -> Baseline:
    """Load the champion alone for 300 requests and read its rate and p99 from its own metrics."""
    start = sm.scrape(champion.url)
    began = time.monotonic()
    with Load([champion.url], texts["short"] + texts["long"], seed=99) as load:
        deadline = began + 600
        while load.count(champion.url) < 300:
            assert time.monotonic() < deadline, "the champion answered fewer than 300 requests in 600 s"
            time.sleep(0.1)
        elapsed = time.monotonic() - began
    w = cl.delta(start, sm.scrape(champion.url))
    assert w.requests >= 300 and not w.errors, w
    return Baseline(rate=w.requests / elapsed, p99_ms=1000 * cl.histogram_quantile(0.99, w.buckets))


def rules_for(baseline: Baseline, weight: int = 50) -> Canary:
    """Canary rules this machine can meet with a healthy challenger: a p99 limit well above the
    champion's, and a window long enough for the canary's share of 4x the requests it needs."""
    max_p99 = max(300.0, 6 * baseline.p99_ms)  # two servers share the CPU during the analysis
    split = cl.canary_replicas(1, weight)
    needed_total = cl.MIN_REQUESTS / split.share
    return Canary(
        weight=weight,
        analysis_seconds=max(5, math.ceil(4 * needed_total / baseline.rate)),
        max_error_rate=0.01,
        max_p99_ms=max_p99,
    )


@pytest.fixture(scope="module")
def challenger_artifact(artifacts: Path) -> Path:
    """Another student (another seed) of the same shape: a healthy challenger."""
    return make_artifact(artifacts / "challenger", "sequence-classification", "ptq-int8", seed=1)


@pytest.fixture(scope="module")
def short_context_artifact(artifacts: Path) -> Path:
    """A challenger whose model has 32 positions: it refuses texts the champion's 128 take."""
    from kdistill.trainer.artifact import save_artifact
    from kdistill.trainer.quantization import quantize_ptq_int8

    root = artifacts / "short-context"
    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    model = quantize_ptq_int8(tiny_bert_classifier(len(tokenizer), positions=32, seed=2))
    return save_artifact(
        model, tokenizer, root / "cls" / "student-int8", task="sequence-classification",
        quantization="ptq-int8", metrics={"metric": "test"},
    )  # fmt: skip


def judged(champion: ServerProcess, challenger: ServerProcess, rules: Canary, texts: list[str]) -> Analysis:
    out = analyse(champion, challenger, rules, texts, deadline_s=rules.analysis_seconds + 600)
    print(
        f"{out.verdict.decision}: {out.verdict.reason} (rules {rules!r}; sent to the canary {dict(out.sent_to_canary)})"
    )
    # The verdict rests on what the challenger really answered: its metrics count every request
    # the clients sent it, by status.
    sent = out.sent_to_canary
    assert -1 not in sent, sent
    assert out.canary_window.requests == sum(sent.values()), (out.canary_window, sent)
    assert dict(out.canary_window.errors) == {str(s): n for s, n in sent.items() if s >= 400}
    # Summed over both pods, the window holds every request the clients sent to the Service.
    assert out.both_window.requests == sum(sum(c.values()) for c in out.sent.values())
    assert dict(out.both_window.buckets)[math.inf] == out.both_window.requests
    return out


# -- the tests -------------------------------------------------------------------------------------


def test_healthy_challenger_is_promoted(
    champion: ServerProcess, baseline: Baseline, challenger_artifact: Path, texts: dict[str, list[str]]
) -> None:
    rules = rules_for(baseline)
    with running_server(challenger_artifact, "--max-wait-ms", "5") as challenger:
        out = judged(champion, challenger, rules, texts["short"] + texts["long"])
    v = out.verdict
    assert v.decision == "promote", (v.reason, baseline, rules)
    assert v.elapsed_seconds >= rules.analysis_seconds and v.requests >= cl.MIN_REQUESTS
    assert v.error_rate == 0.0 and v.p99_ms <= rules.max_p99_ms


def test_slow_challenger_is_rolled_back_on_p99(
    champion: ServerProcess, baseline: Baseline, challenger_artifact: Path, texts: dict[str, list[str]]
) -> None:
    """The same model with a batching delay of 3x the p99 limit: with fewer concurrent requests
    than the batch size, each batch waits the whole delay, so the challenger's p99 exceeds it."""
    fast = rules_for(baseline)
    delay_ms = 3 * fast.max_p99_ms
    # Each canary request holds a client for the whole delay: a window for 4x the requests needed.
    per_second = CONCURRENCY / (delay_ms / 1000)
    rules = fast.model_copy(
        update={"analysis_seconds": max(fast.analysis_seconds, math.ceil(4 * cl.MIN_REQUESTS / per_second))}
    )
    with running_server(challenger_artifact, "--max-wait-ms", f"{delay_ms:.0f}", "--max-batch-size", "64") as slow:
        out = judged(champion, slow, rules, texts["short"] + texts["long"])
    v = out.verdict
    assert v.decision == "rollback", (v.reason, baseline, rules)
    assert "p99 latency" in v.reason and v.p99_ms > rules.max_p99_ms, v.reason
    assert v.error_rate == 0.0


def test_overloaded_challenger_is_rolled_back_on_429s(
    champion: ServerProcess, baseline: Baseline, challenger_artifact: Path, texts: dict[str, list[str]]
) -> None:
    """A queue of one request under concurrent clients: the challenger refuses the overflow."""
    rules = rules_for(baseline)
    with running_server(challenger_artifact, "--max-queue", "1", "--max-wait-ms", "50") as overloaded:
        out = judged(champion, overloaded, rules, texts["short"] + texts["long"])
    v = out.verdict
    assert v.decision == "rollback", (v.reason, baseline, rules)
    assert "error rate" in v.reason and "by status: 429: " in v.reason, v.reason
    assert out.canary_window.errors.get("429", 0) > 0


def test_challenger_refusing_the_champions_requests_is_rolled_back(
    champion: ServerProcess, baseline: Baseline, short_context_artifact: Path, texts: dict[str, list[str]]
) -> None:
    """Real bad requests for the challenger only: texts over its 32 positions get 400 from it and
    answers from the champion, so its client errors are above the champion's rate (zero)."""
    rules = rules_for(baseline)
    with running_server(short_context_artifact, "--max-wait-ms", "5") as short:
        out = judged(champion, short, rules, texts["short"] + texts["long"])
    v = out.verdict
    assert v.decision == "rollback", (v.reason, baseline, rules)
    assert "by status: 400: " in v.reason and "client errors above the champion's rate of 0.00%" in v.reason, v.reason


def test_no_traffic_is_rolled_back_not_promoted(champion: ServerProcess, challenger_artifact: Path) -> None:
    """A challenger that got no model requests in the window is rolled back once it ends; probes,
    metadata reads and scrapes are not model traffic."""
    rules = Canary(weight=50, analysis_seconds=2)
    with running_server(challenger_artifact, "--max-wait-ms", "5") as idle:
        start = sm.scrape(idle.url)
        began = time.monotonic()
        while True:
            for path in ("/v2/health/ready", "/v2/health/live", "/v1/models", "/v2", "/metrics", "/nowhere"):
                httpx.get(f"{idle.url}{path}", timeout=10)
            v = cl.verdict(cl.delta(start, sm.scrape(idle.url)), rules, time.monotonic() - began)
            if v.decision != "wait":
                break
            assert time.monotonic() - began < 120
            time.sleep(0.2)
    assert v.decision == "rollback" and "no requests" in v.reason, v.reason


def test_not_model_endpoints_are_the_servers_get_routes() -> None:
    """Every GET-only route of the server is left out of the analysis, every POST route counted."""
    from kdistill.serving.app import create_app
    from kdistill.serving.state import ServeLimits, ServerState

    def walk(routes: list[Any]) -> Iterator[tuple[str, set[str]]]:
        for r in routes:
            if hasattr(r, "methods") and hasattr(r, "path"):
                yield r.path, set(r.methods)
            elif hasattr(r, "original_router"):  # FastAPI >= 0.165 keeps included routers apart
                yield from walk(r.original_router.routes)

    app: Any = create_app(ServerState("m", ServeLimits()))
    routes = dict(walk(app.routes))
    gets = {p for p, m in routes.items() if m <= {"GET", "HEAD"}}
    posts = {p for p, m in routes.items() if "POST" in m}
    assert gets | {"other"} == sm.NOT_MODEL_ENDPOINTS
    assert posts and not posts & sm.NOT_MODEL_ENDPOINTS
