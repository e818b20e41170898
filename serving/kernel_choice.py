"""Which INT8 kernel runs the served model: the fastest one on this machine, measured when the model
loads, remembered per CPU and layer shapes.

The artifact stores its INT8 layers backend-neutral (``trainer/quantization.py``), so every kernel
computes the same per-channel int8 weights; they differ in speed, and by CPU: on an AVX2-only CPU
``torchao-dynamic`` runs a reference loop far slower than an fp32 GEMM, and on an AVX512-VNNI CPU
it was slower than ``fbgemm-dynamic`` and ``onednn-dynamic``. Which of fbgemm and oneDNN wins
depends on the layer shapes and on the number of rows (docs/benchmarks/serving.md): on an AVX2
CPU fbgemm was fastest at 16-128 rows and oneDNN at 2048 (a batch of 16 128-token texts).

The measurement: every distinct (in, out) shape of the model's INT8 layers, with that layer's own
weights, under each kernel this torch build offers, at ``PROBE_ROWS`` rows (a decode step or a short
text, a 128-token prompt, and a batch of 16 of them). Kernels take turns, one call each per round, so
a burst of load from other processes hits all of them alike; a kernel far slower than the best after
the warm-up calls (``PRUNE_FACTOR``) is dropped without further rounds. A kernel's time is its model
time (layer time x layer count) at each row count.

The choice is a kernel per band of row counts (``plan``): the fastest at the smallest probe runs
every input up to where another kernel measured more than ``SWITCH_MARGIN`` faster at a larger probe;
that one runs from the geometric middle between the two probes on. Each INT8 layer picks its band
by the rows of the input it gets (``Int8Linear.kernel_for``), so batch 1 and batch 16 each run the
kernel that was fastest at their size, never one chosen for the other.

The choice is cached in ``$KDISTILL_CACHE_DIR/int8-kernels.json`` (default
``$XDG_CACHE_HOME/kdistill``, then ``~/.cache/kdistill``), keyed by the CPU's int8 features, torch's
version, the thread count and the shapes, so a restart on the same machine skips the measurement.
Without a measurement (``KDISTILL_INT8_PROBE=0``) the table per CPU feature set in
``trainer/quantization.select_int8_kernel`` decides, and ``KDISTILL_INT8_KERNEL`` forces a kernel.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from kdistill.trainer import quantization as q

from .runtime import inference_mode

log = logging.getLogger("kdistill.serving")

PROBE_ENV = "KDISTILL_INT8_PROBE"
CACHE_DIR_ENV = "KDISTILL_CACHE_DIR"
CACHE_FILE = "int8-kernels.json"
# Bump when the measurement changes, so older cached choices are measured again.
PROBE_VERSION = 2
# Rows of the timed calls: a few decode rows or a short text, a 128-token prompt, 16 such prompts.
PROBE_ROWS = (16, 128, 2048)
# A larger row count switches to another kernel only if it was this much faster there: two
# kernels within the machine's run-to-run noise keep one band.
SWITCH_MARGIN = 0.05
# Timed rounds after the warm-up; the median of each kernel's rounds counts.
PROBE_ROUNDS = 5
# After the warm-up, a kernel this many times slower than the fastest is not timed further.
PRUNE_FACTOR = 4.0

Source = Literal["forced", "cache", "measured", "table", "none"]


@dataclass
class KernelChoice:
    """The kernel the server runs (``kernel`` from one row; each of ``bands``, ``[rows, kernel]``,
    from its row count on), how it was chosen, and (when measured) the model time per kernel in ms
    at each probe row count."""

    kernel: str
    source: Source
    ms: dict[str, dict[str, float]] = field(default_factory=dict)
    key: str = ""
    bands: list[list[Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_DIR_ENV, "")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kdistill"


def probe_wanted() -> bool:
    raw = os.environ.get(PROBE_ENV, "")
    if raw not in ("", "0", "1"):
        raise ValueError(f"{PROBE_ENV}={raw!r}: expected 1 (measure at load) or 0 (the table per CPU)")
    return raw != "0"


def candidates() -> list[q.Int8Kernel]:
    """The CPU kernels this torch build can run."""
    engines = torch.backends.quantized.supported_engines
    dynamic = [cast(q.Int8Kernel, k) for k, engine in q.DYNAMIC_ENGINES.items() if engine in engines]
    return [*dynamic, "torchao-dynamic", "weight-only"]


def layer_shapes(model: nn.Module) -> dict[tuple[int, int, bool], q.Int8Linear]:
    """One INT8 layer per distinct (in, out, bias) shape: the first of its shape in the model."""
    first: dict[tuple[int, int, bool], q.Int8Linear] = {}
    for module in model.modules():
        if isinstance(module, q.Int8Linear):
            first.setdefault((module.in_features, module.out_features, module.bias is not None), module)
    return first


def shape_counts(model: nn.Module) -> Counter[tuple[int, int, bool]]:
    return Counter(
        (m.in_features, m.out_features, m.bias is not None) for m in model.modules() if isinstance(m, q.Int8Linear)
    )


def cache_key(model: nn.Module) -> str:
    """What the fastest kernel depends on: CPU features, torch, threads, the layer shapes."""
    shapes = sorted([*shape, n] for shape, n in shape_counts(model).items())
    what = {
        "probe": PROBE_VERSION,
        "rows": PROBE_ROWS,
        "cpu": q.cpu_int8_features(),  # includes the intra-op thread count
        "torch": torch.__version__,
        "shapes": shapes,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def _copy_of(layer: q.Int8Linear, kernel: q.Int8Kernel) -> q.Int8Linear:
    return q.Int8Linear.from_int8(layer.weight_int8, layer.weight_scale, layer.bias, kernel)


def _call_ms(layer: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x)
    return (time.perf_counter() - start) * 1e3


@inference_mode
def measure(model: nn.Module, kernels: list[q.Int8Kernel] | None = None) -> dict[str, dict[str, float]]:
    """Model time in ms per kernel and row count (INT8 layers only): kernel -> {rows: ms}. Kernels
    pruned after the warm-up are absent from the row counts they lost at."""
    kernels = kernels or candidates()
    counts = shape_counts(model)
    layers = layer_shapes(model)
    out: dict[str, dict[str, float]] = {k: {} for k in kernels}
    gen = torch.Generator().manual_seed(0)
    for rows in PROBE_ROWS:
        inputs = {s: torch.randn(rows, s[0], generator=gen) for s in layers}
        built = {k: {s: _copy_of(layer, k) for s, layer in layers.items()} for k in kernels}
        # Warm-up: the first call packs the weights; the better of two more estimates the steady
        # time (one call alone may be the one another process preempted).
        estimate: dict[str, float] = {}
        for k in kernels:
            for s, layer in built[k].items():
                _call_ms(layer, inputs[s])
            estimate[k] = sum(
                counts[s] * min(_call_ms(layer, inputs[s]), _call_ms(layer, inputs[s])) for s, layer in built[k].items()
            )
        best = min(estimate.values())
        alive = [k for k in kernels if estimate[k] <= PRUNE_FACTOR * best]
        samples: dict[str, dict[tuple[int, int, bool], list[float]]] = {k: {s: [] for s in layers} for k in alive}
        for round_ in range(PROBE_ROUNDS):
            # Rotate the order each round, so no kernel always runs first (or after the same one).
            order = alive[round_ % len(alive) :] + alive[: round_ % len(alive)]
            for s in layers:
                for k in order:
                    samples[k][s].append(_call_ms(built[k][s], inputs[s]))
        for k in alive:
            out[k][str(rows)] = sum(counts[s] * statistics.median(v) for s, v in samples[k].items())
    return out


def plan(ms: dict[str, dict[str, float]]) -> tuple[str, list[list[Any]]]:
    """The kernel for the smallest inputs, and the bands ``[from rows, kernel]`` where another one
    takes over (see the module doc). A kernel pruned at a row count lost there by at least
    PRUNE_FACTOR, so it never runs that band."""
    rows = sorted(int(r) for r in {r for v in ms.values() for r in v})
    if not rows:
        raise ValueError("no kernel was timed")

    def best_at(r: int) -> str:
        timed = [k for k, v in ms.items() if str(r) in v]  # dict order: the first of equals wins
        return min(timed, key=lambda k: ms[k][str(r)])

    current = first = best_at(rows[0])
    bands: list[list[Any]] = []
    for lower, r in itertools.pairwise(rows):
        best = best_at(r)
        mine = ms[current].get(str(r), math.inf)
        if best != current and mine > (1 + SWITCH_MARGIN) * ms[best][str(r)]:
            bands.append([math.isqrt(lower * r), best])
            current = best
    return first, bands


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``key``, atomically (another server on the machine may read it now)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home in a pod: measure again next time
        log.warning("INT8 kernel choice not cached in %s: %s", path, exc)


def choose(model: nn.Module) -> KernelChoice:
    """The kernel for ``model``'s INT8 layers on this machine (forced, cached, measured, or from the
    table), without changing the model."""
    if not q.int8_modules(model):
        return KernelChoice("none", "none")
    if os.environ.get(q.KERNEL_ENV, ""):
        return KernelChoice(q.select_int8_kernel(), "forced")
    device = next((b.device for b in model.buffers()), torch.device("cpu"))
    if device.type != "cpu" or not probe_wanted():
        return KernelChoice(q.select_int8_kernel(device), "table")
    key = cache_key(model)
    path = cache_dir() / CACHE_FILE
    cached = _read_cache(path).get(key)
    if isinstance(cached, dict) and _usable(cached):
        return KernelChoice(cached["kernel"], "cache", cached.get("ms", {}), key, cached.get("bands", []))
    try:
        ms = measure(model)
        kernel, bands = plan(ms)
    except (RuntimeError, ValueError) as exc:  # a kernel this CPU cannot run after all
        log.warning("INT8 kernel measurement failed (%s); using the table per CPU feature set", exc)
        return KernelChoice(q.select_int8_kernel(device), "table")
    entry = {"kernel": kernel, "bands": bands, "ms": ms, "cpu": q.cpu_int8_features(), "measured": time.time()}
    _write_cache(path, key, entry)
    return KernelChoice(kernel, "measured", ms, key, bands)


def _usable(cached: dict[str, Any]) -> bool:
    """A cache entry naming kernels this build still offers, in well-formed bands."""
    if cached.get("kernel") not in candidates():
        return False
    bands = cached.get("bands", [])
    return isinstance(bands, list) and all(
        isinstance(b, list) and len(b) == 2 and isinstance(b[0], int) and b[1] in candidates() for b in bands
    )


def apply(model: nn.Module) -> KernelChoice:
    """Choose the kernels for ``model`` and switch its INT8 layers to them, in place."""
    choice = choose(model)
    if choice.kernel != "none":
        bands = tuple((int(rows), cast(q.Int8Kernel, kernel)) for rows, kernel in choice.bands)
        q.set_int8_kernel(model, cast(q.Int8Kernel, choice.kernel), bands)
    return choice
