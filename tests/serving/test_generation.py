"""Batched KV-cache generation against transformers' own generate(), on a tiny real GPT2."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kdistill.serving.generation import GenRequest, chat_prompt, generate_batch, held_back, sample_next
from tests.serving.helpers import build_tiny_tokenizer, tiny_gpt2

PROMPTS = ["The for statement is used", "x", "Objects are Python's abstraction for data. All data in"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    tok = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return tiny_gpt2(len(tok), seed=3), tok


def reference_greedy(model: Any, tok: Any, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def test_batched_greedy_equals_transformers_generate_per_prompt(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    reqs = [GenRequest(tok(p)["input_ids"], max_tokens=6, temperature=0.0) for p in PROMPTS]
    results = generate_batch(model, tok, reqs)  # different prompt lengths: left padding + KV cache
    for prompt, result in zip(PROMPTS, results, strict=True):
        expected = reference_greedy(model, tok, prompt, 6)
        eos = tok.eos_token_id
        expected = expected[: expected.index(eos)] if eos in expected else expected
        assert result.token_ids == expected
        assert result.prompt_tokens == len(tok(prompt)["input_ids"])


def test_finished_sequences_leave_the_batch_early(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    reqs = [
        GenRequest(tok(p)["input_ids"], max_tokens=n, temperature=0.0) for p, n in zip(PROMPTS, (1, 7, 3), strict=True)
    ]
    results = generate_batch(model, tok, reqs)
    solo = [generate_batch(model, tok, [GenRequest(r.prompt_ids, r.max_tokens, 0.0)])[0] for r in reqs]
    assert [r.token_ids for r in results] == [s.token_ids for s in solo]
    assert [r.completion_tokens for r in results] == [1, 7, 3]
    assert all(r.finish_reason == "length" for r in results)


def test_seeded_sampling_is_reproducible_and_seeds_differ(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    prompt = tok(PROMPTS[0])["input_ids"]

    def run(seed: int, batch_with: list[int] | None = None) -> list[int]:
        reqs = [GenRequest(prompt, 12, temperature=1.0, top_p=0.95, seed=seed)]
        if batch_with:
            reqs.append(GenRequest(batch_with, 4, temperature=1.0, seed=99))
        return generate_batch(model, tok, reqs)[0].token_ids

    assert run(7) == run(7) == run(7, batch_with=tok(PROMPTS[2])["input_ids"])
    assert len({tuple(run(s)) for s in range(5)}) > 1


def test_stop_strings_cut_the_text_and_stream_matches(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    prompt = tok(PROMPTS[2])["input_ids"]
    full = generate_batch(model, tok, [GenRequest(prompt, 12, 0.0)])[0]
    assert len(full.text) > 4
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    pieces: list[str] = []
    finishes: list[str | None] = []
    req = GenRequest(
        prompt, 12, 0.0, stop=[stop], on_text=lambda text, finish: (pieces.append(text), finishes.append(finish))
    )
    result = generate_batch(model, tok, [req])[0]
    assert result.text == full.text[: full.text.find(stop)]
    assert result.finish_reason == "stop"
    assert "".join(pieces) == result.text
    assert finishes[-1] == "stop" and finishes.count("stop") == 1


def test_cancelled_request_stops_early(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    req = GenRequest(tok(PROMPTS[0])["input_ids"], 50, 0.0)
    req.on_text = lambda text, finish: req.cancelled.set()
    result = generate_batch(model, tok, [req])[0]
    assert result.completion_tokens <= 2  # seen at the next token: the step that set it is already decoded


def test_sampling_helpers() -> None:
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 1.0, gen) == 1
    assert all(sample_next(logits, 1.0, 1e-6, gen) == 1 for _ in range(20))  # nucleus of one token
    assert {sample_next(logits, 1.0, 0.9, gen) for _ in range(200)} == {1, 3}
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["xyz"]) == 0


def test_chat_prompt_without_template_is_a_transcript(lm: tuple[Any, Any]) -> None:
    _, tok = lm
    text = chat_prompt(tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "system: be brief\nuser: hi\nassistant:"
