"""Generation decodes the batch together, finished sequences leave it early and are answered at once,
and the server reports its decode batch (``kdistill_decode_rows`` / ``kdistill_decode_steps``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from kdistill.serving.front import answer_early
from kdistill.serving.generation import DecodeStats, GenRequest, GenResult, generate_batch
from kdistill.trainer.artifact import Artifact
from tests.serving.helpers import build_tiny_tokenizer, load_served, make_artifact, running_server, tiny_gpt2

PROMPTS = [
    "The for statement is used",
    "x",
    "Objects are Python's abstraction for data. All data in",
    "with open(p) as f:",
]


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

    reqs = [
        GenRequest(tok(p)["input_ids"], max_tokens=n, temperature=0.0)
        for p, n in zip(PROMPTS, (2, 12, 5, 1), strict=True)
    ]
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
    answer_early(fut)(result)
    assert fut.result(timeout=0) is result
    answer_early(fut)(GenResult("b", [6], "length", 3))  # a second answer is ignored
    assert fut.result(timeout=0) is result
    cancelled: concurrent.futures.Future = concurrent.futures.Future()
    cancelled.cancel()
    answer_early(cancelled)(result)  # must not raise on the worker thread
    assert cancelled.cancelled()


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def settled(url: str, name: str, at_least: float, timeout: float = 60.0) -> float:
    """``name`` once it reaches ``at_least``: answers go out as sequences finish, and the worker
    records the batch's metrics just after, so a client can read /metrics a moment too early."""
    deadline = time.monotonic() + timeout
    while (value := metric(url, name)) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def fp32_lm_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # FP32: fbgemm's per-tensor activation scale couples a row's logits to its batch, which could
    # flip a greedy near-tie between the batched answer and the solo reference.
    return make_artifact(tmp_path_factory.mktemp("decode-batching"), "causal-lm", "none")


def test_server_decodes_concurrent_completions_as_one_batch(fp32_lm_artifact: Path) -> None:
    lm_artifact = fp32_lm_artifact
    local: Artifact = load_served(lm_artifact)
    max_tokens = (1, 4, 9, 20)
    # A long window and a batch of exactly 4: the four concurrent requests form one batch.
    with running_server(lm_artifact, "--max-batch-size", "4", "--max-wait-ms", "5000") as server:
        names = (
            "kdistill_decode_steps_total",
            "kdistill_decode_rows_total",
            "kdistill_batch_size_count",
            "kdistill_batch_size_sum",
        )
        before = {n: metric(server.url, n) for n in names}

        async def post_all() -> list[dict[str, Any]]:
            async with httpx.AsyncClient(timeout=300) as client:
                answers = await asyncio.gather(
                    *(
                        client.post(
                            f"{server.url}/v1/completions", json={"prompt": p, "max_tokens": n, "temperature": 0}
                        )
                        for p, n in zip(PROMPTS, max_tokens, strict=True)
                    )
                )
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            return [a.json() for a in answers]

        bodies = asyncio.run(post_all())
        settled(server.url, "kdistill_batch_size_count", before["kdistill_batch_size_count"] + 1)
        delta = {n: metric(server.url, n) - before[n] for n in names}
    solo = [
        generate_batch(local.model, local.tokenizer, [GenRequest(local.tokenizer(p)["input_ids"], n, 0.0)])[0]
        for p, n in zip(PROMPTS, max_tokens, strict=True)
    ]
    assert [b["choices"][0]["text"] for b in bodies] == [s.text for s in solo]
    assert delta["kdistill_batch_size_count"] == 1 and delta["kdistill_batch_size_sum"] == 4
    assert delta["kdistill_decode_steps_total"] == max(decoded_rows(s) for s in solo)
    assert delta["kdistill_decode_rows_total"] == sum(decoded_rows(s) for s in solo)


# ---- continuous batching ---------------------------------------------------------------------------
def test_admitted_requests_join_the_running_decode_and_match_solo_generation(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    first = [
        GenRequest(tok(p)["input_ids"], max_tokens=n, temperature=0.0)
        for p, n in zip(PROMPTS[:2], (3, 16), strict=True)
    ]
    # Waiting requests, offered at given decode steps: a prompt longer than the running cache (the
    # batch is padded to it), shorter ones, one that finishes on its prefill token, and one offered
    # after the short first request left (its columns are cut).
    offered = {
        1: [GenRequest(tok(PROMPTS[2])["input_ids"], 6, 0.0)],
        4: [GenRequest(tok(PROMPTS[3])["input_ids"], 1, 0.0), GenRequest(tok(PROMPTS[1])["input_ids"], 5, 0.0)],
        9: [GenRequest(tok(PROMPTS[0] + " again")["input_ids"], 4, 0.0)],
    }
    joined = [r for step in sorted(offered) for r in offered[step]]
    waiting = {step: list(reqs) for step, reqs in offered.items()}
    stats = DecodeStats()
    offers: list[tuple[int, int, int]] = []

    def admit(free: int, budgeted: int) -> list[GenRequest]:
        offers.append((stats.steps, free, budgeted))
        return waiting.pop(stats.steps, [])[:free]

    results = generate_batch(model, tok, first, stats, admit, max_rows=4)
    assert not waiting  # every offer was taken
    assert len(results) == len(first) + len(joined)
    solo = [generate_batch(model, tok, [GenRequest(r.prompt_ids, r.max_tokens, 0.0)])[0] for r in first + joined]
    assert [r.token_ids for r in results] == [s.token_ids for s in solo]
    assert [r.prompt_tokens for r in results] == [s.prompt_tokens for s in solo]
    assert all(free >= 1 and free <= 4 for _, free, _ in offers)
    assert offers[0][2] == sum(len(r.prompt_ids) + r.max_tokens for r in first)  # the budget in use
    # The long first request kept decoding while the others came and went: one batch, one step count.
    assert stats.steps == decoded_rows(results[1])
    assert stats.rows == sum(decoded_rows(r) for r in results)


def test_no_admission_beyond_max_rows_or_without_a_callback(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    reqs = [GenRequest(tok(p)["input_ids"], max_tokens=4, temperature=0.0) for p in PROMPTS[:2]]
    calls: list[int] = []
    generate_batch(model, tok, reqs, admit=lambda free, used: calls.append(free) or [], max_rows=2)
    assert calls == []  # the batch was full the whole time
    generate_batch(model, tok, reqs[:1], admit=lambda free, used: calls.append(free) or [], max_rows=3)
    assert calls and set(calls) == {2}


def test_batcher_admit_hands_waiting_requests_to_the_running_batch() -> None:
    from kdistill.serving.batcher import BatchPolicy, DynamicBatcher

    started, release = threading.Event(), threading.Event()
    seen: list[list[int]] = []
    batcher: DynamicBatcher[int, int]

    def run(payloads: list[int]) -> list[int]:
        started.set()
        assert release.wait(60)
        joined = batcher.admit(10, token_budget=25)  # lengths 10, 10, 10: two fit the budget
        seen.append(payloads + joined)
        return [p * 2 for p in payloads + joined]

    batcher = DynamicBatcher(run, BatchPolicy(max_batch_size=4, max_wait_ms=0))
    batcher.start()
    try:
        first = batcher.submit(1, 10)
        assert started.wait(60)
        later = [batcher.submit(v, 10) for v in (2, 3, 4)]
        assert batcher.admit(5, 100) == []  # only the worker thread may admit
        release.set()
        assert first.result(60) == 2
        assert [f.result(60) for f in later] == [4, 6, 8]
        assert seen[0] == [1, 2, 3]  # the third waiting request did not fit and formed the next batch
        assert seen[1] == [4]
    finally:
        batcher.stop()


def test_server_answers_many_concurrent_completions_with_continuous_batching(fp32_lm_artifact: Path) -> None:
    local: Artifact = load_served(fp32_lm_artifact)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(12)]
    max_tokens = [1 + (7 * i) % 20 for i in range(12)]
    with running_server(fp32_lm_artifact, "--max-batch-size", "4", "--max-wait-ms", "0") as server:
        before = metric(server.url, "kdistill_batch_size_sum")

        async def post_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=300) as client:
                return list(
                    await asyncio.gather(
                        *(
                            client.post(
                                f"{server.url}/v1/completions", json={"prompt": p, "max_tokens": n, "temperature": 0}
                            )
                            for p, n in zip(prompts, max_tokens, strict=True)
                        )
                    )
                )

        answers = asyncio.run(post_all())
        counted = settled(server.url, "kdistill_batch_size_sum", before + 12) - before
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    solo = [
        generate_batch(local.model, local.tokenizer, [GenRequest(local.tokenizer(p)["input_ids"], n, 0.0)])[0]
        for p, n in zip(prompts, max_tokens, strict=True)
    ]
    assert [a.json()["choices"][0]["text"] for a in answers] == [s.text for s in solo]
    assert counted == 12  # admitted requests are counted in the batch they joined
