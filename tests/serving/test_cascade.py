"""Cascade serving (``kdistill serve --fallback-url``): real student and teacher servers over loopback.

The student and the teacher are different tiny models built from configs (the student a kdistill
artifact, the teacher a plain Hugging Face directory served as it is), so their answers differ
and a test can tell who answered. Thresholds come from the student's own confidences, measured
through a cascade server with the hop header (which the server answers with its own model only).
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kdistill.serving.cascade import ANSWERED_BY_HEADER, HOP_HEADER, generation_confidence
from tests.serving.helpers import ServerProcess, free_port, make_artifact, metrics_text, pydoc_texts
from tests.serving.hf_dirs import save_hf_dir

CLASSIFY = "/v1/classify"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
HOP = {HOP_HEADER: "1"}
TEXTS = [t[:160] for t in pydoc_texts(40)[::4]]  # 10 texts of different lengths and topics
PROMPTS = ["The for statement", "Assignment statements", "A class definition", "The import system", "Comparisons"]
GEN = {"max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """FP32 models (no INT8 kernel whose per-tensor activation scale couples a request's answers to
    its batch), so the student's confidence in a text is the same alone and in a batch."""
    root = tmp_path_factory.mktemp("cascade-models")
    return {
        "cls-student": make_artifact(root, "sequence-classification", "none"),
        "lm-student": make_artifact(root, "causal-lm", "none"),
        "cls-teacher": save_hf_dir(root, "sequence-classification", seed=3),
        "lm-teacher": save_hf_dir(root, "causal-lm", seed=3),
    }


@pytest.fixture(scope="module")
def black_hole() -> Iterator[str]:
    """A port that takes connections and never answers: a teacher that hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def dead_url() -> str:
    """A loopback port nobody listens on: a teacher that is down."""
    return f"http://127.0.0.1:{free_port()}"


def server(model_dir: Path, *extra: str) -> ServerProcess:
    return ServerProcess(model_dir, "--max-wait-ms", "5", *extra)


@contextlib.contextmanager
def servers(*specs: tuple[Path, tuple[str, ...]] | ServerProcess) -> Iterator[list[ServerProcess]]:
    """Start every server at once (loads overlap; a spec may be a server started already), wait
    for all, stop all."""
    started = [s if isinstance(s, ServerProcess) else server(s[0], *s[1]) for s in specs]
    try:
        for s in started:
            s.wait_ready()
        yield started
    finally:
        for s in started:
            s.terminate()


def fallback(url: str, *extra: str) -> tuple[str, ...]:
    return ("--fallback-url", url, *extra)


def post(
    server: ServerProcess, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def split_threshold(confidences: list[float]) -> float:
    """A threshold in the widest gap between the student's confidences, leaving some on each side."""
    values = sorted(confidences)
    gaps = [(values[i + 1] - values[i], i) for i in range(len(values) - 1)]
    width, i = max(gaps)
    assert width > 1e-4, f"no usable gap between the student's confidences {values}"
    return (values[i] + values[i + 1]) / 2


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text ``text`` (0 when the series does not exist yet)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    return 0.0


# -- classification -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cls_servers(models: dict[str, Path], black_hole: str) -> Iterator[dict[str, ServerProcess]]:
    student = models["cls-student"]
    teacher = server(models["cls-teacher"])
    with servers(
        teacher,
        # The teacher is down; the student's answers stand, marked.
        (student, fallback(dead_url(), "--min-confidence", "1.0", "--fallback-on-error", "student")),
        # The teacher hangs: 504 after the timeout.
        (student, fallback(black_hole, "--min-confidence", "1.0", "--fallback-timeout", "0.5")),
        # A base URL with a path the teacher does not serve: it answers 404.
        (student, fallback(f"{teacher.url}/no-such-base/", "--min-confidence", "1.0")),
    ) as (_, down, hung, wrong):
        yield {"teacher": teacher, "down": down, "hung": hung, "wrong": wrong}


@pytest.fixture(scope="module")
def cls_student_answers(cls_servers: dict[str, ServerProcess]) -> list[dict[str, Any]]:
    """The student's own answers (label, score = its confidence), one text per request."""
    out = []
    for text in TEXTS:
        r = post(cls_servers["down"], CLASSIFY, {"texts": [text]}, HOP)
        assert r.status_code == 200, r.text
        out.append(r.json()["results"][0])
    return out


@pytest.fixture(scope="module")
def cls_cascade(
    models: dict[str, Path], cls_servers: dict[str, ServerProcess], cls_student_answers: list[dict[str, Any]]
) -> Iterator[tuple[ServerProcess, float]]:
    threshold = split_threshold([a["score"] for a in cls_student_answers])
    extra = fallback(cls_servers["teacher"].url, "--min-confidence", repr(threshold))
    with servers((models["cls-student"], extra)) as (cascade,):
        yield cascade, threshold


def test_classification_student_answers_when_confident_teacher_otherwise(
    cls_cascade: tuple[ServerProcess, float],
    cls_servers: dict[str, ServerProcess],
    cls_student_answers: list[dict[str, Any]],
) -> None:
    cascade, threshold = cls_cascade
    before = metrics_text(cascade)
    r = post(cascade, CLASSIFY, {"texts": TEXTS})
    assert r.status_code == 200, r.text
    assert r.headers[ANSWERED_BY_HEADER] == "mixed"
    results = r.json()["results"]
    forwarded = [i for i, a in enumerate(cls_student_answers) if a["score"] < threshold]
    assert 0 < len(forwarded) < len(TEXTS)
    teacher = post(cls_servers["teacher"], CLASSIFY, {"texts": [TEXTS[i] for i in forwarded]}).json()["results"]
    teacher_by_text = dict(zip(forwarded, teacher, strict=True))
    for i, (got, student) in enumerate(zip(results, cls_student_answers, strict=True)):
        mark = got["kdistill"]
        assert mark["confidence"] == pytest.approx(student["score"], abs=1e-5)
        expected = teacher_by_text.get(i, student)
        assert mark["answered_by"] == ("teacher" if i in teacher_by_text else "student")
        assert got["label"] == expected["label"]
        assert got["scores"] == pytest.approx(expected["scores"], abs=1e-5)
    # The teacher's answers really differ from the student's on some forwarded text.
    assert any(teacher_by_text[i]["scores"] != pytest.approx(cls_student_answers[i]["scores"]) for i in forwarded)

    after = metrics_text(cascade)
    labels = {"endpoint": CLASSIFY}
    for path, n in (("forwarded", len(forwarded)), ("student", len(TEXTS) - len(forwarded))):
        grown = metric(after, "kdistill_cascade_items_total", path=path, **labels) - metric(
            before, "kdistill_cascade_items_total", path=path, **labels
        )
        assert grown == n
    assert metric(after, "kdistill_cascade_latency_seconds_count", path="teacher", **labels) == 1 + metric(
        before, "kdistill_cascade_latency_seconds_count", path="teacher", **labels
    )
    assert metric(after, "kdistill_cascade_teacher_latency_seconds_count", **labels) >= 1
    assert metric(after, "kdistill_cascade_confidence_count", **labels) - metric(
        before, "kdistill_cascade_confidence_count", **labels
    ) == len(TEXTS)


def test_classification_all_confident_never_calls_the_teacher(
    cls_cascade: tuple[ServerProcess, float], cls_student_answers: list[dict[str, Any]]
) -> None:
    cascade, threshold = cls_cascade
    confident = [t for t, a in zip(TEXTS, cls_student_answers, strict=True) if a["score"] >= threshold]
    before = metrics_text(cascade)
    r = post(cascade, CLASSIFY, {"texts": confident})
    assert r.status_code == 200, r.text
    assert r.headers[ANSWERED_BY_HEADER] == "student"
    assert {x["kdistill"]["answered_by"] for x in r.json()["results"]} == {"student"}
    after = metrics_text(cascade)
    labels = {"endpoint": CLASSIFY}
    assert metric(after, "kdistill_cascade_teacher_latency_seconds_count", **labels) == metric(
        before, "kdistill_cascade_teacher_latency_seconds_count", **labels
    )
    assert metric(after, "kdistill_cascade_latency_seconds_count", path="student", **labels) == 1 + metric(
        before, "kdistill_cascade_latency_seconds_count", path="student", **labels
    )


def test_forwarded_request_is_answered_by_the_model_it_reaches(
    cls_cascade: tuple[ServerProcess, float], cls_student_answers: list[dict[str, Any]]
) -> None:
    """A request that a cascade forwarded (hop header) never goes further: no loop, no marks."""
    cascade, _ = cls_cascade
    r = post(cascade, CLASSIFY, {"texts": TEXTS}, HOP)
    assert r.status_code == 200, r.text
    assert ANSWERED_BY_HEADER not in r.headers
    for got, student in zip(r.json()["results"], cls_student_answers, strict=True):
        assert "kdistill" not in got
        assert got["label"] == student["label"]


def test_teacher_down_with_student_fallback_marks_the_students_answers(
    cls_servers: dict[str, ServerProcess], cls_student_answers: list[dict[str, Any]]
) -> None:
    down = cls_servers["down"]
    r = post(down, CLASSIFY, {"texts": TEXTS[:3]})
    assert r.status_code == 200, r.text
    assert r.headers[ANSWERED_BY_HEADER] == "student"
    for got, student in zip(r.json()["results"], cls_student_answers[:3], strict=True):
        assert got["label"] == student["label"]
        assert got["kdistill"]["answered_by"] == "student"
        assert "unreachable" in got["kdistill"]["fallback_error"]
    text = metrics_text(down)
    assert metric(text, "kdistill_cascade_teacher_errors_total", endpoint=CLASSIFY, reason="connect") >= 1
    assert metric(text, "kdistill_cascade_items_total", endpoint=CLASSIFY, path="forwarded") >= 3


def test_teacher_that_hangs_gives_504_within_the_timeout(cls_servers: dict[str, ServerProcess]) -> None:
    hung = cls_servers["hung"]
    r = post(hung, CLASSIFY, {"texts": TEXTS[:2]})
    assert r.status_code == 504, r.text
    error = r.json()["error"]
    assert error["type"] == "teacher_timeout"
    assert "did not answer within 0.5 s" in error["message"]
    assert metric(metrics_text(hung), "kdistill_cascade_teacher_errors_total", endpoint=CLASSIFY, reason="timeout") >= 1
    # Requests the student answers alone do not wait for the teacher.
    assert post(hung, CLASSIFY, {"texts": TEXTS[:2]}, HOP).status_code == 200


def test_teacher_answering_an_error_gives_502_quoting_it(cls_servers: dict[str, ServerProcess]) -> None:
    wrong = cls_servers["wrong"]
    r = post(wrong, CLASSIFY, {"texts": TEXTS[:2]})
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["type"] == "teacher_error"
    # The base URL's path is kept: the teacher was asked at <base>/v1/classify, and said 404.
    assert f"{cls_servers['teacher'].url}/no-such-base/v1/classify answered 404" in error["message"]
    assert metric(metrics_text(wrong), "kdistill_cascade_teacher_errors_total", endpoint=CLASSIFY, reason="status") >= 1


# -- causal LM ----------------------------------------------------------------------------------


def student_confidence(server: ServerProcess, prompt: str) -> float:
    """The student's exp(mean token log-prob) of its greedy answer, from the logprobs API."""
    r = post(server, COMPLETIONS, {"prompt": prompt, **GEN, "logprobs": 0}, HOP)
    assert r.status_code == 200, r.text
    return generation_confidence(r.json()["choices"][0]["logprobs"]["token_logprobs"])


@pytest.fixture(scope="module")
def lm_servers(models: dict[str, Path]) -> Iterator[dict[str, ServerProcess]]:
    with servers(
        (models["lm-teacher"], ()),
        (models["lm-student"], fallback(dead_url(), "--min-confidence", "1.0")),
    ) as (teacher, down):
        yield {"teacher": teacher, "down": down}


@pytest.fixture(scope="module")
def lm_cascade(
    models: dict[str, Path], lm_servers: dict[str, ServerProcess]
) -> Iterator[tuple[ServerProcess, list[float], float]]:
    confidences = [student_confidence(lm_servers["down"], p) for p in PROMPTS]
    threshold = split_threshold(confidences)
    extra = fallback(lm_servers["teacher"].url, "--min-confidence", repr(threshold))
    with servers((models["lm-student"], extra)) as (cascade,):
        yield cascade, confidences, threshold


def test_completions_forward_the_unconfident_prompts_to_the_teacher(
    lm_cascade: tuple[ServerProcess, list[float], float], lm_servers: dict[str, ServerProcess]
) -> None:
    cascade, confidences, threshold = lm_cascade
    before = metrics_text(cascade)
    r = post(cascade, COMPLETIONS, {"prompt": PROMPTS, **GEN})
    assert r.status_code == 200, r.text
    assert r.headers[ANSWERED_BY_HEADER] == "mixed"
    body = r.json()
    forwarded = [i for i, c in enumerate(confidences) if c < threshold]
    assert 0 < len(forwarded) < len(PROMPTS)
    student = post(lm_servers["down"], COMPLETIONS, {"prompt": PROMPTS, **GEN}, HOP).json()["choices"]
    teacher_body = post(lm_servers["teacher"], COMPLETIONS, {"prompt": [PROMPTS[i] for i in forwarded], **GEN}).json()
    teacher = dict(zip(forwarded, teacher_body["choices"], strict=True))
    for i, choice in enumerate(body["choices"]):
        assert choice["index"] == i
        mark = choice["kdistill"]
        assert mark["confidence"] == pytest.approx(confidences[i], rel=1e-3)
        if i in teacher:
            assert mark["answered_by"] == "teacher"
            assert (choice["text"], choice["finish_reason"]) == (teacher[i]["text"], teacher[i]["finish_reason"])
        else:
            assert mark["answered_by"] == "student"
            assert choice["text"] == student[i]["text"]
    assert any(teacher[i]["text"] != student[i]["text"] for i in forwarded)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    after = metrics_text(cascade)
    labels = {"endpoint": COMPLETIONS}
    assert metric(after, "kdistill_cascade_items_total", path="forwarded", **labels) - metric(
        before, "kdistill_cascade_items_total", path="forwarded", **labels
    ) == len(forwarded)
    assert metric(after, "kdistill_cascade_latency_seconds_count", path="teacher", **labels) == 1 + metric(
        before, "kdistill_cascade_latency_seconds_count", path="teacher", **labels
    )


def test_completion_of_one_confident_prompt_stays_with_the_student(
    lm_cascade: tuple[ServerProcess, list[float], float],
) -> None:
    cascade, confidences, threshold = lm_cascade
    best = max(range(len(PROMPTS)), key=confidences.__getitem__)
    low = min(range(len(PROMPTS)), key=confidences.__getitem__)
    r = post(cascade, COMPLETIONS, {"prompt": PROMPTS[best], **GEN})
    assert r.status_code == 200, r.text
    assert r.headers[ANSWERED_BY_HEADER] == "student"
    r = post(cascade, COMPLETIONS, {"prompt": PROMPTS[low], **GEN})  # a single prompt, forwarded as one
    assert r.status_code == 200, r.text
    assert r.headers[ANSWERED_BY_HEADER] == "teacher"
    assert threshold > confidences[low]


def test_chat_answer_comes_from_whoever_the_confidence_names(
    lm_cascade: tuple[ServerProcess, list[float], float], lm_servers: dict[str, ServerProcess]
) -> None:
    cascade, _, threshold = lm_cascade
    for prompt in PROMPTS[:3]:
        chat = {"messages": [{"role": "user", "content": prompt}], **GEN}
        r = post(cascade, CHAT, chat)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        mark = choice["kdistill"]
        who = "student" if mark["confidence"] >= threshold else "teacher"
        assert mark["answered_by"] == who == r.headers[ANSWERED_BY_HEADER]
        source = lm_servers["down"] if who == "student" else lm_servers["teacher"]
        expected = post(source, CHAT, chat, HOP).json()["choices"][0]["message"]
        assert choice["message"] == expected


def test_streaming_is_answered_by_the_student(lm_cascade: tuple[ServerProcess, list[float], float]) -> None:
    cascade, confidences, _ = lm_cascade
    low = min(range(len(PROMPTS)), key=confidences.__getitem__)
    r = post(cascade, COMPLETIONS, {"prompt": PROMPTS[low], **GEN, "stream": True})
    assert r.status_code == 200
    assert ANSWERED_BY_HEADER not in r.headers
    assert r.text.rstrip().endswith("data: [DONE]")


def test_lm_teacher_down_gives_502_naming_the_teacher(lm_servers: dict[str, ServerProcess]) -> None:
    down = lm_servers["down"]
    r = post(down, COMPLETIONS, {"prompt": PROMPTS[0], **GEN})
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["type"] == "teacher_error"
    assert "unreachable" in error["message"] and "/v1/completions" in error["message"]
    assert (
        metric(metrics_text(down), "kdistill_cascade_teacher_errors_total", endpoint=COMPLETIONS, reason="connect") >= 1
    )


def test_generation_confidence_is_the_geometric_mean_probability() -> None:
    assert generation_confidence([math.log(0.5), math.log(0.5)]) == pytest.approx(0.5)
    assert generation_confidence([math.log(0.9), math.log(0.1)]) == pytest.approx(math.sqrt(0.09))
    assert generation_confidence([]) == 0.0


def test_fallback_flags_need_a_fallback_url(models: dict[str, Path]) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "kdistill.cli.main",
            "serve",
            str(models["cls-student"]),
            "--min-confidence",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert "needs --fallback-url" in " ".join(r.stderr.replace("│", " ").split())
