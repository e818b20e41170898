"""Process and model settings of the inference runtime, applied to every served model, FP32 or INT8.

Two measured costs outside the GEMMs (docs/serving.md, "Latency"):

- **Composed activations.** GPT2's ``gelu_new`` is six elementwise kernels over the MLP's
  ``tokens x 4*width`` activations (~11-15% of a small student's forward on this CPU).
  ``prepare_for_inference`` swaps it (and torch's own tanh-GELU kernel) for ``InferenceTanhGELU``,
  the same function written as ``x * sigmoid(2z)`` (``0.5 * (1 + tanh(z)) == sigmoid(2z)``): torch's
  CPU ``tanh`` is slow here, and the fused ``gelu(approximate="tanh")`` kernel spends its time in it.
  Over a 128 x 2048 activation: composed ~6 ms, fused tanh kernel 0.92 ms, sigmoid form 0.42 ms
  (2048 x 2048: 60 / 19 / 13 ms). Outputs differ by float rounding only (<= 7.2e-7 absolute over
  [-12, 12], against 6.3e-7 for the fused tanh kernel).
- **Page faults.** glibc returns freed memory above its trim threshold to the kernel, and serves big
  blocks with fresh ``mmap``s, so every forward re-faults its multi-MB activations: 19-55k minor
  faults and 60-170 ms of kernel time per batch-16 forward of a 3-layer, 512-wide student.
  ``tune_allocator`` keeps freed memory in the process for reuse, so a steady loop of forwards stops
  faulting; RSS stays at its peak. Opt-in for ``kdistill serve`` (``KDISTILL_TUNE_ALLOCATOR=1``):
  measured in the server it cost more than it saved (``TUNE_ALLOCATOR_DEFAULT``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.trainer.fused_ops import FusedTanhGELU, fuse_activations

log = logging.getLogger("kdistill.serving")

Fn = TypeVar("Fn", bound=Callable[..., Any])


def inference_mode(fn: Fn) -> Fn:
    """``torch.inference_mode()`` as a decorator that keeps ``fn``'s signature for type checkers
    (mypy reads torch as ``Any``, so the plain decorator would make ``fn`` untyped)."""
    return cast(Fn, torch.inference_mode()(fn))


TUNE_ALLOCATOR_ENV = "KDISTILL_TUNE_ALLOCATOR"
# What ``kdistill serve`` does without KDISTILL_TUNE_ALLOCATOR (docs/serving.md, "Runtime settings").
# Off: in the server (model on a worker thread, HTTP on the event loop) the tuned settings cost
# 15-20% more CPU per classification request in interleaved A/B runs; single-threaded forwards
# gained 0-7% from them.
TUNE_ALLOCATOR_DEFAULT = False
# mallopt(3) parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not from a fresh mmap. 32 MiB is glibc's ceiling for
# M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2); a 2048 x 2048 fp32 activation is 16 MiB.
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory kept at the top of the heap before it is given back to the kernel.
TRIM_THRESHOLD_BYTES = 1 << 30


def allocator_tuning_wanted() -> bool:
    """Whether ``kdistill serve`` tunes the allocator: ``KDISTILL_TUNE_ALLOCATOR=1`` or ``0``, else
    ``TUNE_ALLOCATOR_DEFAULT``."""
    raw = os.environ.get(TUNE_ALLOCATOR_ENV, "")
    if raw not in ("", "0", "1"):
        raise ValueError(f"{TUNE_ALLOCATOR_ENV}={raw!r}: expected 1 (tune) or 0 (glibc as it is)")
    return TUNE_ALLOCATOR_DEFAULT if raw == "" else raw == "1"


def tune_allocator() -> bool:
    """Keep freed memory for reuse (glibc only); True when both settings took effect.

    Process-wide and idempotent. On a C library without ``mallopt`` (musl, macOS) nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on a rejected value.
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)
    ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1) and ok
    if not ok:
        log.warning("mallopt rejected the allocator settings; freed memory goes back to the kernel")
    return ok


# 2 * sqrt(2 / pi): tanh-GELU(x) = x * sigmoid(2 * sqrt(2 / pi) * (x + 0.044715 x^3)).
_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)
# Below this many elements torch's single fused kernel is as fast: launches dominate.
SMALL_ACTIVATION = 1 << 15


class InferenceTanhGELU(nn.Module):  # type: ignore[misc]  # torch is read as Any (pyproject)
    """GELU, tanh approximation, as ``x * sigmoid(2z)``: one temporary updated in place.

    In-place updates would break autograd's saved tensors, so with gradients on it computes torch's
    fused kernel instead (same function); so it does for small tensors (a decode step's few rows),
    where the five extra kernel launches would cost more than the slow ``tanh`` they avoid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < SMALL_ACTIVATION or (torch.is_grad_enabled() and x.requires_grad):
            return F.gelu(x, approximate="tanh")
        u = x * x
        u.mul_(0.044715 * _TWO_SQRT_2_OVER_PI).add_(_TWO_SQRT_2_OVER_PI).mul_(x)  # 2z
        return u.sigmoid_().mul_(x)


def _tanh_gelu_kernels() -> tuple[type[nn.Module], ...]:
    try:
        from transformers.activations import GELUTanh
    except ImportError:  # older transformers: only the composed classes, fused first
        return (FusedTanhGELU,)
    return (FusedTanhGELU, GELUTanh)


def prepare_for_inference(model: nn.Module) -> dict[str, Any]:
    """Settings that change kernels, not numbers beyond float rounding: every tanh-GELU becomes
    ``InferenceTanhGELU``. In place; the model's state dict and config are unchanged. Returns what
    was done, for logs and benchmarks."""
    fuse_activations(model)  # transformers' composed tanh-GELUs -> FusedTanhGELU
    kernels = _tanh_gelu_kernels()
    targets = [name for name, m in model.named_modules() if type(m) in kernels]
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, InferenceTanhGELU())
    return {"tanh_gelu": len(targets)}
