"""Generation decodes the batch together, finished sequences leave it early and are answered at once,
and the server reports its decode batch (``kdistill_decode_rows`` / ``kdistill_decode_steps``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Any

import httpx
import pytest

from kdistill.serving.app import _answer_early
from kdistill.serving.generation import DecodeStats, GenRequest, GenResult, generate_batch
from kdistill.trainer.artifact import Artifact, load_artifact
from tests.serving.helpers import build_tiny_tokenizer, make_artifact, running_server, tiny_gpt2

PROMPTS = ["The for statement is used", "x", "Objects are Python's abstraction for data. All data in",
           "with open(p) as f:"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    tok = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return tiny_gpt2(len(tok), seed=3), tok


def decoded_rows(result: GenResult) -> int:
    """Decode steps a sequence took part in: its first token comes from the prefill; a sequence that
    ended on eos also decoded the step that sampled the eos."""
    return result.completion_tokens - (1 if result.finish_reason == "length" else 0)


def test_short_sequences_are_answered_while_the_batch_still_decodes(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    stats = DecodeStats()
    answered: list[tuple[int, int]] = []  # (request index, decode steps run when it was answered)

    def on_done(i: int) -> Any:
        return lambda result: answered.append((i, stats.steps))

    reqs = [GenRequest(tok(p)["input_ids"], max_tokens=n, temperature=0.0) for p, n in zip(PROMPTS, (2, 12, 5, 1),
                                                                                         strict=True)]
    for i, r in enumerate(reqs):
        r.on_done = on_done(i)
    results = generate_batch(model, tok, reqs, stats)
    solo = [generate_batch(model, tok, [GenRequest(r.prompt_ids, r.max_tokens, 0.0)])[0] for r in reqs]
    assert [r.token_ids for r in results] == [s.token_ids for s in solo]
    assert [r.text for r in results] == [s.text for s in solo]  # text decoded once at the end, same text
    assert sorted(i for i, _ in answered) == [0, 1, 2, 3]  # every request answered exactly once
    when = dict(answered)
    longest = max(range(len(results)), key=lambda i: decoded_rows(results[i]))
    # Each sequence was answered after exactly the decode steps it needed, not when the batch ended.
    assert when == {i: decoded_rows(r) for i, r in enumerate(results)}
    assert any(when[i] < when[longest] for i in when if i != longest)
    assert stats.steps == decoded_rows(results[longest])
    assert stats.rows == sum(decoded_rows(r) for r in results)


def test_streaming_and_stop_strings_keep_incremental_text(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    prompt = tok(PROMPTS[0])["input_ids"]
    full = generate_batch(model, tok, [GenRequest(prompt, 10, 0.0)])[0]
    pieces: list[str] = []
    streamed = GenRequest(prompt, 10, 0.0, on_text=lambda text, finish: pieces.append(text))
    assert generate_batch(model, tok, [streamed])[0].text == full.text
    assert "".join(pieces) == full.text and len([p for p in pieces if p]) > 1


def test_answer_early_leaves_a_cancelled_future_alone() -> None:
    result = GenResult("a", [5], "length", 3)
    fut: concurrent.futures.Future = concurrent.futures.Future()
    _answer_early(fut)(result)
    assert fut.result(timeout=0) is result
    _answer_early(fut)(GenResult("b", [6], "length", 3))  # a second answer is ignored
    assert fut.result(timeout=0) is result
    cancelled: concurrent.futures.Future = concurrent.futures.Future()
    cancelled.cancel()
    _answer_early(cancelled)(result)  # must not raise on the worker thread
    assert cancelled.cancelled()


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def fp32_lm_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # FP32: fbgemm's per-tensor activation scale couples a row's logits to its batch, which could
    # flip a greedy near-tie between the batched answer and the solo reference.
    return make_artifact(tmp_path_factory.mktemp("decode-batching"), "causal-lm", "none")


def test_server_decodes_concurrent_completions_as_one_batch(fp32_lm_artifact: Path) -> None:
    lm_artifact = fp32_lm_artifact
    local: Artifact = load_artifact(lm_artifact)
    max_tokens = (1, 4, 9, 20)
    # A long window and a batch of exactly 4: the four concurrent requests form one batch.
    with running_server(lm_artifact, "--max-batch-size", "4", "--max-wait-ms", "5000") as server:
        names = ("kdistill_decode_steps_total", "kdistill_decode_rows_total", "kdistill_batch_size_count",
                 "kdistill_batch_size_sum")
        before = {n: metric(server.url, n) for n in names}

        async def post_all() -> list[dict[str, Any]]:
            async with httpx.AsyncClient(timeout=300) as client:
                answers = await asyncio.gather(*(
                    client.post(f"{server.url}/v1/completions",
                                json={"prompt": p, "max_tokens": n, "temperature": 0})
                    for p, n in zip(PROMPTS, max_tokens, strict=True)))
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            return [a.json() for a in answers]

        bodies = asyncio.run(post_all())
        delta = {n: metric(server.url, n) - before[n] for n in names}
    solo = [generate_batch(local.model, local.tokenizer,
                           [GenRequest(local.tokenizer(p)["input_ids"], n, 0.0)])[0]
            for p, n in zip(PROMPTS, max_tokens, strict=True)]
    assert [b["choices"][0]["text"] for b in bodies] == [s.text for s in solo]
    assert delta["kdistill_batch_size_count"] == 1 and delta["kdistill_batch_size_sum"] == 4
    assert delta["kdistill_decode_steps_total"] == max(decoded_rows(s) for s in solo)
    assert delta["kdistill_decode_rows_total"] == sum(decoded_rows(s) for s in solo)
