"""Dynamic batching: a bounded queue drained by one worker thread that runs the model.

The batch decision is pure (``batch_ready``, ``select_batch``, ``wait_time``) so it is unit-tested
without threads or clocks. A batch forms when ``max_batch_size`` requests wait, when their tokens
reach ``max_batch_tokens``, or when the oldest has waited ``max_wait_ms``. The batch always holds the
oldest request (no starvation) plus the waiting requests whose lengths are nearest to it, as long as
the *padded* size (longest x count) stays within ``max_batch_tokens``: similar lengths go together,
so padding stays small. The model runs only on the worker thread, so the event loop never blocks.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 64
    max_batch_tokens: int = 8192
    max_wait_ms: float = 10.0
    max_queue: int = 256

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


@dataclass
class Pending(Generic[T]):
    payload: T
    length: int
    enqueued: float
    seq: int
    future: Future[Any] = field(default_factory=Future)


@dataclass(frozen=True)
class BatchStats:
    size: int
    real_tokens: int
    padded_tokens: int
    seconds: float
    queue_depth: int

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after: float) -> None:
        super().__init__(f"queue is full ({depth} requests waiting)")
        self.depth = depth
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


# ---- pure decisions -----------------------------------------------------------------------------
def batch_ready(queue: Sequence[Pending[Any]], now: float, policy: BatchPolicy) -> bool:
    if not queue:
        return False
    if len(queue) >= policy.max_batch_size or sum(p.length for p in queue) >= policy.max_batch_tokens:
        return True
    oldest = min(p.enqueued for p in queue)
    return (now - oldest) * 1000.0 >= policy.max_wait_ms


def wait_time(queue: Sequence[Pending[Any]], now: float, policy: BatchPolicy) -> float | None:
    """Seconds until the oldest request's window closes (None: nothing queued)."""
    if not queue:
        return None
    oldest = min(p.enqueued for p in queue)
    return max(0.0, oldest + policy.max_wait_ms / 1000.0 - now)


def select_batch(queue: Sequence[Pending[T]], policy: BatchPolicy) -> list[Pending[T]]:
    """The oldest request plus those nearest to it in length, within the size and padded-token
    budgets; returned sorted by length. The oldest goes even if it alone exceeds the token budget
    (the request limits, not the batcher, bound a single request)."""
    if not queue:
        return []
    oldest = min(queue, key=lambda p: p.seq)
    others = sorted((p for p in queue if p is not oldest), key=lambda p: (abs(p.length - oldest.length), p.seq))
    batch, longest = [oldest], oldest.length
    for p in others:
        if len(batch) >= policy.max_batch_size:
            break
        new_longest = max(longest, p.length)
        if new_longest * (len(batch) + 1) > policy.max_batch_tokens:
            continue
        batch.append(p)
        longest = new_longest
    return sorted(batch, key=lambda p: (p.length, p.seq))


def padding_efficiency(lengths: Sequence[int]) -> float:
    return sum(lengths) / (max(lengths) * len(lengths)) if lengths else 1.0


def length_groups(lengths: Sequence[int], overhead_tokens: int) -> list[list[int]]:
    """Split one batch into forward passes of similar lengths: indices into ``lengths``, each group
    sorted by length, groups ascending.

    One padded pass costs about ``overhead_tokens + longest * count`` token-equivalents (the fixed
    part is the model's per-call Python and kernel-launch time, measured ~3-5 ms on this CPU, i.e.
    about 100 tokens of a small student). A dynamic-programming pass over the lengths in sorted order
    finds the cheapest split into contiguous runs, which is the cheapest split overall for this cost:
    mixed lengths (8..128 tokens) in one 32-request batch were 64% real tokens; split, above 90%.
    """
    if overhead_tokens < 0:
        raise ValueError(f"overhead_tokens must be >= 0, got {overhead_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest cost of the first j (sorted) requests
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + overhead_tokens + longest * (j - i)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


# ---- the worker ---------------------------------------------------------------------------------
class DynamicBatcher(Generic[T, R]):
    """Queue + one worker thread calling ``run_batch(payloads) -> results`` (same order)."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        policy: BatchPolicy,
        *,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "kdistill-batcher",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_batch = run_batch
        self.policy = policy
        self.on_batch = on_batch
        self.clock = clock
        self._queue: list[Pending[T]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._accepting = True
        self._stopped = False
        self._busy = False
        self._batch_seconds = 0.05  # running estimate, for Retry-After
        self._running: list[Pending[T]] = []  # the batch run_batch is working on, plus what it admitted
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def retry_after(self) -> float:
        batches_ahead = math.ceil((len(self._queue) + 1) / self.policy.max_batch_size)
        return max(1.0, batches_ahead * self._batch_seconds)

    def submit(self, payload: T, length: int, future: Future[Any] | None = None) -> Future[Any]:
        """Queue one request. ``future`` lets the caller hand ``run_batch`` a way to answer it before
        the batch ends (a generated sequence that finished early); the worker skips futures already done."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.policy.max_queue:
                raise QueueFull(len(self._queue), self.retry_after())
            item: Pending[T] = Pending(payload, length, self.clock(), next(self._seq), future or Future())
            self._queue.append(item)
            self._cond.notify()
        return item.future

    def admit(self, limit: int, token_budget: int) -> list[T]:
        """Continuous batching, called by ``run_batch`` on the worker thread: up to ``limit`` waiting
        requests, oldest first, whose lengths fit in ``token_budget``, join the batch being run. No
        window is waited for: they would only wait longer otherwise. ``run_batch`` returns their
        results after its own batch's, in the order admitted."""
        if limit <= 0 or threading.current_thread() is not self._thread:
            return []
        taken: list[Pending[T]] = []
        with self._cond:
            for p in self._queue:  # arrival order
                if len(taken) >= limit or p.length > token_budget:
                    break  # the oldest waits for the next batch rather than being overtaken
                taken.append(p)
                token_budget -= p.length
            if taken:
                self._queue = self._queue[len(taken) :]
        self._running += taken
        return [p.payload for p in taken]

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, finish every queued and running batch, then end the thread."""
        with self._cond:
            self._accepting = False
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _next_batch(self) -> list[Pending[T]] | None:
        with self._cond:
            while True:
                now = self.clock()
                # Once stopping, drain without waiting for windows to close.
                if self._queue and (self._stopped or batch_ready(self._queue, now, self.policy)):
                    batch = select_batch(self._queue, self.policy)
                    chosen = {id(p) for p in batch}
                    self._queue = [p for p in self._queue if id(p) not in chosen]
                    self._busy = True
                    return batch
                if self._stopped:
                    return None
                self._cond.wait(wait_time(self._queue, now, self.policy))

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            start = self.clock()
            self._running = list(batch)
            try:
                results = self.run_batch([p.payload for p in batch])
                batch = self._running  # with what it admitted while running
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
            except BaseException as exc:  # one bad batch must not kill the worker
                batch = self._running
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
            else:
                for p, r in zip(batch, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(r)
            self._running = []
            seconds = self.clock() - start
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            with self._cond:
                self._busy = False
            if self.on_batch is not None:
                lengths = [p.length for p in batch]
                self.on_batch(
                    BatchStats(len(batch), sum(lengths), max(lengths) * len(lengths), seconds, len(self._queue))
                )
