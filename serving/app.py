"""The HTTP API: OpenAI-compatible completions/chat for causal LMs, KServe Open Inference Protocol v2
and ``/v1/classify`` for classifiers, health, and Prometheus metrics.

Every error is JSON and names the offending field (``prompt[1]``, ``max_tokens``,
``inputs[0].datatype``, ``body``...), in the shape of the protocol the path belongs to:

- OpenAI paths (``/v1/...``): ``{"error": {"message", "type", "param", "code"}}``;
- KServe Open Inference Protocol paths (``/v2/...``): ``{"error": "<param>: <message>"}``, the
  protocol's error object (a single string), so KServe/Triton clients parse it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import DynamicBatcher, QueueFull, ShuttingDown
from .engine import Engine
from .errors import ApiError, error_response
from .generation import FinishReason, GenRequest, GenResult, chat_prompt
from .metrics import ServerMetrics
from .observe import ObserveMiddleware
from .schemas import MAX_STOP, MAX_TEXT_CHARS, ChatRequest, ClassifyRequest, CompletionRequest, InferRequest, stop_list


def _answer_early(fut: concurrent.futures.Future) -> Callable[[GenResult], None]:
    """``GenRequest.on_done`` for ``fut``: a sequence that finishes before the rest of its batch is
    answered at once. Runs on the worker thread; a future the client already cancelled is left alone
    (raising there would fail the whole batch)."""

    def done(result: GenResult) -> None:
        try:
            if not fut.done():
                fut.set_result(result)
        except concurrent.futures.InvalidStateError:  # cancelled between the check and the set
            pass

    return done


@dataclass
class ServeLimits:
    max_tokens: int = 512  # per request, generated tokens
    max_items: int = 64  # texts per classify/infer request
    max_prompts: int = 16  # prompts per completions request
    max_body_bytes: int = 1 << 20


@dataclass
class ServerState:
    model_name: str
    limits: ServeLimits
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    engine: Engine | None = None
    batcher: DynamicBatcher | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    started: float = field(default_factory=time.time)


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p != "body"]
    # Union members show up as type names in the location (prompt.str / prompt.list[str]): drop them.
    parts = [p for p in parts if not (isinstance(p, str) and ("[" in p or p in {"str", "int", "float", "bool"}))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="kdistill serving", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = state.metrics
    app.add_middleware(ObserveMiddleware, metrics=metrics, max_body_bytes=state.limits.max_body_bytes)

    # ---- errors ---------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.headers, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        path = request.url.path
        if first.get("type") == "json_invalid":
            return error_response(
                400,
                f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                "body",
                "invalid_request_error",
                path=path,
            )
        param = _loc_to_param(tuple(first.get("loc", ())))
        return error_response(400, f"{param}: {first['msg']}", param, "invalid_request_error", path=path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        param = "path" if exc.status_code == 404 else "method" if exc.status_code == 405 else None
        return error_response(
            exc.status_code,
            str(exc.detail),
            param,
            "not_found_error" if exc.status_code == 404 else "invalid_request_error",
            path=request.url.path,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(
            500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error", path=request.url.path
        )

    # ---- helpers --------------------------------------------------------------------------------
    def engine_for(task: str, param: str) -> Engine:
        if state.draining:
            raise ApiError(503, "the server is shutting down", None, kind="unavailable", headers={"Retry-After": "5"})
        if not state.ready or state.engine is None:
            raise ApiError(
                503,
                "the model is still loading" if state.load_error is None else state.load_error,
                None,
                kind="unavailable",
                headers={"Retry-After": "2"},
            )
        if state.engine.task != task:
            raise ApiError(
                404,
                f"model {state.model_name!r} is a {state.engine.task} model; this endpoint serves {task}",
                param,
                kind="not_found_error",
            )
        return state.engine

    def check_model(name: str | None, param: str = "model") -> None:
        if name not in (None, "", state.model_name):
            raise ApiError(
                404, f"unknown model {name!r}; this server serves {state.model_name!r}", param, kind="not_found_error"
            )

    def check_capacity(n: int) -> None:
        assert state.batcher is not None
        if state.batcher.depth + n > state.batcher.policy.max_queue:
            metrics.rejected.inc()
            raise ApiError(
                429,
                f"server overloaded: {state.batcher.depth} requests queued",
                None,
                kind="overloaded",
                headers={"Retry-After": str(round(state.batcher.retry_after()))},
            )

    def submit(payload: Any, length: int) -> asyncio.Future:
        assert state.batcher is not None
        early: concurrent.futures.Future = concurrent.futures.Future()
        if isinstance(payload, GenRequest) and payload.on_text is None:
            payload.on_done = _answer_early(early)
        try:
            fut = state.batcher.submit(payload, length, early)
        except QueueFull as exc:
            metrics.rejected.inc()
            raise ApiError(
                429, str(exc), None, kind="overloaded", headers={"Retry-After": str(round(exc.retry_after))}
            ) from None
        except ShuttingDown as exc:
            raise ApiError(503, str(exc), None, kind="unavailable", headers={"Retry-After": "5"}) from None
        metrics.queue_depth.set(state.batcher.depth)
        return asyncio.wrap_future(fut)

    def encode_text(engine: Engine, text: Any, param: str, reserve: int = 0) -> list[int]:
        if not isinstance(text, str):
            raise ApiError(400, f"{param} must be a string", param)
        if not text.strip():
            raise ApiError(400, f"{param} must not be empty", param)
        if len(text) > MAX_TEXT_CHARS:
            raise ApiError(400, f"{param} is over {MAX_TEXT_CHARS} characters", param)
        ids = engine.encode(text)
        if not ids:
            raise ApiError(400, f"{param} has no tokens", param)
        if len(ids) + reserve > engine.max_context:
            extra = f" plus max_tokens {reserve}" if reserve else ""
            raise ApiError(
                400, f"{param} is {len(ids)} tokens{extra}, beyond the model's context of {engine.max_context}", param
            )
        return ids

    def generation_requests(
        engine: Engine, prompts: list[str], param: str, body: CompletionRequest | ChatRequest, single: bool
    ) -> list[GenRequest]:
        if body.max_tokens > state.limits.max_tokens:
            raise ApiError(
                400, f"max_tokens {body.max_tokens} is over the limit of {state.limits.max_tokens}", "max_tokens"
            )
        stops = stop_list(body.stop)
        if len(stops) > MAX_STOP:
            raise ApiError(400, f"stop takes at most {MAX_STOP} strings", "stop")
        for i, s in enumerate(stops):
            if not s:
                raise ApiError(
                    400, "stop strings must not be empty", f"stop[{i}]" if isinstance(body.stop, list) else "stop"
                )
        reqs = []
        for i, text in enumerate(prompts):
            ids = encode_text(engine, text, param if single else f"{param}[{i}]", reserve=body.max_tokens)
            reqs.append(GenRequest(ids, body.max_tokens, body.temperature, body.top_p, stops, body.seed))
        return reqs

    def usage(results: list[GenResult]) -> dict[str, int]:
        p = sum(r.prompt_tokens for r in results)
        c = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def stream(
        reqs: list[GenRequest],
        chunk: Callable[[int, str, FinishReason | None], dict[str, Any]],
        first: Callable[[int], dict[str, Any]] | None = None,
    ) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, str | None, str | None]] = asyncio.Queue()

        def forward(i: int) -> Callable[[str, FinishReason | None], None]:
            return lambda text, finish: loop.call_soon_threadsafe(events.put_nowait, (i, text, finish))

        for i, r in enumerate(reqs):
            r.on_text = forward(i)
        check_capacity(len(reqs))
        futures = [submit(r, len(r.prompt_ids) + r.max_tokens) for r in reqs]
        for i, f in enumerate(futures):
            f.add_done_callback(
                lambda f, i=i: events.put_nowait((i, None, "error")) if f.cancelled() or f.exception() else None
            )

        async def body() -> AsyncIterator[bytes]:
            pending = len(reqs)
            try:
                if first is not None:
                    for i in range(len(reqs)):
                        yield f"data: {json.dumps(first(i))}\n\n".encode()
                while pending:
                    i, text, finish = await events.get()
                    if finish == "error":
                        err = {"error": {"message": "generation failed", "type": "server_error", "code": 500}}
                        yield f"data: {json.dumps(err)}\n\n".encode()
                        return
                    if text:
                        yield f"data: {json.dumps(chunk(i, text, None))}\n\n".encode()
                    if finish:
                        pending -= 1
                        yield f"data: {json.dumps(chunk(i, '', finish))}\n\n".encode()  # type: ignore[arg-type]
                yield b"data: [DONE]\n\n"
            finally:
                for r in reqs:  # a client that went away frees its batch rows
                    r.cancelled.set()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- health, metrics, models ----------------------------------------------------------------
    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = state.ready and not state.draining
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if state.batcher is not None:
            metrics.queue_depth.set(state.batcher.depth)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "kdistill"}
            ],
        }

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "kdistill", "version": "2", "extensions": []}

    def check_v2_name(name: str) -> None:
        if name != state.model_name:
            raise ApiError(
                404, f"unknown model {name!r}; this server serves {state.model_name!r}", "name", kind="not_found_error"
            )

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str) -> dict[str, Any]:
        check_v2_name(name)
        engine = engine_for("sequence-classification", "name")
        return {
            "name": name,
            "platform": "kdistill",
            "versions": ["1"],
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(engine.labels)]},
            ],
        }

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> JSONResponse:
        check_v2_name(name)
        ok = state.ready and not state.draining
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    # ---- causal LM --------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        engine = engine_for("causal-lm", "model")
        check_model(body.model)
        single = isinstance(body.prompt, str)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt must not be an empty list", "prompt")
        if len(prompts) > state.limits.max_prompts:
            raise ApiError(400, f"prompt takes at most {state.limits.max_prompts} prompts", "prompt")
        reqs = generation_requests(engine, prompts, "prompt", body, single)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(i: int, text: str, finish: FinishReason | None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": state.model_name,
                "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}],
            }

        if body.stream:
            return stream(reqs, chunk)
        check_capacity(len(reqs))
        results: list[GenResult] = await asyncio.gather(*(submit(r, len(r.prompt_ids) + r.max_tokens) for r in reqs))
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": state.model_name,
            "choices": [
                {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                for i, r in enumerate(results)
            ],
            "usage": usage(results),
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        engine = engine_for("causal-lm", "model")
        check_model(body.model)
        prompt = chat_prompt(engine.tokenizer, [m.model_dump() for m in body.messages])
        reqs = generation_requests(engine, [prompt], "messages", body, single=True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(i: int, text: str, finish: FinishReason | None) -> dict[str, Any]:
            delta = {"content": text} if text else {}
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": state.model_name,
                "choices": [{"index": i, "delta": delta, "finish_reason": finish}],
            }

        def first(i: int) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": state.model_name,
                "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            }

        if body.stream:
            return stream(reqs, chunk, first)
        check_capacity(1)
        result: GenResult = await submit(reqs[0], len(reqs[0].prompt_ids) + reqs[0].max_tokens)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": state.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage([result]),
        }

    # ---- classification ---------------------------------------------------------------------------
    async def classify_texts(engine: Engine, texts: list[Any], param: str) -> list[list[float]]:
        if not texts:
            raise ApiError(400, f"{param} must not be empty", param)
        if len(texts) > state.limits.max_items:
            raise ApiError(400, f"{param} takes at most {state.limits.max_items} texts", param)
        encoded = [encode_text(engine, t, f"{param}[{i}]") for i, t in enumerate(texts)]
        check_capacity(len(encoded))
        return list(await asyncio.gather(*(submit(ids, len(ids)) for ids in encoded)))

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        engine = engine_for("sequence-classification", "model")
        check_model(body.model)
        probs = await classify_texts(engine, body.texts, "texts")
        results = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            results.append(
                {"label": engine.labels[best], "score": row[best], "scores": dict(zip(engine.labels, row, strict=True))}
            )
        return {"model": state.model_name, "results": results}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: InferRequest) -> dict[str, Any]:
        check_v2_name(name)
        engine = engine_for("sequence-classification", "name")
        tensor = body.inputs[0]
        if tensor.datatype != "BYTES":
            raise ApiError(400, f"datatype must be BYTES (texts), got {tensor.datatype!r}", "inputs[0].datatype")
        count = 1
        for d in tensor.shape:
            if d < 0:
                raise ApiError(400, "shape must not hold negative sizes", "inputs[0].shape")
            count *= d
        if (
            count != len(tensor.data)
            or len(tensor.shape) not in (1, 2)
            or (len(tensor.shape) == 2 and tensor.shape[1] != 1)
        ):
            raise ApiError(
                400,
                f"shape {tensor.shape} does not fit {len(tensor.data)} texts (use [N] or [N, 1])",
                "inputs[0].shape",
            )
        probs = await classify_texts(engine, tensor.data, "inputs[0].data")
        labels = [engine.labels[max(range(len(r)), key=r.__getitem__)] for r in probs]
        out: dict[str, Any] = {
            "model_name": name,
            "model_version": "1",
            "outputs": [
                {"name": "label", "shape": [len(labels)], "datatype": "BYTES", "data": labels},
                {
                    "name": "probabilities",
                    "shape": [len(probs), len(engine.labels)],
                    "datatype": "FP32",
                    "data": [p for row in probs for p in row],
                },
            ],
        }
        if body.id is not None:
            out["id"] = body.id
        return out

    return app
