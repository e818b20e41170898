"""Teacher top-k cache: round trip, byte budget, restarts, concurrent writers, corruption."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from kdistill.trainer.teacher_cache import (
    SUFFIX,
    TMP_PREFIX,
    TeacherCache,
    bytes_per_token,
    index_bytes_for,
)


def teacher_batch(b: int, length: int, vocab: int, k: int, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, vocab, generator=g) * 3
    values, indices = logits.topk(k, dim=-1)
    return logits, values.half(), indices, torch.logsumexp(logits, dim=-1)


def shards(root: Path) -> list[Path]:
    return sorted(root.glob("shard-*" + SUFFIX))


def test_round_trip_matches_the_live_top_k(tmp_path: Path) -> None:
    vocab, k = 1000, 16
    _, values, indices, lse = teacher_batch(3, 9, vocab, k)
    cache = TeacherCache(tmp_path, k, vocab)
    cache.store([40, 41, 42], values, indices, [9, 4, 6], lse)
    got = cache.lookup([42, 40])
    assert got is not None
    assert got.values.shape == (2, 9, k) and got.indices.shape == (2, 9, k) and got.logsumexp.shape == (2, 9)
    assert got.values.dtype == torch.float32 and got.indices.dtype == torch.int64
    assert torch.equal(got.indices[0, :6], indices[2, :6]) and torch.equal(got.indices[1], indices[0])
    assert torch.equal(got.values[1], values[0].float())  # fp16 values come back bit for bit
    assert torch.allclose(got.logsumexp[1], lse[0], atol=5e-3)
    assert torch.allclose(got.logsumexp[0, :6], lse[2, :6], atol=5e-3)
    # Positions past an example's length are zero padding.
    assert got.values[0, 6:].abs().sum() == 0 and got.logsumexp[0, 6:].abs().sum() == 0
    assert cache.hits == 1


def test_full_vocabulary_top_k_gives_back_the_distribution(tmp_path: Path) -> None:
    vocab = 64
    logits, values, indices, lse = teacher_batch(2, 5, vocab, vocab, seed=1)
    cache = TeacherCache(tmp_path, vocab, vocab)
    cache.store([0, 1], values, indices, [5, 5], lse)
    got = cache.lookup([0, 1])
    assert got is not None
    probs = torch.zeros(2, 5, vocab).scatter_(-1, got.indices, (got.values - got.logsumexp[..., None]).exp())
    assert torch.allclose(probs, logits.softmax(-1), atol=2e-3)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 5), atol=5e-3)  # no mass lost in the lse offset


def test_tail_mass_from_the_cached_logsumexp(tmp_path: Path) -> None:
    vocab, k = 500, 8
    logits, values, indices, lse = teacher_batch(2, 6, vocab, k, seed=2)
    cache = TeacherCache(tmp_path, k, vocab)
    cache.store([5, 6], values, indices, [6, 6], lse)
    got = cache.lookup([5, 6])
    assert got is not None
    true_tail = 1 - logits.softmax(-1).topk(k, dim=-1).values.sum(-1)
    cached_tail = 1 - (got.values - got.logsumexp[..., None]).exp().sum(-1)
    assert torch.allclose(cached_tail, true_tail, atol=5e-3)
    assert true_tail.min() > 0.05  # a real tail, not a degenerate case


@pytest.mark.parametrize(("vocab", "width"), [(1000, 2), (65536, 2), (65537, 3), (1 << 24, 3), ((1 << 24) + 1, 4)])
def test_compact_indices_round_trip_at_every_width(tmp_path: Path, vocab: int, width: int) -> None:
    k, length = 4, 7
    assert index_bytes_for(vocab) == width
    g = torch.Generator().manual_seed(vocab % 1000)
    indices = torch.randint(0, vocab, (2, length, k), generator=g)
    indices[0, 0] = torch.tensor([0, vocab - 1, vocab // 2, 1])  # the extremes must survive packing
    values = (torch.randn(2, length, k, generator=g) * 5).half()
    lse = values.float().max(-1).values + torch.rand(2, length, generator=g) * 8
    cache = TeacherCache(tmp_path, k, vocab)
    cache.store([1, 2], values, indices, [length, length], lse)
    got = TeacherCache(tmp_path, k, vocab).lookup([1, 2])
    assert got is not None
    assert torch.equal(got.indices, indices)
    assert torch.equal(got.values, values.float())
    assert torch.allclose(got.logsumexp, lse, atol=5e-3)


@pytest.mark.parametrize(("vocab", "k"), [(32000, 64), (50257, 8), (100_000, 16), (151_936, 2), (30522, 1)])
def test_storage_is_within_six_k_bytes_per_token(tmp_path: Path, vocab: int, k: int) -> None:
    b, length = 16, 48
    g = torch.Generator().manual_seed(k)
    indices = torch.randint(0, vocab, (b, length, k), generator=g)
    values = torch.randn(b, length, k, generator=g).half()
    lse = values.float().max(-1).values + 3
    lengths = [length - (i % 5) * 7 for i in range(b)]
    cache = TeacherCache(tmp_path, k, vocab)
    cache.store(list(range(b)), values, indices, lengths, lse)
    tokens = sum(lengths)
    assert cache.bytes_per_token == bytes_per_token(k, vocab) == k * (2 + index_bytes_for(vocab)) + 2
    assert cache.bytes_per_token <= 6 * k
    overhead = cache.disk_bytes() - tokens * cache.bytes_per_token
    assert overhead <= 24 * b + 200  # the record table and one small header
    # On disk, headers and all, still within budget, except where the payload alone spends all 6k
    # bytes (k=1 with 2-byte indices, k=2 with 3-byte ones).
    if cache.bytes_per_token < 6 * k:
        assert cache.disk_bytes() / tokens <= 6 * k, cache.disk_bytes() / tokens


def test_survives_a_restart_and_misses_unknown_ids(tmp_path: Path) -> None:
    _, values, indices, lse = teacher_batch(2, 4, 100, 5)
    TeacherCache(tmp_path, 5, 100).store([1, 2], values, indices, [4, 2], lse)
    again = TeacherCache(tmp_path, 5, 100)
    assert len(again) == 2 and 1 in again and 3 not in again
    assert again.lookup([1, 3]) is None and again.misses == 1
    hit = again.lookup([2])
    assert hit is not None and hit.values.shape == (1, 2, 5)
    # Another teacher (different k or vocabulary) never reads these shards.
    assert TeacherCache(tmp_path, 4, 100).lookup([1]) is None
    assert TeacherCache(tmp_path, 5, 101).lookup([1]) is None
    assert TeacherCache(tmp_path, 5, 100, namespace="other-data").lookup([1]) is None


def test_a_second_writer_is_seen_on_the_next_miss(tmp_path: Path) -> None:
    _, values, indices, lse = teacher_batch(1, 3, 50, 4)
    reader, writer = TeacherCache(tmp_path, 4, 50, rescan_seconds=0), TeacherCache(tmp_path, 4, 50)
    throttled = TeacherCache(tmp_path, 4, 50, rescan_seconds=3600)
    writer.store([9], values, indices, [3], lse)
    assert reader.lookup([9]) is not None
    assert throttled.lookup([9]) is None  # scanned at start, not again within the hour
    throttled.refresh()
    assert throttled.lookup([9]) is not None


def test_writes_are_atomic_and_stale_temp_files_are_cleaned(tmp_path: Path) -> None:
    _, values, indices, lse = teacher_batch(1, 3, 50, 4)
    cache = TeacherCache(tmp_path, 4, 50)
    cache.store([1], values, indices, [3], lse)
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))
    # A crash before the rename leaves a temp file: it is never read, and old ones are removed.
    stale = tmp_path / f"{TMP_PREFIX}shard-crashed{SUFFIX}"
    stale.write_bytes(b"partial")
    fresh = tmp_path / f"{TMP_PREFIX}shard-in-progress{SUFFIX}"
    fresh.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    TeacherCache(tmp_path, 4, 50)
    assert not stale.exists() and fresh.exists()


def test_a_corrupt_record_is_a_miss_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, values, indices, lse = teacher_batch(2, 4, 100, 5)
    cache = TeacherCache(tmp_path, 5, 100)
    bad_shard = cache.store([1, 2], values, indices, [4, 4], lse)
    cache.store([3], values[:1], indices[:1], [4], lse[:1])
    data = bytearray(bad_shard.read_bytes())
    data[-3] ^= 0xFF  # inside example 2's record
    bad_shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="kdistill.trainer.teacher_cache"):
        assert cache.lookup([2]) is None
    assert any("corrupt" in r.getMessage() and bad_shard.name in r.getMessage() for r in caplog.records)
    assert cache.lookup([1]) is None  # the whole shard is distrusted
    assert cache.lookup([3]) is not None  # other shards still serve
    # After a restore the entries can be written again and are served.
    cache.store([1, 2], values, indices, [4, 4], lse)
    assert cache.lookup([1, 2, 3]) is not None


@pytest.mark.parametrize("damage", ["truncate-payload", "truncate-header", "header-bytes", "garbage", "empty"])
def test_damaged_shards_are_skipped_on_start(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    _, values, indices, lse = teacher_batch(2, 6, 100, 5)
    TeacherCache(tmp_path, 5, 100).store([1, 2], values, indices, [6, 6], lse)
    (path,) = shards(tmp_path)
    data = path.read_bytes()
    damaged = {
        "truncate-payload": data[:-10],
        "truncate-header": data[:30],
        "header-bytes": data[:25] + bytes([data[25] ^ 0x55]) + data[26:],
        "garbage": os.urandom(len(data)),
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="kdistill.trainer.teacher_cache"):
        cache = TeacherCache(tmp_path, 5, 100)
        assert cache.lookup([1]) is None
    assert any("skipping shard" in r.getMessage() for r in caplog.records)


def test_pad_to_and_bad_inputs(tmp_path: Path) -> None:
    _, values, indices, lse = teacher_batch(2, 4, 100, 5)
    cache = TeacherCache(tmp_path, 5, 100)
    cache.store([1, 2], values, indices, [4, 2], lse)
    padded = cache.lookup([1, 2], pad_to=8)
    assert padded is not None and padded.values.shape == (2, 8, 5)
    with pytest.raises(ValueError, match="pad_to=3 is shorter"):
        cache.lookup([1], pad_to=3)
    with pytest.raises(ValueError, match=r"values must be \[B=1, L, k=5\]"):
        cache.store([1], values, indices, [4], lse)
    with pytest.raises(ValueError, match="lengths must be 2 values in"):
        cache.store([1, 2], values, indices, [4, 5], lse)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cache.store([1, 2], values, indices + 100, [4, 4], lse)
    with pytest.raises(ValueError, match="not finite in fp16"):
        cache.store([1, 2], values.float() * 1e6, indices, [4, 4], lse)
    with pytest.raises(ValueError, match="top_k"):
        TeacherCache(tmp_path / "x", 0, 100)


def test_repeated_ids_in_one_batch(tmp_path: Path) -> None:
    # Stratified sampling repeats small-tier examples inside a batch: store and lookup must cope.
    _, values, indices, lse = teacher_batch(3, 4, 100, 5)
    values[2], indices[2], lse[2] = values[0], indices[0], lse[0]
    cache = TeacherCache(tmp_path, 5, 100)
    cache.store([7, 8, 7], values, indices, [4, 3, 4], lse)
    got = cache.lookup([7, 8, 7])
    assert got is not None and len(cache) == 2
    assert torch.equal(got.values[0], got.values[2]) and torch.equal(got.indices[2], indices[0])


@pytest.mark.parametrize(("vocab", "width"), [(1000, 2), (70_000, 3)])
def test_lookup_rows_decodes_the_spans_lookup_gives(tmp_path: Path, vocab: int, width: int) -> None:
    """Rows decoded straight into [N, k] equal the per-example lookup's, at both index widths."""
    k = 6
    assert index_bytes_for(vocab) == width
    _, values, indices, lse = teacher_batch(4, 9, vocab, k, seed=3)
    lengths = [9, 1, 5, 7]
    cache = TeacherCache(tmp_path, k, vocab)
    cache.store([7, 8, 9, 10], values, indices, lengths, lse)
    ids, counts = [10, 8, 7, 9], [6, 0, 8, 2]  # example 8 (one token) trains no row
    starts = [0, 0, 8, 6]
    got = cache.lookup_rows(ids, starts, counts, 16)
    want = cache.lookup(ids)
    assert got is not None and want is not None
    for b, (start, count) in enumerate(zip(starts, counts, strict=True)):
        span = slice(start, start + count)
        assert torch.equal(got.values[span], want.values[b, :count])
        assert torch.equal(got.indices[span], want.indices[b, :count])
        assert torch.equal(got.logsumexp[span], want.logsumexp[b, :count])
    assert got.values.dtype == torch.float32 and got.indices.dtype == torch.int64


def test_lookup_rows_misses_and_bad_spans(tmp_path: Path) -> None:
    _, values, indices, lse = teacher_batch(2, 4, 100, 5)
    cache = TeacherCache(tmp_path, 5, 100)
    shard = cache.store([1, 2], values, indices, [4, 3], lse)
    assert cache.lookup_rows([1, 3], [0, 3], [3, 1], 4) is None  # 3 is not cached
    with pytest.raises(ValueError, match="do not tile"):
        cache.lookup_rows([1, 2], [0, 2], [3, 2], 5)  # overlapping
    with pytest.raises(ValueError, match="cover 5 rows, not 6"):
        cache.lookup_rows([1, 2], [0, 3], [3, 2], 6)
    with pytest.raises(ValueError, match="more tokens than cached"):
        cache.lookup_rows([1, 2], [0, 3], [3, 4], 7)
    with pytest.raises(ValueError, match="a start and a count per example"):
        cache.lookup_rows([1, 2], [0], [3, 2], 5)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cache.lookup_rows([1, 2], [0, 3], [3, 2], 5) is None  # a bad checksum is a miss
