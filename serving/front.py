"""The front every protocol router shares: is there a model to answer (capacity, readiness, task),
encoding a text within the model's limits, and handing work to the batcher.

Routers translate a protocol's request into engine work and the results back into that protocol's
answer; everything between the two that does not depend on the protocol lives here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Mapping
from typing import Any

from .batcher import DynamicBatcher, QueueFull, ShuttingDown
from .cascade import HOP_HEADER, Cascade
from .engine import Engine
from .errors import ApiError
from .generation import GenRequest
from .schemas import MAX_TEXT_CHARS
from .scoring import ScoreRequest
from .state import ServeLimits, ServerState


def answer_early(fut: concurrent.futures.Future[Any]) -> Callable[[Any], None]:
    """``GenRequest.on_done`` for ``fut``: a sequence that finishes before the rest of its batch is
    answered at once. Runs on the worker thread; a future the client already cancelled is left alone
    (raising there would fail the whole batch)."""

    def done(result: Any) -> None:
        try:
            if not fut.done():
                fut.set_result(result)
        except concurrent.futures.InvalidStateError:  # cancelled between the check and the set
            pass

    return done


class Front:
    """Capacity, submission and encoding over one server's state."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def model_name(self) -> str:
        return self.state.model_name

    @property
    def limits(self) -> ServeLimits:
        return self.state.limits

    @property
    def serving(self) -> bool:
        """Ready, and not shutting down."""
        return self.state.ready and not self.state.draining

    def cascade_for(self, headers: Mapping[str, str]) -> Cascade | None:
        """The fallback teacher for a request, unless there is none or the request was itself
        forwarded by a cascade (``HOP_HEADER``): that one this server's model answers."""
        cascade = self.state.cascade
        if cascade is None or headers.get(HOP_HEADER) is not None:
            return None
        return cascade

    def model_info(self) -> dict[str, Any]:
        """The model's task, quantization and INT8 kernel, once loaded (empty before)."""
        engine = self.state.engine
        return engine.info() if engine is not None else {}

    def model_card(self) -> dict[str, Any]:
        """This server's entry in ``/v1/models``; kdistill's own facts under ``kdistill``."""
        card: dict[str, Any] = {
            "id": self.model_name,
            "object": "model",
            "created": int(self.state.started),
            "owned_by": "kdistill",
        }
        info = self.model_info()
        if info:
            card["kdistill"] = info
        return card

    def engine_for(self, task: str, param: str) -> Engine:
        """The loaded engine when it serves ``task``; 503 while loading or draining, 404 for the
        other task (``param`` names the field that chose this model)."""
        state = self.state
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

    def check_model(self, name: str | None, param: str = "model") -> None:
        """An OpenAI ``model`` field: empty or this server's model."""
        if name not in (None, "", self.model_name):
            raise ApiError(
                404, f"unknown model {name!r}; this server serves {self.model_name!r}", param, kind="not_found_error"
            )

    def _batcher(self) -> DynamicBatcher[Any, Any]:
        batcher = self.state.batcher
        if batcher is None:  # engine_for passed, so the loader set both
            raise ApiError(503, "the model is still loading", None, kind="unavailable", headers={"Retry-After": "2"})
        return batcher

    def check_capacity(self, n: int) -> None:
        """429 with Retry-After unless the queue takes ``n`` more requests: a multi-part request is
        refused whole rather than half queued."""
        batcher = self._batcher()
        if batcher.depth + n > batcher.policy.max_queue:
            self.state.metrics.rejected.inc()
            raise ApiError(
                429,
                f"server overloaded: {batcher.depth} requests queued",
                None,
                kind="overloaded",
                headers={"Retry-After": str(round(batcher.retry_after()))},
            )

    def submit(self, payload: Any, length: int) -> asyncio.Future[Any]:
        """Queue one unit of work (token ids to classify, or a ``GenRequest``) of ``length`` tokens."""
        batcher = self._batcher()
        early: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if (isinstance(payload, GenRequest) and payload.on_text is None) or isinstance(payload, ScoreRequest):
            payload.on_done = answer_early(early)
        try:
            fut = batcher.submit(payload, length, early)
        except QueueFull as exc:
            self.state.metrics.rejected.inc()
            raise ApiError(
                429, str(exc), None, kind="overloaded", headers={"Retry-After": str(round(exc.retry_after))}
            ) from None
        except ShuttingDown as exc:
            raise ApiError(503, str(exc), None, kind="unavailable", headers={"Retry-After": "5"}) from None
        self.state.metrics.queue_depth.set(batcher.depth)
        return asyncio.wrap_future(fut)

    def encode_text(self, engine: Engine, text: Any, param: str, reserve: int = 0) -> list[int]:
        """Token ids of ``text``, which must fit the model's context with ``reserve`` tokens to spare."""
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

    async def classify(self, engine: Engine, texts: list[Any], param: str) -> list[list[float]]:
        """Class probabilities of each text (the classify and v2 infer paths share it)."""
        if not texts:
            raise ApiError(400, f"{param} must not be empty", param)
        if len(texts) > self.limits.max_items:
            raise ApiError(400, f"{param} takes at most {self.limits.max_items} texts", param)
        encoded = [self.encode_text(engine, t, f"{param}[{i}]") for i, t in enumerate(texts)]
        self.check_capacity(len(encoded))
        return list(await asyncio.gather(*(self.submit(ids, len(ids)) for ids in encoded)))
