"""No input crashes the server (hypothesis fuzzing over loopback), overload answers 429 with
Retry-After, and SIGTERM finishes the requests in flight."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving.helpers import ServerProcess, running_server

ALLOWED = {200, 400, 404, 413, 429}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
LM_FIELDS = {
    "prompt": "hello",
    "max_tokens": 3,
    "temperature": 0.0,
    "top_p": 1.0,
    "stop": None,
    "seed": 1,
    "model": "lm-ptq-int8",
    "stream": False,
}
CLS_FIELDS = {"texts": ["hello"], "model": "cls-ptq-int8"}
INFER = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}


def mutated(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body with some fields replaced by arbitrary JSON, some dropped, some added."""
    keys = sorted(base)
    return st.builds(
        lambda repl, drop, extra: {**{k: v for k, v in base.items() if k not in drop}, **repl, **extra},
        st.dictionaries(st.sampled_from(keys), json_values, max_size=3),
        st.sets(st.sampled_from(keys), max_size=2),
        st.dictionaries(st.text(max_size=8), json_values, max_size=2),
    )


def raw_bodies(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        mutated(base).map(lambda v: json.dumps(v).encode()),
        mutated(base).map(lambda v: json.dumps(v).encode()[: len(json.dumps(v)) // 2]),
    )  # truncated JSON


def check(response: httpx.Response) -> None:
    assert response.status_code in ALLOWED, (response.status_code, response.text)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
        return
    body = response.json()
    if response.status_code >= 400:
        if response.request.url.path.startswith("/v2/"):  # Open Inference Protocol: {"error": "<message>"}
            assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
        else:  # OpenAI shape
            assert set(body["error"]) >= {"message", "type", "param"}


FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=raw_bodies(LM_FIELDS))
def test_fuzz_lm_server(lm_server: ServerProcess, path: str, body: bytes) -> None:
    check(httpx.post(f"{lm_server.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60))


@FUZZ
@given(
    path=st.sampled_from(["/v1/classify", "/v2/models/cls-ptq-int8/infer"]),
    body=st.one_of(raw_bodies(CLS_FIELDS), raw_bodies(INFER)),
)
def test_fuzz_classification_server(cls_server: ServerProcess, path: str, body: bytes) -> None:
    check(httpx.post(f"{cls_server.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60))


def test_servers_still_answer_correctly_after_fuzzing(lm_server: ServerProcess, cls_server: ServerProcess) -> None:
    # Runs after the fuzz tests (file order): the same deterministic request must give the same answer twice.
    body = {"prompt": "The for statement", "max_tokens": 5, "temperature": 0}
    a = httpx.post(f"{lm_server.url}/v1/completions", json=body, timeout=30)
    b = httpx.post(f"{lm_server.url}/v1/completions", json=body, timeout=30)
    assert a.status_code == b.status_code == 200
    assert a.json()["choices"] == b.json()["choices"]
    r = httpx.post(f"{cls_server.url}/v1/classify", json={"texts": ["a b c"]}, timeout=30)
    assert r.status_code == 200 and sum(r.json()["results"][0]["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert httpx.get(f"{lm_server.url}/v2/health/ready").status_code == 200


def test_overload_answers_429_with_retry_after(lm_artifact: Path) -> None:
    with running_server(lm_artifact, "--max-queue", "2", "--max-batch-size", "1", "--max-wait-ms", "0") as server:

        def one(i: int) -> httpx.Response:
            return httpx.post(
                f"{server.url}/v1/completions",
                json={"prompt": f"request {i}", "max_tokens": 60, "temperature": 0},
                timeout=120,
            )

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(one, range(16)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "overloaded"
        assert one(99).status_code == 200  # it recovers once the burst is over
        assert "kdistill_rejected_total" in httpx.get(f"{server.url}/metrics").text


def metric(server: ServerProcess, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_sigterm_finishes_requests_in_flight(lm_artifact: Path) -> None:
    server = ServerProcess(lm_artifact, "--max-batch-size", "1", "--max-wait-ms", "0")
    try:
        server.wait_ready()

        def timed(i: int) -> tuple[httpx.Response, float]:
            r = httpx.post(
                f"{server.url}/v1/completions",
                json={"prompt": f"in flight {i}", "max_tokens": 100, "temperature": 0},
                timeout=120,
            )
            return r, time.monotonic()

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(timed, i) for i in range(6)]
            # Wait until the server holds all six (running or answered): batches of one run one after another.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                held = metric(server, "kdistill_requests_in_flight") + metric(
                    server, 'kdistill_request_latency_seconds_count{endpoint="/v1/completions"}'
                )
                if held >= 6:
                    break
                time.sleep(0.01)
            assert metric(server, "kdistill_requests_in_flight") >= 1, "requests finished before the signal"
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(httpx.HTTPError):  # the listener is closed: no new work
                httpx.post(f"{server.url}/v1/completions", json={"prompt": "late", "max_tokens": 1}, timeout=5)
            done = [f.result() for f in futures]
        responses = [r for r, _ in done]
        assert [r.status_code for r in responses] == [200] * 6
        assert max(t for _, t in done) > signalled  # some were still running when the signal came
        assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in responses)
        assert server.proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        server.terminate()
