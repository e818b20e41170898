"""Process and model settings of the inference runtime, applied to every served model, FP32 or INT8.

Two measured costs outside the GEMMs (docs/serving.md, "Latency"):

- **Composed activations.** GPT2's ``gelu_new`` is six elementwise kernels over the MLP's
  ``tokens x 4*width`` activations (~11-15% of a small student's forward on this CPU).
  ``prepare_for_inference`` swaps it for the one fused kernel of the same function
  (``trainer/fused_ops.py``; outputs differ by float rounding only, ~4e-7 absolute).
- **Page faults.** glibc returns freed memory above its trim threshold to the kernel, and serves big
  blocks with fresh ``mmap``s, so every forward re-faults its multi-MB activations: 19-55k minor
  faults and 60-170 ms of kernel time per batch-16 forward of a 3-layer, 512-wide student.
  ``tune_allocator`` keeps freed memory in the process for reuse, so a steady server stops faulting.
  The price is that RSS stays at its peak (the largest batch seen), which a server reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

from torch import nn

from kdistill.trainer.fused_ops import fuse_activations

log = logging.getLogger("kdistill.serving")

# mallopt(3) parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not from a fresh mmap. 32 MiB is glibc's ceiling for
# M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2); a 2048 x 2048 fp32 activation is 16 MiB.
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory kept at the top of the heap before it is given back to the kernel.
TRIM_THRESHOLD_BYTES = 1 << 30


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
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    if not ok:
        log.warning("mallopt rejected the allocator settings; freed memory goes back to the kernel")
    return ok


def prepare_for_inference(model: nn.Module) -> dict[str, Any]:
    """Settings that change kernels, not numbers beyond float rounding: the fused tanh-GELU. In place;
    the model's state dict and config are unchanged. Returns what was done, for logs and benchmarks."""
    return {"fused_activations": fuse_activations(model)}
