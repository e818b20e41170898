"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` (both with ``stream: true`` as
server-sent events) and ``/v1/models``, for causal-LM models."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..cascade import ANSWERED_BY_HEADER, answered_by, result_confidence, teacher_params
from ..engine import Engine
from ..errors import ApiError
from ..front import Front
from ..generation import FinishReason, GenRequest, GenResult, chat_prompt
from ..logprobs_api import completions_with_logprobs
from ..logprobs_wire import wants_binary
from ..prompts import Prompt, encode_prompt, split_prompts
from ..schemas import MAX_STOP, ChatRequest, CompletionRequest, SamplingParams, stop_list

Chunk = Callable[[int, str, FinishReason | None], dict[str, Any]]


def generation_requests(
    front: Front, engine: Engine, prompts: list[Prompt], param: str, params: SamplingParams, single: bool
) -> list[GenRequest]:
    """One ``GenRequest`` per prompt, after checking the sampling parameters against the server's
    limits (``param`` names the prompt field; ``single``: a lone string, not a list)."""
    limit = front.limits.max_tokens
    if params.max_tokens > limit:
        raise ApiError(400, f"max_tokens {params.max_tokens} is over the limit of {limit}", "max_tokens")
    stops = stop_list(params.stop)
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop takes at most {MAX_STOP} strings", "stop")
    for i, s in enumerate(stops):
        if not s:
            raise ApiError(
                400, "stop strings must not be empty", f"stop[{i}]" if isinstance(params.stop, list) else "stop"
            )
    reqs = []
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(front, engine, prompt, param if single else f"{param}[{i}]", reserve=params.max_tokens)
        reqs.append(GenRequest(ids, params.max_tokens, params.temperature, params.top_p, stops, params.seed))
    return reqs


def usage(results: list[GenResult]) -> dict[str, int]:
    p = sum(r.prompt_tokens for r in results)
    c = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def stream(
    front: Front, reqs: list[GenRequest], chunk: Chunk, first: Callable[[int], dict[str, Any]] | None = None
) -> StreamingResponse:
    """Server-sent events: text pieces as the worker thread decodes them, a final chunk with each
    sequence's finish reason, then ``[DONE]``. A client that goes away cancels its sequences."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, str | None, str | None]] = asyncio.Queue()

    def forward(i: int) -> Callable[[str, FinishReason | None], None]:
        def put(text: str, finish: FinishReason | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (i, text, finish))

        return put

    for i, r in enumerate(reqs):
        r.on_text = forward(i)
    front.check_capacity(len(reqs))
    futures = [front.submit(r, len(r.prompt_ids) + r.max_tokens) for r in reqs]

    def on_failure(i: int) -> Callable[[asyncio.Future[Any]], None]:
        def check(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception():
                events.put_nowait((i, None, "error"))

        return check

    for i, f in enumerate(futures):
        f.add_done_callback(on_failure(i))

    async def body() -> AsyncIterator[bytes]:
        pending = len(reqs)
        try:
            if first is not None:
                for i in range(len(reqs)):
                    yield _sse(first(i))
            while pending:
                i, text, finish = await events.get()
                if finish == "error":
                    yield _sse({"error": {"message": "generation failed", "type": "server_error", "code": 500}})
                    return
                if text:
                    yield _sse(chunk(i, text, None))
                if finish:
                    pending -= 1
                    yield _sse(chunk(i, "", finish))  # type: ignore[arg-type]  # "stop" | "length" here
            yield b"data: [DONE]\n\n"
        finally:
            for r in reqs:  # a client that went away frees its batch rows
                r.cancelled.set()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def run_all(front: Front, reqs: list[GenRequest]) -> list[GenResult]:
    """Every request generated (each answered as soon as it finishes), in order."""
    front.check_capacity(len(reqs))
    return list(await asyncio.gather(*(front.submit(r, len(r.prompt_ids) + r.max_tokens) for r in reqs)))


def router(front: Front) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [front.model_card()]}

    @api.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request, response: Response) -> dict[str, Any] | Response:
        started = time.perf_counter()
        engine = front.engine_for("causal-lm", "model")
        front.check_model(body.model)
        prompts, single = split_prompts(body.prompt)
        if not prompts:
            raise ApiError(400, "prompt must not be an empty list", "prompt")
        if len(prompts) > front.limits.max_prompts:
            raise ApiError(400, f"prompt takes at most {front.limits.max_prompts} prompts", "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def head() -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": front.model_name}

        binary = wants_binary(request.headers.get("accept"))
        if body.echo or body.logprobs is not None or binary or body.max_tokens == 0:  # scoring, or log-probs
            return await completions_with_logprobs(
                front,
                engine,
                body,
                prompts,
                single,
                binary,
                head(),
                lambda: generation_requests(front, engine, prompts, "prompt", body, single),
            )
        reqs = generation_requests(front, engine, prompts, "prompt", body, single)

        def chunk(i: int, text: str, finish: FinishReason | None) -> dict[str, Any]:
            return {**head(), "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}]}

        if body.stream:
            return stream(front, reqs, chunk)
        cascade = front.cascade_for(request.headers)
        if cascade is not None:
            for r in reqs:
                r.logprobs = 0  # the generated tokens' own log-probs: the student's confidence
        results = await run_all(front, reqs)
        choices = [
            {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
            for i, r in enumerate(results)
        ]
        out = {**head(), "choices": choices, "usage": usage(results)}
        if cascade is not None:  # the teacher completes the prompts the student is unsure of
            verdicts = await cascade.complete(
                "/v1/completions",
                prompts,
                single,
                teacher_params(body),
                choices,
                [result_confidence(r) for r in results],
                [r.completion_tokens for r in results],
                out["usage"],
                started,
            )
            response.headers[ANSWERED_BY_HEADER] = answered_by(verdicts)
        return out

    @api.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request, response: Response) -> dict[str, Any] | StreamingResponse:
        started = time.perf_counter()
        engine = front.engine_for("causal-lm", "model")
        front.check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        prompt = chat_prompt(engine.tokenizer, messages)
        reqs = generation_requests(front, engine, [prompt], "messages", body, single=True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def head(kind: str) -> dict[str, Any]:
            return {"id": rid, "object": kind, "created": created, "model": front.model_name}

        def chunk(i: int, text: str, finish: FinishReason | None) -> dict[str, Any]:
            delta = {"content": text} if text else {}
            return {**head("chat.completion.chunk"), "choices": [{"index": i, "delta": delta, "finish_reason": finish}]}

        def first(i: int) -> dict[str, Any]:
            delta = {"role": "assistant", "content": ""}
            return {**head("chat.completion.chunk"), "choices": [{"index": i, "delta": delta, "finish_reason": None}]}

        if body.stream:
            return stream(front, reqs, chunk, first)
        cascade = front.cascade_for(request.headers)
        if cascade is not None:
            reqs[0].logprobs = 0
        (result,) = await run_all(front, reqs)
        message = {"role": "assistant", "content": result.text}
        choices = [{"index": 0, "message": message, "finish_reason": result.finish_reason}]
        out = {**head("chat.completion"), "choices": choices, "usage": usage([result])}
        if cascade is not None:
            verdicts = await cascade.chat(
                "/v1/chat/completions",
                messages,
                teacher_params(body),
                choices[0],
                result_confidence(result),
                result.completion_tokens,
                out["usage"],
                started,
            )
            response.headers[ANSWERED_BY_HEADER] = answered_by(verdicts)
        return out

    return api
