"""``HttpTeacher``: the ``TeacherService`` of a teacher served over HTTP (``kdistill serve``, vLLM,
or any server with the OpenAI legacy ``/v1/completions`` shape).

- **Scoring** sends ``echo: true, max_tokens: 0, logprobs: K`` with the prompt as token ids
  (``score_ids``) or text (``score_texts``). It asks for the binary safetensors frame
  (``Accept: application/vnd.kdistill.logprobs+safetensors``, serving/logprobs_wire.py) and reads
  whatever comes back: that frame from ``kdistill serve``, the OpenAI JSON ``logprobs`` object from
  any other server. The client asks for ``return_tokens_as_token_ids`` (vLLM's option, which
  kdistill serve takes too), so that JSON names tokens ``token_id:N``; a server that names them
  by text is refused, since two ids may decode to the same text.
- **Generation** sends ``max_tokens, temperature, top_p, seed``; ``n`` completions per prompt are
  ``n`` requests (seed, seed + 1, ...), since not every server takes ``n``.
- **Many requests in flight**: a call is cut into requests of at most ``prompts_per_request``
  prompts, run by a pool of ``max_in_flight`` threads with one keep-alive connection each, so that
  the server's dynamic batcher fills while the caller goes on (every call returns a Future).
- **Retries**: a connection error, a timeout, or a 429/502/503/504 answer is retried with
  exponential backoff and full jitter, waiting at least what ``Retry-After`` says. A request that
  has not been answered ``retry.total_s`` seconds after its first failure fails with
  ``ExitCode.TEACHER_UNAVAILABLE`` and a reason naming the URL and the last error; other 4xx
  answers fail at once with ``BAD_SPEC`` (the request is wrong for this server: K above its limit,
  a prompt past its context).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from kdistill.api.failures import ExitCode

from .errors import TrainerError
from .teacher_service import GenerationParams, ScoredTokens

log = logging.getLogger(__name__)

BINARY_MEDIA_TYPE = "application/vnd.kdistill.logprobs+safetensors"  # serving/logprobs_wire.py
TIMEOUT_ENV = "KDISTILL_TEACHER_TIMEOUT_S"
REQUEST_TIMEOUT_ENV = "KDISTILL_TEACHER_REQUEST_TIMEOUT_S"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
T = TypeVar("T")


class TeacherUnavailable(TrainerError):
    """The served teacher did not answer within the retry bound."""

    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.TEACHER_UNAVAILABLE, message)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying one request, and how to space the tries."""

    total_s: float = 600.0  # from a request's first failure to giving up
    request_timeout_s: float = 300.0  # one HTTP exchange (a long generation included)
    base_delay_s: float = 0.25
    max_delay_s: float = 15.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """``KDISTILL_TEACHER_TIMEOUT_S`` and ``KDISTILL_TEACHER_REQUEST_TIMEOUT_S`` over the defaults."""

        def number(name: str, default: float) -> float:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise TrainerError(ExitCode.BAD_SPEC, f"{name}={raw!r} is not a number of seconds") from None
            if not value > 0:
                raise TrainerError(ExitCode.BAD_SPEC, f"{name}={raw!r} must be > 0 seconds")
            return value

        return cls(total_s=number(TIMEOUT_ENV, cls.total_s), request_timeout_s=number(REQUEST_TIMEOUT_ENV, 300.0))

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before try ``attempt + 1``: full jitter over an exponential cap, never less
        than the server's Retry-After."""
        cap = min(self.max_delay_s, self.base_delay_s * 2**attempt)
        wait = random.uniform(0.0, cap)
        if retry_after is not None:
            # A little jitter above Retry-After, so that a fleet of clients does not return at once.
            wait = max(wait, retry_after + random.uniform(0.0, min(1.0, 0.1 * retry_after + 0.05)))
        return wait


class _Retry(Exception):
    """A failure worth another try (connection, timeout, 429/5xx)."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.retry_after = retry_after


@dataclass
class _Answer:
    status: int
    content_type: str
    body: bytes
    retry_after: float | None


def completions_url(base_url: str) -> str:
    """The completions endpoint of ``base_url`` (``http://host:port``, with or without ``/v1``)."""
    base = base_url.strip().rstrip("/")
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise TrainerError(ExitCode.BAD_SPEC, f"teacher URL {base_url!r} is not an http(s)://HOST[:PORT] URL")
    return f"{base}/completions" if base.endswith("/v1") else f"{base}/v1/completions"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class _Gather(Generic[T]):
    """One Future over several: results in order, or the first exception."""

    def __init__(self, parts: list[Future[Any]], combine: Callable[[list[Any]], T]) -> None:
        self.future: Future[T] = Future()
        self._parts = parts
        self._left = len(parts)
        self._lock = threading.Lock()
        self._combine = combine
        for part in parts:
            part.add_done_callback(self._done)

    def _done(self, part: Future[Any]) -> None:
        error = part.exception()
        with self._lock:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
                return
            self._left -= 1
            if self._left:
                return
        try:
            self.future.set_result(self._combine([p.result() for p in self._parts]))
        except BaseException as exc:  # a malformed answer fails the call, not a pool thread
            self.future.set_exception(exc)


class HttpTeacher:
    """A served teacher (module docstring). Thread-safe; ``close`` ends the pool."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        max_in_flight: int = 16,
        prompts_per_request: int = 8,
        retry: RetryPolicy | None = None,
        binary: bool = True,
    ) -> None:
        if max_in_flight < 1 or prompts_per_request < 1:
            raise ValueError("max_in_flight and prompts_per_request must be >= 1")
        self.url = completions_url(base_url)
        parsed = urllib.parse.urlsplit(self.url)
        self._https = parsed.scheme == "https"
        self._netloc = parsed.netloc
        self._path = parsed.path
        self.model = model
        self.prompts_per_request = prompts_per_request
        self.retry = retry or RetryPolicy.from_env()
        self.binary = binary
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="teacher-http")
        self._local = threading.local()
        self._down_since: float | None = None
        self._stopped = threading.Event()
        self._stop_reason = ""
        self._state_lock = threading.Lock()
        # Counters a benchmark or a log line reads.
        self.requests = 0
        self.retries = 0

    # ---- the TeacherService ----------------------------------------------------------------------
    def score_ids(self, sequences: Sequence[Sequence[int]], top_k: int) -> Future[list[ScoredTokens]]:
        prompts: list[Any] = [[int(t) for t in s] for s in sequences]
        return self._score(prompts, top_k)

    def score_texts(self, texts: Sequence[str], top_k: int) -> Future[list[ScoredTokens]]:
        return self._score(list(texts), top_k)

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> Future[list[list[str]]]:
        prompts = list(prompts)
        parts: list[Future[list[str]]] = []
        for sample in range(params.n):
            seed = None if params.seed is None else params.seed + sample
            for chunk in self._chunks(prompts):
                body = {
                    "prompt": chunk,
                    "max_tokens": params.max_new_tokens,
                    "temperature": params.temperature,
                    "top_p": params.top_p,
                    **({"seed": seed} if seed is not None else {}),
                }
                parts.append(self._pool.submit(self._generate_request, body, len(chunk)))
        n_prompts = len(prompts)

        def combine(answers: list[list[str]]) -> list[list[str]]:
            flat = [text for answer in answers for text in answer]  # sample-major, prompt order
            return [[flat[s * n_prompts + i] for s in range(params.n)] for i in range(n_prompts)]

        return _Gather(parts, combine).future

    def close(self) -> None:
        """Cancel queued requests; requests waiting to retry stop at once."""
        with self._state_lock:
            if not self._stopped.is_set():
                self._stop_reason = f"teacher client for {self.url} closed"
                self._stopped.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- requests --------------------------------------------------------------------------------
    def _chunks(self, prompts: list[Any]) -> list[list[Any]]:
        if not prompts:
            raise ValueError("no prompts")
        step = self.prompts_per_request
        return [prompts[i : i + step] for i in range(0, len(prompts), step)]

    def _score(self, prompts: list[Any], top_k: int) -> Future[list[ScoredTokens]]:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        parts = [
            self._pool.submit(self._score_request, chunk, top_k, isinstance(chunk[0], str))
            for chunk in self._chunks(prompts)
        ]
        return _Gather(parts, lambda answers: [row for answer in answers for row in answer]).future

    def _body(self, extra: dict[str, Any]) -> dict[str, Any]:
        # return_tokens_as_token_ids: vLLM then names tokens "token_id:N" in JSON (others ignore it).
        body: dict[str, Any] = {"return_tokens_as_token_ids": True, **extra}
        if self.model:
            body["model"] = self.model
        return body

    def _score_request(self, prompts: list[Any], top_k: int, texts: bool) -> list[ScoredTokens]:
        body = self._body({"prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": top_k})
        answer = self._post(body, binary=self.binary)
        if answer.content_type.split(";")[0].strip().lower() == BINARY_MEDIA_TYPE:
            return _rows_from_frame(answer.body, len(prompts), top_k, self.url)
        return self._rows_from_json(answer.body, prompts, top_k, texts)

    def _generate_request(self, body: dict[str, Any], count: int) -> list[str]:
        answer = self._post(self._body(body), binary=False)
        choices = _json(answer.body, self.url).get("choices")
        if not isinstance(choices, list) or len(choices) != count:
            raise TrainerError(ExitCode.INTERNAL, f"teacher at {self.url}: expected {count} choices, got {choices!r}")
        ordered = sorted(choices, key=lambda c: int(c.get("index", 0)))
        return [str(c.get("text", "")) for c in ordered]

    def _post(self, body: dict[str, Any], *, binary: bool) -> _Answer:
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": BINARY_MEDIA_TYPE if binary else "application/json"}
        first_failure: float | None = None
        attempt = 0
        while True:
            if self._stopped.is_set():
                raise TeacherUnavailable(self._stop_reason)
            try:
                answer = self._exchange(payload, headers)
                if answer.status in RETRY_STATUSES:
                    raise _Retry(
                        f"HTTP {answer.status}: {answer.body[:300].decode(errors='replace')}", answer.retry_after
                    )
                self._mark_up()
                if answer.status >= 400:
                    message = answer.body[:1000].decode(errors="replace")
                    raise TrainerError(
                        ExitCode.BAD_SPEC, f"teacher at {self.url} refused a request: HTTP {answer.status}: {message}"
                    )
                return answer
            except _Retry as failure:
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                self._mark_down(failure.what)
                waited = now - first_failure
                if waited >= self.retry.total_s:
                    self._give_up(
                        f"teacher at {self.url} did not answer within {self.retry.total_s:g}s "
                        f"({TIMEOUT_ENV}); last error: {failure.what}"
                    )
                delay = min(self.retry.delay(attempt, failure.retry_after), self.retry.total_s - waited)
                with self._state_lock:
                    self.retries += 1
                attempt += 1
                if self._stopped.wait(max(0.0, delay)):
                    raise TeacherUnavailable(self._stop_reason) from None

    def _give_up(self, reason: str) -> None:
        """Fail this request, and every other one still retrying: the run ends anyway, and its
        exit should not wait for each request's own bound."""
        with self._state_lock:
            if not self._stopped.is_set():
                self._stop_reason = reason
                self._stopped.set()
        raise TeacherUnavailable(reason)

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._netloc, timeout=self.retry.request_timeout_s)
            self._local.conn = conn
        return conn

    def _exchange(self, payload: bytes, headers: dict[str, str]) -> _Answer:
        conn = self._connection()
        with self._state_lock:
            self.requests += 1
        try:
            conn.request("POST", self._path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, closed
            conn.close()
            self._local.conn = None
            raise _Retry(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        if response.getheader("Connection", "").lower() == "close":
            conn.close()
            self._local.conn = None
        return _Answer(
            response.status,
            response.getheader("Content-Type", ""),
            data,
            _retry_after(response.getheader("Retry-After")),
        )

    def _mark_down(self, what: str) -> None:
        with self._state_lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("teacher at %s: %s; retrying for up to %gs", self.url, what, self.retry.total_s)

    def _mark_up(self) -> None:
        with self._state_lock:
            if self._down_since is not None:
                log.warning("teacher at %s answers again after %.1fs", self.url, time.monotonic() - self._down_since)
                self._down_since = None

    # ---- JSON answers ------------------------------------------------------------------------------
    def _token_id(self, token: str) -> int:
        if token.startswith("token_id:"):
            return int(token.split(":", 1)[1])
        # Token texts are ambiguous (two ids may decode alike, and kdistill serve's JSON merges
        # them): only ids are trusted.
        raise TrainerError(
            ExitCode.BAD_SPEC,
            f"teacher at {self.url} names tokens by text ({token!r}), not by id; use kdistill serve or a server "
            "that takes return_tokens_as_token_ids (vLLM)",
        )

    def _rows_from_json(self, raw: bytes, prompts: list[Any], top_k: int, texts: bool) -> list[ScoredTokens]:
        choices = _json(raw, self.url).get("choices")
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise TrainerError(ExitCode.INTERNAL, f"teacher at {self.url}: expected {len(prompts)} choices")
        rows = []
        for choice, prompt in zip(sorted(choices, key=lambda c: int(c.get("index", 0))), prompts, strict=True):
            lp = choice.get("logprobs")
            if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
                raise TrainerError(ExitCode.BAD_SPEC, f"teacher at {self.url} answered without prompt log-probs (echo)")
            tokens: list[str] = lp["tokens"]
            ids = list(prompt) if not texts else [self._token_id(t) for t in tokens]
            if len(ids) != len(tokens):
                raise TrainerError(
                    ExitCode.INTERNAL, f"teacher at {self.url} echoed {len(tokens)} tokens for {len(ids)}"
                )
            n = len(ids)
            own = torch.full((n,), float("nan"))
            top_ids = torch.full((n, top_k), -1, dtype=torch.int64)
            top_lp = torch.full((n, top_k), float("nan"))
            for t in range(1, n):
                value = lp["token_logprobs"][t]
                own[t] = float("nan") if value is None else float(value)
                alternatives = lp["top_logprobs"][t] or {}
                best = sorted(alternatives.items(), key=lambda kv: -kv[1])[:top_k]
                for j, (token, value) in enumerate(best):
                    top_ids[t, j] = self._token_id(token)
                    top_lp[t, j] = float(value)
            offsets = None
            if texts and isinstance(lp.get("text_offset"), list):
                starts = [int(s) for s in lp["text_offset"]]
                ends = [*starts[1:], len(str(prompt))]
                offsets = torch.tensor(list(zip(starts, ends, strict=True)), dtype=torch.int64).reshape(n, 2)
            rows.append(ScoredTokens(torch.tensor(ids, dtype=torch.int64), own, top_ids, top_lp, offsets))
        return rows


def _json(raw: bytes, url: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        raise TrainerError(
            ExitCode.INTERNAL, f"teacher at {url} answered something that is not JSON: {raw[:200]!r}"
        ) from None
    if not isinstance(body, dict):
        raise TrainerError(ExitCode.INTERNAL, f"teacher at {url} answered {type(body).__name__}, not an object")
    return body


def _rows_from_frame(blob: bytes, count: int, top_k: int, url: str) -> list[ScoredTokens]:
    """The rows of a ``kdistill.logprobs/1`` safetensors frame (serving/logprobs_wire.py)."""
    import struct

    from safetensors.torch import load

    (header_len,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8 : 8 + header_len]).get("__metadata__", {})
    if meta.get("format") != "kdistill.logprobs/1" or int(meta.get("k", -1)) != top_k:
        raise TrainerError(ExitCode.INTERNAL, f"teacher at {url}: unexpected binary frame {meta}")
    t = load(blob)
    lengths = t["lengths"].tolist()
    if len(lengths) != count:
        raise TrainerError(ExitCode.INTERNAL, f"teacher at {url}: {len(lengths)} rows for {count} prompts")
    offsets = t.get("text_offsets")
    rows, at = [], 0
    for n in lengths:
        span = slice(at, at + n)
        rows.append(
            ScoredTokens(
                t["token_ids"][span].long(),
                t["token_logprobs"][span].float(),
                t["top_ids"][span].long(),
                t["top_logprobs"][span].float(),
                offsets[span].long() if offsets is not None else None,
            )
        )
        at += n
    return rows
