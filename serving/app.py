"""The HTTP API, assembled: OpenAI-compatible completions/chat for causal LMs, KServe Open Inference
Protocol v2 and ``/v1/classify`` for classifiers (one router each, ``serving/routers/``), health,
and Prometheus metrics.

Every error is JSON and names the offending field (``prompt[1]``, ``max_tokens``,
``inputs[0].datatype``, ``body``...), in the shape of the protocol the path belongs to
(``serving/errors.py``).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from .errors import install_handlers
from .front import Front
from .observe import ObserveMiddleware
from .routers import classify, openai, v2
from .state import ServeLimits, ServerState

__all__ = ["ServeLimits", "ServerState", "create_app"]


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="kdistill serving", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ObserveMiddleware, metrics=state.metrics, max_body_bytes=state.limits.max_body_bytes)
    install_handlers(app)
    front = Front(state)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if state.batcher is not None:
            state.metrics.queue_depth.set(state.batcher.depth)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    for protocol in (v2, openai, classify):
        app.include_router(protocol.router(front))
    return app
