"""Whether kdistill compiles its hot functions with ``torch.compile``, and the compiled versions.

``KDISTILL_COMPILE``: ``1`` compiles, ``0`` never does; unset, compilation is off. What compiles:
the fused loss's chunk function (``maybe_compiled``) and, on the packed step, the teacher's and
the student's backbones (``maybe_compiled_module``: the teacher's forward in inference mode, the
student's forward and backward through AOTAutograd). A cold compile takes tens of seconds to
minutes on a small CPU (inductor writes and builds C++), which a short job (a test, the
quickstart) would never win back; long jobs and the benchmarks turn it on. inductor's on-disk
cache (``TORCHINDUCTOR_CACHE_DIR``) makes later processes load the compiled code instead of
building it again.

Compiled functions keep their eager fallback: if compilation fails (no C++ compiler, an
unsupported op), the first call logs a warning and every call runs eagerly from then on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

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

    return CompiledCall(fn, torch.compile(fn, dynamic=True), fn.__name__)


def maybe_compiled_module(module: nn.Module) -> Callable[..., Any]:
    """What calls ``module``: compiled when compilation is on, else the module itself.

    Compiled with dynamic shapes from the first call: a packed micro-batch's row count changes
    from step to step, and with the default (static first, dynamic on the first recompile) every
    mix of grad mode (teacher or student) and attention form first met after the warm-up would
    compile again inside training, two graphs each, near dynamo's limit of eight per function
    (the teacher's and the student's backbones share transformers' ``forward``). The module's
    parameters are shared, not copied."""
    if not compile_enabled():
        return module
    import torch

    return CompiledCall(module, torch.compile(module, dynamic=True), type(module).__name__)


class CompiledCall:
    """Calls ``compiled``, or ``eager`` from the first call on which compiling fails (``broken``)."""

    def __init__(self, eager: Callable[..., Any], compiled: Callable[..., Any], name: str) -> None:
        self.eager, self.compiled, self.name = eager, compiled, name
        self.broken = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:
            log.warning("torch.compile of %s failed (%s); running it eagerly", self.name, exc)
            self.broken = True
            return self.eager(*args, **kwargs)
