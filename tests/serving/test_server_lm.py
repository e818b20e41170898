"""The causal-LM server over loopback: OpenAI-compatible completions, chat, streaming, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from kdistill.serving.generation import GenRequest, chat_prompt, generate_batch
from kdistill.trainer.artifact import Artifact
from tests.serving.helpers import ServerProcess, load_served

NAME = "lm-ptq-int8"  # the job folder above student-int8


@pytest.fixture(scope="module")
def local(lm_artifact: Path, lm_server: ServerProcess) -> Artifact:
    """The same artifact loaded in the test process: what the server must answer."""
    return load_served(lm_artifact, lm_server)


def expected_text(local: Artifact, prompt: str, max_tokens: int) -> str:
    ids = local.tokenizer(prompt)["input_ids"]
    return generate_batch(local.model, local.tokenizer, [GenRequest(ids, max_tokens, 0.0)])[0].text


def sse(text: str) -> list[Any]:
    events = [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_and_health(lm_server: ServerProcess) -> None:
    assert httpx.get(f"{lm_server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{lm_server.url}/v2/health/ready").status_code == 200
    models = httpx.get(f"{lm_server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME]


def test_greedy_completion_matches_the_model(lm_server: ServerProcess, local: Artifact) -> None:
    prompt = "The for statement is used to iterate"
    r = httpx.post(
        f"{lm_server.url}/v1/completions",
        json={"model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == NAME
    assert body["choices"][0]["text"] == expected_text(local, prompt, 8)
    assert body["usage"]["prompt_tokens"] == len(local.tokenizer(prompt)["input_ids"])
    assert body["usage"]["completion_tokens"] <= 8


def test_several_prompts_seed_and_stop(lm_server: ServerProcess, local: Artifact) -> None:
    prompts = ["x = 1", "Objects are Python's abstraction for data"]
    body = {"prompt": prompts, "max_tokens": 6, "temperature": 0.8, "top_p": 0.9, "seed": 11}
    a = httpx.post(f"{lm_server.url}/v1/completions", json=body, timeout=30).json()
    b = httpx.post(f"{lm_server.url}/v1/completions", json=body, timeout=30).json()
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded: reproducible
    greedy = expected_text(local, prompts[1], 10)
    stop = greedy[4:6]
    r = httpx.post(
        f"{lm_server.url}/v1/completions",
        json={"prompt": prompts[1], "max_tokens": 10, "temperature": 0, "stop": [stop]},
        timeout=30,
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == greedy[: greedy.find(stop)] and choice["finish_reason"] == "stop"


def test_streamed_completion_and_chat(lm_server: ServerProcess, local: Artifact) -> None:
    prompt = "Objects are Python's abstraction"
    r = httpx.post(
        f"{lm_server.url}/v1/completions",
        json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True},
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text(local, prompt, 8)
    assert chunks[-1]["choices"][0]["finish_reason"] in {"length", "stop"}

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a tuple?"}]
    want = expected_text(local, chat_prompt(local.tokenizer, messages), 6)
    r = httpx.post(
        f"{lm_server.url}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 6, "temperature": 0},
        timeout=30,
    )
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": want}
    r = httpx.post(
        f"{lm_server.url}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 6, "temperature": 0, "stream": True},
        timeout=30,
    )
    chunks = sse(r.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want


def test_long_prompt_within_context_is_served(lm_server: ServerProcess, local: Artifact) -> None:
    prompt = "the" + " the" * 64  # 259 characters, about 66 tokens
    assert len(prompt) > 256 and len(local.tokenizer(prompt)["input_ids"]) + 4 <= 128
    r = httpx.post(
        f"{lm_server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0}, timeout=30
    )
    assert r.status_code == 200, r.text
    r = httpx.post(f"{lm_server.url}/v1/completions", json={"prompt": "def " * 200, "max_tokens": 2}, timeout=30)
    assert "beyond the model's context of 128" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),  # server limit is 64
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "", "max_tokens": 2}, 400, "prompt"),
        ({"prompt": [], "max_tokens": 2}, 400, "prompt"),
        ({"prompt": ["ok", "  "], "max_tokens": 2}, 400, "prompt[1]"),
        ({"prompt": 5}, 400, "prompt"),
        ({"max_tokens": 2}, 400, "prompt"),
        ({"prompt": "def " * 200, "max_tokens": 2}, 400, "prompt"),  # beyond the 128-token context
        ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
        ({"prompt": "hi", "temperature": 3}, 400, "temperature"),
        ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "hi", "stop": [""]}, 400, "stop[0]"),
        ({"prompt": "hi", "seed": -1}, 400, "seed"),
        ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ],
)
def test_bad_completion_requests_name_the_field(
    lm_server: ServerProcess, body: dict[str, Any], status: int, param: str
) -> None:
    r = httpx.post(f"{lm_server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_json_wrong_endpoint_and_task(lm_server: ServerProcess) -> None:
    r = httpx.post(
        f"{lm_server.url}/v1/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    assert "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{lm_server.url}/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = httpx.post(f"{lm_server.url}/v1/classify", json={"texts": ["x"]})
    assert r.status_code == 404 and "causal-lm" in r.json()["error"]["message"]
    r = httpx.get(f"{lm_server.url}/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(
        f"{lm_server.url}/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"


def test_metrics_report_batches_tokens_and_errors(lm_server: ServerProcess) -> None:
    httpx.post(f"{lm_server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
    httpx.post(f"{lm_server.url}/v1/completions", json={"prompt": "x", "max_tokens": "2"})
    text = httpx.get(f"{lm_server.url}/metrics").text
    for name in (
        "kdistill_request_latency_seconds_bucket",
        "kdistill_batch_size_bucket",
        "kdistill_queue_depth",
        "kdistill_tokens_per_second",
        "kdistill_padding_efficiency_bucket",
        'kdistill_tokens_total{kind="generated"}',
    ):
        assert name in text, name
    assert 'kdistill_errors_total{endpoint="/v1/completions",status="400"}' in text
