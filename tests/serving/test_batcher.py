"""The dynamic batcher: pure batch decisions, then the worker thread."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill.serving.batcher import (
    BatchPolicy,
    DynamicBatcher,
    Pending,
    QueueFull,
    ShuttingDown,
    batch_ready,
    length_groups,
    padding_efficiency,
    select_batch,
    wait_time,
)


def queue(lengths: list[int], t0: float = 100.0, step: float = 0.001) -> list[Pending[int]]:
    return [Pending(i, n, t0 + i * step, i) for i, n in enumerate(lengths)]


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchPolicy(max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        BatchPolicy(max_wait_ms=-1)


def test_batch_forms_on_size_tokens_or_wait() -> None:
    policy = BatchPolicy(max_batch_size=4, max_batch_tokens=100, max_wait_ms=10)
    assert not batch_ready([], 100.0, policy)
    assert not batch_ready(queue([5, 5]), 100.002, policy)  # young, small: keep waiting
    assert batch_ready(queue([5, 5, 5, 5]), 100.004, policy)  # size
    assert batch_ready(queue([60, 50]), 100.002, policy)  # tokens
    assert batch_ready(queue([5]), 100.0101, policy)  # the oldest waited max_wait_ms
    assert wait_time(queue([5, 5]), 100.004, policy) == pytest.approx(0.006)
    assert wait_time([], 1.0, policy) is None


def test_selection_groups_similar_lengths_around_the_oldest() -> None:
    policy = BatchPolicy(max_batch_size=3, max_batch_tokens=1000)
    q = queue([10, 100, 12, 95, 11, 50])
    batch = select_batch(q, policy)
    assert [p.length for p in batch] == [10, 11, 12]  # the oldest (10) and its nearest neighbours, sorted
    assert padding_efficiency([p.length for p in batch]) > padding_efficiency([10, 100, 12])


def test_selection_respects_the_padded_token_budget() -> None:
    policy = BatchPolicy(max_batch_size=64, max_batch_tokens=100)
    batch = select_batch(queue([20, 30, 25, 90, 24]), policy)
    assert max(p.length for p in batch) * len(batch) <= 100
    assert batch[0].seq == 0 or any(p.seq == 0 for p in batch)
    alone = select_batch(queue([500, 10]), policy)  # the oldest goes even over budget, alone
    assert [p.length for p in alone] == [500]


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=80), size=st.integers(1, 16), tokens=st.integers(1, 2000)
)
def test_selection_invariants(lengths: list[int], size: int, tokens: int) -> None:
    policy = BatchPolicy(max_batch_size=size, max_batch_tokens=tokens)
    q = queue(lengths)
    batch = select_batch(q, policy)
    assert any(p.seq == 0 for p in batch)  # no starvation
    assert 1 <= len(batch) <= size
    assert len({p.seq for p in batch}) == len(batch)
    assert [p.length for p in batch] == sorted(p.length for p in batch)
    if len(batch) > 1:
        assert max(p.length for p in batch) * len(batch) <= tokens


def test_worker_batches_concurrent_requests_and_keeps_results_in_place() -> None:
    seen: list[list[int]] = []

    def run(xs: list[int]) -> list[int]:
        seen.append(list(xs))
        time.sleep(0.01)
        return [x * 2 for x in xs]

    batcher: DynamicBatcher[int, int] = DynamicBatcher(run, BatchPolicy(max_batch_size=8, max_wait_ms=20))
    batcher.start()
    futures: dict[int, Future] = {}
    threads = [
        threading.Thread(target=lambda i=i: futures.__setitem__(i, batcher.submit(i, 1 + i % 5))) for i in range(40)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: f.result(10) for i, f in futures.items()} == {i: 2 * i for i in range(40)}
    batcher.stop()
    assert max(len(b) for b in seen) <= 8
    assert max(len(b) for b in seen) > 1  # requests were actually batched
    assert sorted(x for b in seen for x in b) == list(range(40))


def test_full_queue_refuses_with_retry_after_and_stop_drains() -> None:
    gate = threading.Event()

    def run(xs: list[int]) -> list[int]:
        gate.wait(10)
        return xs

    batcher: DynamicBatcher[int, int] = DynamicBatcher(run, BatchPolicy(max_batch_size=1, max_wait_ms=0, max_queue=3))
    batcher.start()
    first = batcher.submit(0, 1)
    deadline = time.monotonic() + 5
    while batcher.depth and time.monotonic() < deadline:  # the worker has taken it and is blocked
        time.sleep(0.005)
    queued = [batcher.submit(i, 1) for i in range(1, 4)]
    with pytest.raises(QueueFull) as exc:
        batcher.submit(99, 1)
    assert exc.value.retry_after >= 1.0
    gate.set()
    batcher.stop()
    assert [f.result(5) for f in [first, *queued]] == [0, 1, 2, 3]  # in-flight and queued work finished
    with pytest.raises(ShuttingDown):
        batcher.submit(5, 1)


def test_a_failing_batch_fails_its_requests_and_the_worker_survives() -> None:
    def run(xs: list[int]) -> list[int]:
        if -1 in xs:
            raise RuntimeError("bad batch")
        return xs

    batcher: DynamicBatcher[int, int] = DynamicBatcher(run, BatchPolicy(max_batch_size=1, max_wait_ms=0))
    batcher.start()
    with pytest.raises(RuntimeError, match="bad batch"):
        batcher.submit(-1, 1).result(5)
    assert batcher.submit(7, 1).result(5) == 7
    batcher.stop()


def test_length_groups_split_mixed_lengths_and_keep_similar_ones_together() -> None:
    lengths = [120, 10, 118, 12, 11, 125, 9, 60]
    groups = length_groups(lengths, overhead_tokens=96)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    padded = sum(max(lengths[i] for i in g) * len(g) for g in groups)
    assert sum(lengths) / padded > 0.8 > 0.5 > padding_efficiency(lengths)
    assert {frozenset(lengths[i] for i in g) for g in groups} >= {frozenset({9, 10, 11, 12})}
    # Equal lengths never split: one pass is cheapest.
    assert length_groups([50] * 16, overhead_tokens=96) == [list(range(16))]
    # Without a per-call cost every distinct length is its own pass; with a huge one, a single pass.
    assert len(length_groups([5, 50, 100], overhead_tokens=0)) == 3
    assert length_groups([5, 50, 100], overhead_tokens=10_000) == [[0, 1, 2]]


@given(st.lists(st.integers(1, 512), min_size=1, max_size=64), st.integers(0, 500))
def test_length_groups_is_the_cheapest_contiguous_split(lengths: list[int], overhead: int) -> None:
    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    cost = sum(overhead + max(lengths[i] for i in g) * len(g) for g in groups)
    # Never worse than one pass for all, nor than one pass per request.
    assert cost <= overhead + max(lengths) * len(lengths)
    assert cost <= sum(overhead + n for n in lengths)
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)
