"""``/v1/completions`` with ``logprobs`` or ``echo``: teacher scoring and generation with log-probs.

- ``echo: true, max_tokens: 0, logprobs: K``: each prompt's tokens with their log-probs and top-K
  alternatives (a ``ScoreRequest`` through the batcher);
- ``logprobs: K`` with ``max_tokens >= 1``: the generated tokens' log-probs and top-K;
- ``Accept: application/vnd.kdistill.logprobs+safetensors``: the same rows as one binary frame
  (``logprobs_wire``).

Echo together with generation (``max_tokens >= 1``) and log-probs while streaming are refused
with a 400 naming the field rather than answered without what was asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import torch
from fastapi.responses import Response

from .engine import Engine
from .errors import ApiError
from .front import Front
from .generation import GenRequest, GenResult
from .logprobs_wire import BINARY_MEDIA_TYPE, TokenStrings, binary_frame, openai_logprobs
from .prompts import Prompt, encode_prompt, prompt_text
from .schemas import CompletionRequest
from .scoring import ScoreRequest, TokenLogprobs


def checked_k(front: Front, engine: Engine, body: CompletionRequest, binary: bool) -> int | None:
    """The request's top-K, within the server's limit for the answer's format and the vocabulary."""
    k = body.logprobs
    if k is None:
        if binary:
            raise ApiError(400, f"the {BINARY_MEDIA_TYPE} answer needs logprobs", "logprobs")
        return None
    limit = front.limits.max_logprobs_binary if binary else front.limits.max_logprobs
    if k > limit:
        form = "binary" if binary else "JSON"
        raise ApiError(400, f"logprobs {k} is over the limit of {limit} for a {form} answer", "logprobs")
    vocab = int(getattr(engine.model.config, "vocab_size", k) or k)
    if k > vocab:
        raise ApiError(400, f"logprobs {k} is over the vocabulary of {vocab} tokens", "logprobs")
    return k


def check_combination(body: CompletionRequest, binary: bool) -> None:
    if body.stream and (body.logprobs is not None or body.echo or binary):
        raise ApiError(400, "stream does not combine with logprobs, echo or a binary answer", "stream")
    if body.echo and body.max_tokens != 0:
        raise ApiError(400, "echo scores the prompt and needs max_tokens 0", "max_tokens")
    if not body.echo and body.max_tokens == 0:
        raise ApiError(400, "max_tokens must be >= 1 (0 only with echo: true, to score the prompt)", "max_tokens")


def text_offsets(engine: Engine, prompts: list[Prompt], rows: list[TokenLogprobs]) -> list[torch.Tensor] | None:
    """Each scored text's token spans (characters), from the tokenizer's offset mapping; None when
    a prompt was ids or the tokenizer gives no offsets that match the scored tokens."""
    if not all(isinstance(p, str) for p in prompts):
        return None
    spans = []
    for prompt, row in zip(prompts, rows, strict=True):
        try:
            enc = engine.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        except (NotImplementedError, ValueError):  # a slow tokenizer has no offset mapping
            return None
        if list(enc["input_ids"]) != list(row.token_ids):
            return None
        spans.append(torch.tensor(enc["offset_mapping"], dtype=torch.int32).reshape(-1, 2))
    return spans


async def score_prompts(
    front: Front, engine: Engine, prompts: list[Prompt], single: bool, k: int
) -> list[TokenLogprobs]:
    ids = [encode_prompt(front, engine, p, "prompt" if single else f"prompt[{i}]") for i, p in enumerate(prompts)]
    front.check_capacity(len(ids))
    return list(await asyncio.gather(*(front.submit(ScoreRequest(row, k), len(row)) for row in ids)))


async def completions_with_logprobs(
    front: Front,
    engine: Engine,
    body: CompletionRequest,
    prompts: list[Prompt],
    single: bool,
    binary: bool,
    head: dict[str, Any],
    generation_requests: Callable[[], list[GenRequest]],
) -> dict[str, Any] | Response:
    """The answer to a completions request that asks for echo or log-probs (module docstring)."""
    check_combination(body, binary)
    k = checked_k(front, engine, body, binary)
    rows: list[TokenLogprobs]
    texts: list[str]
    finish: list[str]
    starts: list[int]
    if body.echo:
        rows = await score_prompts(front, engine, prompts, single, k or 0)
        texts, finish, starts = [prompt_text(engine, p) for p in prompts], ["length"] * len(prompts), [0] * len(prompts)
        prompt_tokens, completion_tokens = sum(len(r.token_ids) for r in rows), 0
    else:
        reqs = generation_requests()
        for r in reqs:
            r.logprobs = k
        front.check_capacity(len(reqs))
        results: list[GenResult] = list(
            await asyncio.gather(*(front.submit(r, len(r.prompt_ids) + r.max_tokens) for r in reqs))
        )
        rows = [r.logprobs for r in results if r.logprobs is not None]
        texts, finish, starts = (
            [r.text for r in results],
            [r.finish_reason for r in results],
            [len(prompt_text(engine, p)) for p in prompts],
        )
        prompt_tokens = sum(r.prompt_tokens for r in results)
        completion_tokens = sum(r.completion_tokens for r in results)
    if binary:
        assert k is not None  # checked_k refuses a binary answer without logprobs
        offsets = text_offsets(engine, prompts, rows) if body.echo else None
        blob = binary_frame(rows, model=front.model_name, k=k, echo=body.echo, text_offsets=offsets)
        return Response(blob, media_type=BINARY_MEDIA_TYPE)
    strings = TokenStrings(engine.tokenizer)
    choices = [
        {
            "index": i,
            "text": texts[i],
            "finish_reason": finish[i],
            "logprobs": openai_logprobs(rows[i], strings, starts[i], ids_as_names=body.return_tokens_as_token_ids)
            if k is not None
            else None,
        }
        for i in range(len(texts))
    ]
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return {**head, "choices": choices, "usage": usage}
