"""``kdistill serve``: load the model (a kdistill artifact or a plain Hugging Face directory) in the
background, warm up, then serve on uvicorn.

Liveness answers at once; readiness only after the model is loaded and warmed up. On SIGTERM the
server stops taking connections and reports not-ready, finishes the requests in flight (uvicorn's
graceful shutdown), then drains the batcher's queue before the process exits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from kdistill.api.metadata import ARTIFACT_DIR_NAMES

from .app import create_app
from .batcher import BatchPolicy, DynamicBatcher
from .cascade import Cascade, FallbackOptions
from .state import ServeLimits, ServerState

log = logging.getLogger("kdistill.serving")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    model_name: str | None = None
    policy: BatchPolicy = field(default_factory=BatchPolicy)
    limits: ServeLimits = field(default_factory=ServeLimits)
    threads: int | None = None
    graceful_timeout: float = 30.0
    log_level: str = "info"
    trust_remote_code: bool = False  # plain Hugging Face directories only; artifacts never run remote code
    fallback: FallbackOptions | None = None  # cascade serving: the teacher for what the student is unsure of


def default_model_name(model_dir: Path) -> str:
    """The job's name for the standard layout (<job>/student-int8), else the directory's name."""
    model_dir = model_dir.resolve()
    return model_dir.parent.name if model_dir.name in ARTIFACT_DIR_NAMES and model_dir.parent.name else model_dir.name


def load_into(
    state: ServerState, model_dir: Path, policy: BatchPolicy, threads: int | None, trust_remote_code: bool = False
) -> None:
    """Load, warm up and start the batcher; flip ``ready`` last. Runs on its own thread."""
    import torch

    from .engine import Engine
    from .model_dir import load_model_dir
    from .runtime import allocator_tuning_wanted, tune_allocator

    try:
        if threads:
            torch.set_num_threads(threads)
        # Before the model allocates: steady-state forwards stop page-faulting.
        tuned = tune_allocator() if allocator_tuning_wanted() else False
        artifact = load_model_dir(model_dir, trust_remote_code=trust_remote_code)
        engine = Engine(artifact, state.metrics)
        engine.warm_up()
        run = engine.run_generation if engine.task == "causal-lm" else engine.run_classification
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(run, policy, on_batch=engine.on_batch)
        if engine.task == "causal-lm":
            engine.attach(batcher)  # continuous batching: waiting requests join the running decode
        batcher.start()
        state.engine, state.batcher = engine, batcher
        state.ready = True
        log.info(
            "model %s (%s, %s) ready; INT8 kernel %s (%s); allocator tuned: %s; %s",
            state.model_name,
            engine.task,
            artifact.meta.get("quantization", {}).get("mode"),
            engine.int8_kernel.kernel,
            engine.int8_kernel.source,
            tuned,
            engine.runtime,
        )
    except Exception as exc:
        state.load_error = f"model failed to load: {exc}"
        log.exception("model failed to load")


class DrainingServer(uvicorn.Server):
    """Reports not-ready as soon as a shutdown signal arrives, before uvicorn drains connections."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True
        super().handle_exit(sig, frame)


def build(model_dir: Path, options: ServeOptions) -> tuple[FastAPI, ServerState]:
    state = ServerState(model_name=options.model_name or default_model_name(model_dir), limits=options.limits)
    if options.fallback is not None:
        state.cascade = Cascade(options.fallback, state.metrics)
        fb = options.fallback
        log.info(
            "cascade: teacher %s, min confidence %g, timeout %g s, on teacher error %s, max in flight %d",
            fb.base_url,
            fb.min_confidence,
            fb.timeout_s,
            fb.on_teacher_error,
            fb.max_in_flight,
        )
    app = create_app(state)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(
            target=load_into,
            args=(state, model_dir, options.policy, options.threads, options.trust_remote_code),
            name="kdistill-loader",
            daemon=True,
        )
        loader.start()
        yield
        state.draining = True
        if state.batcher is not None:
            state.batcher.stop(timeout=options.graceful_timeout)
        if state.cascade is not None:
            await state.cascade.aclose()

    app.router.lifespan_context = lifespan
    return app, state


def serve(model_dir: Path, options: ServeOptions) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"MODEL_DIR {model_dir} is not a directory")
    app, state = build(model_dir, options)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        timeout_graceful_shutdown=int(options.graceful_timeout),
        lifespan="on",
        access_log=False,
    )
    DrainingServer(config, state).run()
