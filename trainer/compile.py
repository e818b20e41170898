"""Whether kdistill compiles its hot functions with ``torch.compile``, and the compiled versions.

``KDISTILL_COMPILE``: ``1`` compiles, ``0`` never does; unset, compilation is off. A cold compile
of the fused loss's chunk function takes tens of seconds on a small CPU (inductor writes and
builds C++), which a short job (a test, the quickstart) would never win back; long jobs and the
benchmarks turn it on. inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) makes later
processes load the compiled code instead of building it again.

Compiled functions keep their eager fallback: if compilation fails (no C++ compiler, an
unsupported op), the first call logs a warning and every call runs eagerly from then on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}


def compile_enabled() -> bool:
    value = os.environ.get("KDISTILL_COMPILE", "0")
    if value not in ("0", "1"):
        raise ValueError(f"KDISTILL_COMPILE must be 0 or 1, got {value!r}")
    return value == "1"


def maybe_compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled (dynamic shapes: the last chunk of rows is shorter) when compilation is on."""
    if not compile_enabled():
        return fn
    found = _compiled.get(fn)
    if found is None:
        found = _compiled[fn] = _with_fallback(fn)
    return found


def _with_fallback(fn: Callable[..., Any]) -> Callable[..., Any]:
    import torch

    compiled = torch.compile(fn, dynamic=True)
    state = {"broken": False}

    def call(*args: Any) -> Any:
        if state["broken"]:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as exc:
            log.warning("torch.compile of %s failed (%s); running it eagerly", fn.__name__, exc)
            state["broken"] = True
            return fn(*args)

    return call
