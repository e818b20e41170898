"""Cascade serving: the student answers what it is confident about; the rest goes to the teacher.

``kdistill serve --fallback-url URL --min-confidence X`` (``serving.fallback`` in a job) puts a
teacher behind the student. Each item of a request (a text to classify, a prompt to complete, a
chat) is first answered by the student; an item whose confidence is below ``min_confidence`` is
sent to the teacher, on the same route and in the same protocol, and the teacher's answer replaces
the student's. One request's forwarded items go to the teacher as one request.

**Confidence, one meaning for both tasks: a probability in [0, 1].**

- classification: the top class probability;
- causal LM: ``exp(mean log-prob of the generated tokens)``, the geometric mean of the per-token
  probabilities the student gave its own answer (log-probs of the model's distribution, before
  temperature and top-p). A mean log-prob is unbounded below and depends on nothing but the
  answer's tokens; its exponential keeps the threshold in the same range as a classifier's and in
  the API's single ``minConfidence`` field, and the log-prob threshold is ``ln(minConfidence)``
  (0.6 <-> -0.51). An empty answer (the student ends at once) has no tokens to judge and counts as
  not confident.

**Teacher failures.** The whole teacher call, connection included, is bounded by ``timeout_s``.
With ``on_teacher_error="fail"`` a timeout answers 504 and any other failure 502 (unreachable,
a non-2xx answer, an answer of the wrong shape), as a JSON error of the route's protocol naming
the teacher's URL. With ``"student"`` the student's own answers stand, each forwarded item marked
with ``fallback_error``. Nothing is retried: a retry would double a latency the cascade exists to
bound.

**Who answered.** Each result carries ``kdistill: {"answered_by": "student" | "teacher",
"confidence": c}`` (plus ``fallback_error`` when the teacher failed), and the response the header
``X-Kdistill-Answered-By: student | teacher | mixed``. Requests the server forwards carry
``X-Kdistill-Cascade-Hop: 1``; a kdistill server answers such a request with its own model and
never forwards it again, so a misconfigured loop (a server whose fallback is itself) cannot recurse.

Streaming and log-prob/echo completions are answered by the student alone (its confidence is only
known once the answer is complete).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import ApiError
from .metrics import ServerMetrics

if TYPE_CHECKING:
    import httpx  # imported when a cascade first calls the teacher: a server without one needs no httpx

    from .generation import GenResult
    from .schemas import SamplingParams

log = logging.getLogger("kdistill.serving.cascade")

ANSWERED_BY_HEADER = "X-Kdistill-Answered-By"
HOP_HEADER = "X-Kdistill-Cascade-Hop"

OnTeacherError = Literal["fail", "student"]
AnsweredBy = Literal["student", "teacher"]


@dataclass(frozen=True)
class FallbackOptions:
    """Where the teacher is and when to ask it (``serving.fallback`` in the API)."""

    url: str
    min_confidence: float = 0.6
    timeout_s: float = 30.0
    model: str = ""  # the ``model`` field sent to the teacher; empty sends none
    on_teacher_error: OnTeacherError = "fail"
    max_in_flight: int = 64

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"fallback URL {self.url!r} must start with http:// or https://")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min confidence {self.min_confidence} must lie in [0, 1]")
        if self.timeout_s <= 0:
            raise ValueError(f"fallback timeout {self.timeout_s} must be > 0")
        if self.max_in_flight < 1:
            raise ValueError(f"fallback max in flight {self.max_in_flight} must be >= 1")

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")


def generation_confidence(token_logprobs: Sequence[float]) -> float:
    """A causal LM's confidence in its answer: exp(mean token log-prob); 0 for an empty answer."""
    values = [float(v) for v in token_logprobs]
    if not values:
        return 0.0
    return math.exp(sum(values) / len(values))


def result_confidence(result: GenResult) -> float:
    """``generation_confidence`` of a result generated with ``logprobs`` set (0 for none)."""
    if result.logprobs is None:
        return 0.0
    return generation_confidence(result.logprobs.token_logprobs.tolist())


# The sampling parameters a forwarded completion or chat keeps (``stream`` never: streams stay with
# the student).
TEACHER_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed")


def teacher_params(body: SamplingParams) -> dict[str, Any]:
    """The request's sampling parameters as the teacher gets them."""
    return body.model_dump(include=set(TEACHER_PARAMS), exclude_none=True)


@dataclass
class Verdict:
    """Who answered one item, the student's confidence, and why the teacher could not (if so)."""

    answered_by: AnsweredBy
    confidence: float
    fallback_error: str | None = None

    def mark(self) -> dict[str, Any]:
        out: dict[str, Any] = {"answered_by": self.answered_by, "confidence": self.confidence}
        if self.fallback_error is not None:
            out["fallback_error"] = self.fallback_error
        return out


def answered_by(verdicts: Sequence[Verdict]) -> str:
    """The response header's value: who answered every item, or ``mixed``."""
    who = {v.answered_by for v in verdicts}
    return who.pop() if len(who) == 1 else "mixed"


class TeacherFailure(Exception):
    """The teacher did not give a usable answer: the status to answer with, why, and for metrics
    the ``reason`` (timeout, connect, status, answer)."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers

    def api_error(self) -> ApiError:
        kind = "teacher_timeout" if self.status == 504 else "teacher_error"
        return ApiError(self.status, self.message, None, kind=kind, headers=self.headers)


def _teacher_message(response: httpx.Response) -> str:
    """The error message of a teacher's non-2xx answer, from the OpenAI or v2 error shape."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))[:200]
    return str(error if error is not None else body)[:200]


class Cascade:
    """The teacher client and the decisions of one server (one per process)."""

    def __init__(self, options: FallbackOptions, metrics: ServerMetrics) -> None:
        self.options = options
        self.metrics = metrics
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        # Created on first use, inside the server's event loop.
        import httpx

        if self._client is None:
            n = self.options.max_in_flight
            self._client = httpx.AsyncClient(
                base_url=self.options.base_url,
                timeout=httpx.Timeout(self.options.timeout_s),
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                headers={HOP_HEADER: "1"},
                trust_env=False,  # the teacher's URL is the one configured, never a proxy from the environment
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def confident(self, endpoint: str, confidence: float) -> bool:
        self.metrics.cascade_confidence.labels(endpoint).observe(confidence)
        return confidence >= self.options.min_confidence

    async def call(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the teacher's ``endpoint`` (the same route) within the timeout."""
        import httpx

        url = self.options.base_url + endpoint
        if self.options.model:
            body = {**body, "model": self.options.model}
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.options.timeout_s):
                response = await self.client().post(endpoint, json=body)
        except (TimeoutError, httpx.TimeoutException):
            raise self._failed(
                endpoint,
                TeacherFailure(
                    504, "timeout", f"the teacher at {url} did not answer within {self.options.timeout_s:g} s"
                ),
            ) from None
        except httpx.HTTPError as exc:
            what = "is unreachable" if isinstance(exc, httpx.ConnectError) else "dropped the connection"
            raise self._failed(
                endpoint, TeacherFailure(502, "connect", f"the teacher at {url} {what}: {type(exc).__name__}: {exc}")
            ) from None
        if response.status_code != 200:
            retry = response.headers.get("retry-after")
            raise self._failed(
                endpoint,
                TeacherFailure(
                    502,
                    "status",
                    f"the teacher at {url} answered {response.status_code}: {_teacher_message(response)}",
                    {"Retry-After": retry} if retry else None,
                ),
            )
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise self._failed(endpoint, TeacherFailure(502, "answer", f"the teacher at {url} answered no JSON object"))
        self.metrics.cascade_teacher_latency.labels(endpoint).observe(time.perf_counter() - start)
        return answer

    def _failed(self, endpoint: str, failure: TeacherFailure) -> TeacherFailure:
        self.metrics.cascade_teacher_errors.labels(endpoint, failure.reason).inc()
        log.warning("cascade teacher error endpoint=%s reason=%s: %s", endpoint, failure.reason, failure.message)
        return failure

    def bad_answer(self, endpoint: str, what: str) -> TeacherFailure:
        return self._failed(
            endpoint, TeacherFailure(502, "answer", f"the teacher at {self.options.base_url}{endpoint} {what}")
        )

    async def ask(
        self, endpoint: str, forwarded: list[int], verdicts: list[Verdict], body: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The teacher's answer for the ``forwarded`` items, or None when it failed and the student's
        answers stand (``on_teacher_error: student``, the items' verdicts marked)."""
        try:
            return await self.call(endpoint, body)
        except TeacherFailure as failure:
            self._fall_back(failure, forwarded, verdicts)
            return None

    def _fall_back(self, failure: TeacherFailure, forwarded: list[int], verdicts: list[Verdict]) -> None:
        if self.options.on_teacher_error == "fail":
            raise failure.api_error() from None
        for i in forwarded:
            verdicts[i].fallback_error = failure.message

    def finish(self, endpoint: str, verdicts: Sequence[Verdict], started: float) -> None:
        """Count the items by who answered and time the request by its path."""
        forwarded = sum(1 for v in verdicts if v.answered_by == "teacher" or v.fallback_error is not None)
        self.metrics.cascade_items.labels(endpoint, "student").inc(len(verdicts) - forwarded)
        if forwarded:
            self.metrics.cascade_items.labels(endpoint, "forwarded").inc(forwarded)
        path = "teacher" if forwarded else "student"
        self.metrics.cascade_latency.labels(endpoint, path).observe(time.perf_counter() - started)

    # -- classification (/v1/classify) ---------------------------------------------------------

    async def classify(
        self, endpoint: str, texts: Sequence[str], results: list[dict[str, Any]], labels: Sequence[str], started: float
    ) -> tuple[list[dict[str, Any]], list[Verdict]]:
        """The student's ``results`` (label, score, scores per text), with the unconfident ones
        replaced by the teacher's answers for the same texts."""
        verdicts = [Verdict("student", float(r["score"])) for r in results]  # the top class probability
        forwarded = [i for i, v in enumerate(verdicts) if not self.confident(endpoint, v.confidence)]
        if forwarded:
            answer = await self.ask(endpoint, forwarded, verdicts, {"texts": [texts[i] for i in forwarded]})
            if answer is not None:
                teacher = answer.get("results")
                if not isinstance(teacher, list) or len(teacher) != len(forwarded):
                    self._bad(endpoint, forwarded, verdicts, f"answered no results list of {len(forwarded)}")
                else:
                    known = set(labels)
                    for row in teacher:
                        if not isinstance(row, dict) or row.get("label") not in known:
                            label = row.get("label") if isinstance(row, dict) else row
                            self._bad(
                                endpoint, forwarded, verdicts, f"answered label {label!r}, not one of {sorted(known)}"
                            )
                            break
                    else:
                        for i, row in zip(forwarded, teacher, strict=True):
                            results[i] = {k: row[k] for k in ("label", "score", "scores") if k in row}
                            verdicts[i].answered_by = "teacher"
        for r, v in zip(results, verdicts, strict=True):
            r["kdistill"] = v.mark()
        self.finish(endpoint, verdicts, started)
        return results, verdicts

    def _bad(self, endpoint: str, forwarded: list[int], verdicts: list[Verdict], what: str) -> None:
        self._fall_back(self.bad_answer(endpoint, what), forwarded, verdicts)

    # -- causal LM (/v1/completions, /v1/chat/completions) -------------------------------------

    async def complete(
        self,
        endpoint: str,
        prompts: Sequence[str | list[int]],
        single: bool,
        params: Mapping[str, Any],
        choices: list[dict[str, Any]],
        confidences: Sequence[float],
        student_tokens: Sequence[int],
        usage: dict[str, int],
        started: float,
    ) -> list[Verdict]:
        """Replace the unconfident ``choices`` (``text``, ``finish_reason``) with the teacher's
        completions of the same prompts under the same sampling ``params``; ``usage`` counts the
        teacher's completion tokens in place of the replaced ones (``student_tokens`` per choice)."""
        verdicts = [Verdict("student", c) for c in confidences]
        forwarded = [i for i, v in enumerate(verdicts) if not self.confident(endpoint, v.confidence)]
        if forwarded:
            prompt: Any = prompts[forwarded[0]] if single else [prompts[i] for i in forwarded]
            answer = await self.ask(endpoint, forwarded, verdicts, {**params, "prompt": prompt})
            if answer is not None:
                teacher = _choices(answer, len(forwarded))
                if teacher is None:
                    self._bad(endpoint, forwarded, verdicts, f"answered no {len(forwarded)} completion choices")
                else:
                    self._replace(forwarded, verdicts, choices, teacher, student_tokens, usage, answer, "text")
        for c, v in zip(choices, verdicts, strict=True):
            c["kdistill"] = v.mark()
        self.finish(endpoint, verdicts, started)
        return verdicts

    async def chat(
        self,
        endpoint: str,
        messages: list[dict[str, str]],
        params: Mapping[str, Any],
        choice: dict[str, Any],
        confidence: float,
        student_tokens: int,
        usage: dict[str, int],
        started: float,
    ) -> list[Verdict]:
        """The chat twin of ``complete``: one conversation, one choice (``message``)."""
        verdicts = [Verdict("student", confidence)]
        if not self.confident(endpoint, confidence):
            answer = await self.ask(endpoint, [0], verdicts, {**params, "messages": messages})
            if answer is not None:
                teacher = _choices(answer, 1)
                if teacher is None or not isinstance(teacher[0].get("message"), dict):
                    self._bad(endpoint, [0], verdicts, "answered no chat message")
                else:
                    self._replace([0], verdicts, [choice], teacher, [student_tokens], usage, answer, "message")
        choice["kdistill"] = verdicts[0].mark()
        self.finish(endpoint, verdicts, started)
        return verdicts

    @staticmethod
    def _replace(
        forwarded: list[int],
        verdicts: list[Verdict],
        choices: list[dict[str, Any]],
        teacher: list[dict[str, Any]],
        student_tokens: Sequence[int],
        usage: dict[str, int],
        answer: dict[str, Any],
        field: str,
    ) -> None:
        replaced = 0
        for i, t in zip(forwarded, teacher, strict=True):
            replaced += student_tokens[i]
            choices[i][field] = t.get(field)
            choices[i]["finish_reason"] = t.get("finish_reason")
            verdicts[i].answered_by = "teacher"
        teacher_usage = answer.get("usage")
        tokens = teacher_usage.get("completion_tokens") if isinstance(teacher_usage, dict) else None
        if isinstance(tokens, int):
            usage["completion_tokens"] += tokens - replaced
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]


def _choices(answer: dict[str, Any], n: int) -> list[dict[str, Any]] | None:
    """The teacher's ``n`` choices in index order, or None when the answer has another shape."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != n or not all(isinstance(c, dict) for c in choices):
        return None
    ordered = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)
    return ordered
