"""The trainer's teacher client against real ``kdistill serve`` processes on loopback.

- ``HttpTeacher`` (binary frame and OpenAI JSON) and the in-process ``LocalTeacher`` agree with
  each other to 1e-4 (FP32) on the same tiny model, ids and texts, and generate the same greedy text;
- a 503 with Retry-After (a real proxy in front of the server) is waited out, at least as long as
  the header says; an overloaded server (``--max-queue 1``) answers 429 and every request still
  succeeds;
- a server killed mid-run: requests wait and finish once it is back on the same port;
- no server within the bound: ``TeacherUnavailable`` (exit code TEACHER_UNAVAILABLE) naming the
  URL and the last error; a request the server refuses (K over its limit) fails at once, BAD_SPEC.
"""

from __future__ import annotations

import http.server
import itertools
import socketserver
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kdistill.api.failures import ExitCode
from kdistill.trainer.errors import TrainerError
from kdistill.trainer.local_teacher import LocalTeacher
from kdistill.trainer.teacher_client import HttpTeacher, RetryPolicy, TeacherUnavailable
from kdistill.trainer.teacher_service import GenerationParams, ScoredTokens
from tests.serving.helpers import ServerProcess, free_port, running_server
from tests.serving.hf_dirs import save_hf_dir

TEXTS = [
    "The for statement is used to iterate over the elements of a sequence",
    "Names refer to objects.",
    "A class definition defines a class object",
]
K = 6


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_dir(tmp_path_factory.mktemp("teacher-hf"))


@pytest.fixture(scope="module")
def server(hf_dir: Path) -> Iterator[ServerProcess]:
    with running_server(hf_dir, "--max-wait-ms", "2", "--max-tokens-limit", "16", "--max-logprobs", "8") as s:
        yield s


@pytest.fixture(scope="module")
def local(hf_dir: Path) -> LocalTeacher:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), use_safetensors=True).eval()
    return LocalTeacher(model, AutoTokenizer.from_pretrained(str(hf_dir)))


def fast_retry(total_s: float = 60.0) -> RetryPolicy:
    return RetryPolicy(total_s=total_s, request_timeout_s=30.0, base_delay_s=0.05, max_delay_s=0.5)


def assert_same_rows(a: list[ScoredTokens], b: list[ScoredTokens]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids.tolist() == y.token_ids.tolist()
        assert x.top_ids[1:].tolist() == y.top_ids[1:].tolist()  # top-K order included
        torch.testing.assert_close(x.logprobs, y.logprobs, rtol=0, atol=1e-4, equal_nan=True)
        torch.testing.assert_close(x.top_logprobs, y.top_logprobs, rtol=0, atol=1e-4, equal_nan=True)


def test_local_and_served_teacher_agree(server: ServerProcess, local: LocalTeacher) -> None:
    ids = [local.tokenizer(t)["input_ids"] for t in TEXTS]
    binary = HttpTeacher(server.url, retry=fast_retry())
    plain = HttpTeacher(server.url, retry=fast_retry(), binary=False)
    try:
        expected = local.score_ids(ids, K).result()
        # The model's own log_softmax, position by position.
        with torch.no_grad():
            logits = local.model(input_ids=torch.tensor([ids[0]])).logits[0]
        ref = torch.log_softmax(logits.float(), -1)[:-1]
        torch.testing.assert_close(expected[0].logprobs[1:], ref.gather(-1, torch.tensor(ids[0][1:])[:, None])[:, 0])
        assert torch.isnan(expected[0].logprobs[0]) and expected[0].top_ids[0].tolist() == [-1] * K
        assert_same_rows(binary.score_ids(ids, K).result(timeout=60), expected)
        assert_same_rows(plain.score_ids(ids, K).result(timeout=60), expected)
        by_text = local.score_texts(TEXTS, K).result()
        binary_rows = binary.score_texts(TEXTS, K).result(timeout=60)
        assert_same_rows(binary_rows, by_text)
        # The binary frame carries the tokenizer's character spans, as the in-process teacher has them.
        for mine, theirs in zip(binary_rows, by_text, strict=True):
            assert mine.offsets is not None and theirs.offsets is not None
            assert mine.offsets.tolist() == theirs.offsets.tolist()
        assert binary.score_ids(ids[:1], K).result(timeout=60)[0].offsets is None  # ids: no text
        json_rows = plain.score_texts(TEXTS, K).result(timeout=60)
        assert_same_rows(json_rows, by_text)
        assert json_rows[0].offsets is not None and int(json_rows[0].offsets[-1, 1]) == len(TEXTS[0])
        greedy = GenerationParams(max_new_tokens=6, temperature=0.0)
        assert binary.generate(TEXTS[:2], greedy).result(timeout=60) == local.generate(TEXTS[:2], greedy).result()
        sampled = binary.generate(TEXTS[:2], GenerationParams(max_new_tokens=4, n=3, seed=7)).result(timeout=60)
        assert [len(s) for s in sampled] == [3, 3]
    finally:
        binary.close()
        plain.close()


def test_many_requests_in_flight_fill_batches(server: ServerProcess, local: LocalTeacher) -> None:
    teacher = HttpTeacher(server.url, retry=fast_retry(), max_in_flight=8, prompts_per_request=1)
    try:
        futures = [teacher.score_texts([f"{TEXTS[i % 3]} {i}"], 2) for i in range(16)]
        assert all(len(f.result(timeout=120)) == 1 for f in futures)
        assert teacher.requests == 16
    finally:
        teacher.close()


class _Proxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def start_proxy(target: str, refusals: int, retry_after: str) -> tuple[_Proxy, list[float]]:
    """A real HTTP server that answers the first ``refusals`` requests with 503 + Retry-After and
    forwards the rest to ``target``; returns it and the times requests arrived."""
    arrivals: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            arrivals.append(time.monotonic())
            if len(arrivals) <= refusals:
                self.send_response(503)
                self.send_header("Retry-After", retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            req = urllib.request.Request(target + self.path, data=body, method="POST", headers=dict(self.headers))
            with urllib.request.urlopen(req, timeout=60) as answer:
                data = answer.read()
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.headers["Content-Type"])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

    proxy = _Proxy(("127.0.0.1", 0), Handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy, arrivals


def test_retry_after_is_honoured(server: ServerProcess, local: LocalTeacher) -> None:
    proxy, arrivals = start_proxy(server.url, refusals=2, retry_after="1")
    teacher = HttpTeacher(f"http://127.0.0.1:{proxy.server_address[1]}", retry=fast_retry(), max_in_flight=1)
    try:
        rows = teacher.score_texts(TEXTS[:1], K).result(timeout=60)
        assert_same_rows(rows, local.score_texts(TEXTS[:1], K).result())
        assert len(arrivals) == 3 and teacher.retries == 2
        # Backoff alone would retry within 0.05-0.1 s; Retry-After: 1 holds each try back a second.
        assert all(b - a >= 1.0 for a, b in itertools.pairwise(arrivals))
    finally:
        teacher.close()
        proxy.shutdown()


def test_overloaded_server_is_retried_until_every_request_succeeds(hf_dir: Path, local: LocalTeacher) -> None:
    with running_server(hf_dir, "--max-queue", "1", "--max-batch-size", "1", "--max-wait-ms", "0") as small:
        teacher = HttpTeacher(small.url, retry=fast_retry(), max_in_flight=8, prompts_per_request=1)
        try:
            futures = [teacher.score_texts([TEXTS[i % 3]], K) for i in range(12)]
            rows = [f.result(timeout=120)[0] for f in futures]
            assert teacher.retries > 0  # some were refused with 429 ...
            expected = local.score_texts(TEXTS, K).result()
            for i, row in enumerate(rows):  # ... and every one was answered right in the end
                assert_same_rows([row], [expected[i % 3]])
        finally:
            teacher.close()


def test_server_killed_mid_run_pauses_then_goes_on(hf_dir: Path, local: LocalTeacher) -> None:
    server = ServerProcess(hf_dir, "--max-wait-ms", "2")
    server.wait_ready()
    teacher = HttpTeacher(server.url, retry=fast_retry(total_s=300.0), max_in_flight=2)
    restarted: ServerProcess | None = None
    try:
        assert len(teacher.score_texts(TEXTS, K).result(timeout=60)) == 3
        server.proc.kill()
        server.proc.wait()
        pending = teacher.score_texts(TEXTS, K)  # sent while nothing listens
        time.sleep(0.5)
        assert not pending.done()
        # The same command on the same port: the teacher's pod replaced by its Deployment.
        restarted = ServerProcess.__new__(ServerProcess)
        restarted.port, restarted.url, restarted.log_path = server.port, server.url, server.log_path
        restarted._log = server.log_path.open("a")
        restarted.proc = subprocess.Popen(server.proc.args, stdout=restarted._log, stderr=subprocess.STDOUT)
        assert_same_rows(pending.result(timeout=420), local.score_texts(TEXTS, K).result())
        assert teacher.retries > 0
    finally:
        teacher.close()
        server.terminate()
        if restarted is not None:
            restarted.terminate()


def test_no_teacher_within_the_bound_fails_with_its_reason() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    teacher = HttpTeacher(url, retry=fast_retry(total_s=1.0))
    started = time.monotonic()
    try:
        with pytest.raises(TeacherUnavailable) as err:
            teacher.score_ids([[5, 6, 7]], K).result(timeout=30)
    finally:
        teacher.close()
    assert 1.0 <= time.monotonic() - started < 10.0
    assert err.value.code == ExitCode.TEACHER_UNAVAILABLE
    assert url in err.value.message and "ConnectionRefusedError" in err.value.message


def test_a_refused_request_fails_at_once(server: ServerProcess) -> None:
    teacher = HttpTeacher(server.url, retry=fast_retry(), binary=False)
    try:
        with pytest.raises(TrainerError) as err:
            teacher.score_ids([[5, 6, 7]], 9).result(timeout=30)  # --max-logprobs 8
    finally:
        teacher.close()
    assert err.value.code == ExitCode.BAD_SPEC and "400" in err.value.message and "logprobs" in err.value.message
