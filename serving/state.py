"""What one server process holds: its name, its limits, its metrics, and the model once loaded."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .metrics import ServerMetrics

if TYPE_CHECKING:  # the engine imports torch; the state is built before the model loads
    from .batcher import DynamicBatcher
    from .cascade import Cascade
    from .engine import Engine


@dataclass
class ServeLimits:
    max_tokens: int = 512  # per request, generated tokens
    max_items: int = 64  # texts per classify/infer request
    max_prompts: int = 16  # prompts per completions request
    max_body_bytes: int = 1 << 20
    # Top-K alternatives per token (completions ``logprobs``): JSON spells every alternative out as
    # text (~30 bytes each), the binary frame stores 8 bytes each, so it may ask for more.
    max_logprobs: int = 20
    max_logprobs_binary: int = 128


@dataclass
class ServerState:
    model_name: str
    limits: ServeLimits
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    engine: Engine | None = None
    batcher: DynamicBatcher[Any, Any] | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    cascade: Cascade | None = None  # the fallback teacher, when the server has one
    started: float = field(default_factory=time.time)
