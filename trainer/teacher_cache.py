"""On-disk cache of the teacher's top-k logits, reused across epochs and restarts.

Per token it stores the k largest teacher logits and their vocabulary ids, plus what the loss
needs for the mass outside the top k (the log-sum-exp over the whole vocabulary):

====================  ==========================================  ===================
part                  encoding                                    bytes per token
====================  ==========================================  ===================
top-k values          float16                                     2k
top-k indices         uint16 if vocab <= 65536; uint24 (3 bytes,  2k / 3k / 4k
                      little-endian) if <= 2^24; else int32
log-sum-exp           float16 *offset* ``lse - max(stored values)`` 2
====================  ==========================================  ===================

So a token costs 4k+2 bytes (<= 6k for every k >= 1) up to a 65 536 vocabulary, 5k+2 (<= 6k
for k >= 2) up to 16.7 M, and 6k+2 only above that. The log-sum-exp is stored as its offset
from the largest *stored* (already fp16-rounded) value: that offset lies in [0, log V], where
fp16 is accurate to ~0.004, whereas an absolute fp16 log-sum-exp of ~20 would only be
accurate to ~0.008 and would not match the rounded values it is combined with.

Layout: ``root/shard-<time>-<uuid>.kdtc``, one shard per ``store`` call::

    b"KDTCACHE" | u32 version | u32 json length | u32 records | u32 crc32(json + table)
    | header JSON | record table (24 bytes a record) | record payloads

The JSON holds top_k, vocab_size, index width and namespace; the binary table holds per record
(example id, payload offset, tokens, crc32). Overhead is 24 bytes an example plus ~100 a shard,
under 1 byte a token for typical lengths; only where the payload alone spends exactly 6k bytes
(k = 1 with 2-byte indices, k = 2 with 3-byte ones) does that overhead go past 6k on disk.

Shards are written to a temporary file, fsync'ed, renamed into place and the directory
fsync'ed: readers see whole shards or none. Several data-parallel ranks may
write into one root (unique names); each rescans the directory on a miss (at most every
``rescan_seconds``).

Integrity: a shard whose header fails its checksum, or that is shorter than its header says
(truncated), is skipped with a warning when scanned; a record whose checksum fails when read
makes its shard unusable (warning) and the lookup a miss. A miss only costs a teacher forward;
the cache never raises on bad files. Shards with another top_k, vocabulary or namespace are
ignored (a different teacher or dataset).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fsio import replace_file

log = logging.getLogger(__name__)

MAGIC = b"KDTCACHE"
VERSION = 1
# magic, version, header JSON length, record count, crc32 of (header JSON + record table)
_PREAMBLE = struct.Struct("<8sIIII")
# One record: example id, offset from the payload start, tokens, crc32 of the record's bytes.
_RECORD = struct.Struct("<qQII")
SUFFIX = ".kdtc"
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 3600.0


def index_bytes_for(vocab_size: int) -> int:
    if vocab_size <= 1 << 16:
        return 2
    if vocab_size <= 1 << 24:
        return 3
    return 4


def bytes_per_token(top_k: int, vocab_size: int) -> int:
    """On-disk payload bytes of one token (values + indices + log-sum-exp offset)."""
    return top_k * (2 + index_bytes_for(vocab_size)) + 2


def _pack_indices(idx: np.ndarray, width: int) -> bytes:
    if width == 2:
        return idx.astype("<u2").tobytes()
    if width == 3:
        return idx.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    return idx.astype("<i4").tobytes()


def _unpack_indices(raw: bytes, width: int, count: int) -> np.ndarray:
    if width == 2:
        return np.frombuffer(raw, dtype="<u2", count=count).astype(np.int64)
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8, count=3 * count).reshape(-1, 3).astype(np.int64)
        return b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    return np.frombuffer(raw, dtype="<i4", count=count).astype(np.int64)


def _check_spans(n: int, starts: Sequence[int], counts: Sequence[int], rows: int) -> None:
    """The (start, count) spans of ``n`` examples tile ``0 .. rows - 1`` exactly."""
    if len(starts) != n or len(counts) != n:
        raise ValueError(f"need a start and a count per example id, got {len(starts)} and {len(counts)}")
    spans = sorted((int(a), int(c)) for a, c in zip(starts, counts, strict=True) if int(c) != 0)
    edge = 0
    for start, count in spans:
        if count < 0 or start != edge:
            raise ValueError(f"the spans (starts {list(starts)}, counts {list(counts)}) do not tile 0..{rows - 1}")
        edge += count
    if edge != rows:
        raise ValueError(f"the spans cover {edge} rows, not {rows}")


@dataclass
class CachedLogits:
    values: torch.Tensor  # [B, L, k] float32 teacher logits (T=1), zero on padding
    indices: torch.Tensor  # [B, L, k] int64 vocabulary ids, zero on padding
    logsumexp: torch.Tensor  # [B, L] float32 log Σ_vocab exp(logit), zero on padding


@dataclass
class CachedRows:
    values: torch.Tensor  # [N, k] float32 teacher logits (T=1), one row a trained token
    indices: torch.Tensor  # [N, k] int64 vocabulary ids
    logsumexp: torch.Tensor  # [N] float32 log Σ_vocab exp(logit)


@dataclass(frozen=True)
class _Entry:
    shard: str
    offset: int  # absolute, in the shard file
    tokens: int
    crc: int


class TeacherCache:
    def __init__(
        self, root: Path, top_k: int, vocab_size: int, *, namespace: str = "", rescan_seconds: float = 5.0
    ) -> None:
        if top_k < 1 or vocab_size < 1 or top_k > vocab_size:
            raise ValueError(f"need 1 <= top_k <= vocab_size, got top_k={top_k} vocab_size={vocab_size}")
        self.root = Path(root)
        self.top_k = top_k
        self.vocab_size = vocab_size
        self.namespace = namespace
        self.index_bytes = index_bytes_for(vocab_size)
        self.bytes_per_token = bytes_per_token(top_k, vocab_size)
        self.hits = 0
        self.misses = 0
        self._entries: dict[int, _Entry] = {}
        self._known: set[str] = set()  # shard names scanned (good or bad)
        # Every lookup misses in the first epoch: rescanning the directory for other ranks'
        # shards at most this often keeps that cheap.
        self.rescan_seconds = rescan_seconds
        self._last_scan = float("-inf")
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()
        self.refresh()

    # -- scanning ------------------------------------------------------------------------------
    def _remove_stale_tmp(self) -> None:
        # A crash between write and rename leaves a temp file; another rank may be mid-write on a
        # fresh one, so only old ones go.
        now = time.time()
        for p in self.root.glob(TMP_PREFIX + "*"):
            try:
                if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    p.unlink()
            except OSError:
                pass

    def refresh(self) -> int:
        """Index shards that appeared since the last scan; returns how many were added."""
        added = 0
        self._last_scan = time.monotonic()
        try:
            names = sorted(p.name for p in self.root.glob("shard-*" + SUFFIX))
        except OSError as exc:
            log.warning("teacher cache: cannot list %s: %s", self.root, exc)
            return 0
        for name in names:  # sorted by time: a later shard's copy of an id wins
            if name in self._known:
                continue
            self._known.add(name)
            if self._index_shard(name):
                added += 1
        return added

    def _index_shard(self, name: str) -> bool:
        path = self.root / name
        try:
            with path.open("rb") as f:
                pre = f.read(_PREAMBLE.size)
                if len(pre) < _PREAMBLE.size:
                    raise ValueError("truncated preamble")
                magic, version, jlen, nrec, hcrc = _PREAMBLE.unpack(pre)
                if magic != MAGIC or version != VERSION:
                    raise ValueError(f"not a version-{VERSION} cache shard")
                raw = f.read(jlen + nrec * _RECORD.size)
                if len(raw) < jlen + nrec * _RECORD.size or zlib.crc32(raw) != hcrc:
                    raise ValueError("header checksum mismatch")
            size = path.stat().st_size
            header = json.loads(raw[:jlen])
            if (header.get("top_k"), header.get("vocab_size"), header.get("namespace")) != (
                self.top_k,
                self.vocab_size,
                self.namespace,
            ):
                log.info("teacher cache: ignoring shard %s from another teacher/config", path)
                return False
            base = _PREAMBLE.size + len(raw)
            entries = {
                ex_id: _Entry(name, base + off, n, crc) for ex_id, off, n, crc in _RECORD.iter_unpack(raw[jlen:])
            }
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("teacher cache: skipping shard %s: %s", path, exc)
            return False
        end = max((e.offset + e.tokens * self.bytes_per_token for e in entries.values()), default=0)
        if end > size:
            log.warning("teacher cache: skipping shard %s: truncated (%d of %d bytes)", path, size, end)
            return False
        self._entries.update(entries)
        return True

    def _forget_shard(self, name: str) -> None:
        for ex_id in [i for i, e in self._entries.items() if e.shard == name]:
            del self._entries[ex_id]

    def __contains__(self, example_id: int) -> bool:
        return example_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # -- reading -------------------------------------------------------------------------------
    def lookup(self, example_ids: Sequence[int], *, pad_to: int | None = None) -> CachedLogits | None:
        """Cached top-k for every id, padded to the longest (or ``pad_to``); None unless all hit."""
        ids = [int(i) for i in example_ids]
        if not ids:
            raise ValueError("lookup: no example ids")
        if not self._has_all(ids):
            return None
        entries = [self._entries[i] for i in ids]
        length = max(e.tokens for e in entries)
        if pad_to is not None:
            if pad_to < length:
                raise ValueError(f"pad_to={pad_to} is shorter than a cached example ({length} tokens)")
            length = pad_to
        k = self.top_k
        values = np.zeros((len(ids), length, k), dtype=np.float32)
        indices = np.zeros((len(ids), length, k), dtype=np.int64)
        lse = np.zeros((len(ids), length), dtype=np.float32)

        def place(row: int, raw: bytes, tokens: int) -> None:
            v, ix, off = self._decode(raw, tokens)
            values[row, :tokens] = v
            indices[row, :tokens] = ix
            lse[row, :tokens] = off + v.max(axis=1)

        if not self._read(entries, place):
            return None
        return CachedLogits(torch.from_numpy(values), torch.from_numpy(indices), torch.from_numpy(lse))

    def lookup_rows(
        self, example_ids: Sequence[int], starts: Sequence[int], counts: Sequence[int], rows: int
    ) -> CachedRows | None:
        """The first ``counts[b]`` cached tokens of example ``b`` decoded straight into rows
        ``starts[b] .. starts[b] + counts[b] - 1`` of [rows, k] arrays (the trained rows of a
        packed micro-batch), with no per-example layout in between; None unless all hit. The
        spans must tile ``0 .. rows - 1`` exactly."""
        ids = [int(i) for i in example_ids]
        if not ids:
            raise ValueError("lookup_rows: no example ids")
        _check_spans(len(ids), starts, counts, rows)
        if not self._has_all(ids):
            return None
        entries = [self._entries[i] for i in ids]
        short = [(i, e.tokens) for i, e, c in zip(ids, entries, counts, strict=True) if c > e.tokens]
        if short:
            raise ValueError(f"asked for more tokens than cached (example id, cached tokens): {short}")
        k = self.top_k
        values = np.empty((rows, k), dtype=np.float32)
        indices = np.empty((rows, k), dtype=np.int64)
        lse = np.empty(rows, dtype=np.float32)
        where = dict(enumerate(zip(starts, counts, strict=True)))

        def place(row: int, raw: bytes, tokens: int) -> None:
            start, count = (int(x) for x in where[row])
            if count == 0:
                return
            n = count * k
            stop = start + count
            top = np.frombuffer(raw, dtype="<f2", count=n).reshape(count, k)
            values[start:stop] = top  # float16 -> float32 in the copy
            i_begin = 2 * tokens * k
            if self.index_bytes == 2:
                indices[start:stop] = np.frombuffer(raw, dtype="<u2", count=n, offset=i_begin).reshape(count, k)
            else:
                width = self.index_bytes * n
                indices[start:stop] = _unpack_indices(raw[i_begin : i_begin + width], self.index_bytes, n).reshape(
                    count, k
                )
            off = np.frombuffer(raw, dtype="<f2", count=count, offset=i_begin + self.index_bytes * tokens * k)
            lse[start:stop] = off.astype(np.float32) + values[start:stop].max(axis=1)

        if not self._read(entries, place):
            return None
        return CachedRows(torch.from_numpy(values), torch.from_numpy(indices), torch.from_numpy(lse))

    def _has_all(self, ids: list[int]) -> bool:
        """Whether every id is cached, rescanning the directory (at most every ``rescan_seconds``)
        for shards another rank wrote; counts a miss otherwise."""
        if any(i not in self._entries for i in ids):
            if time.monotonic() - self._last_scan >= self.rescan_seconds:
                self.refresh()
            if any(i not in self._entries for i in ids):
                self.misses += 1
                return False
        return True

    def _read(self, entries: list[_Entry], place: Callable[[int, bytes, int], None]) -> bool:
        """Read and check every entry's record, handing ``place(row, raw, tokens)`` each one; on
        a bad checksum or a failed read the shard is dropped and the lookup is a miss (False)."""
        handles: dict[str, Any] = {}
        try:
            for row, e in enumerate(entries):
                f = handles.get(e.shard)
                if f is None:
                    f = handles[e.shard] = (self.root / e.shard).open("rb")
                f.seek(e.offset)
                raw = f.read(e.tokens * self.bytes_per_token)
                if len(raw) != e.tokens * self.bytes_per_token or zlib.crc32(raw) != e.crc:
                    log.warning(
                        "teacher cache: shard %s is corrupt (record checksum); not using it", self.root / e.shard
                    )
                    self._forget_shard(e.shard)
                    self.misses += 1
                    return False
                place(row, raw, e.tokens)
        except OSError as exc:
            log.warning("teacher cache: read failed (%s); treating as a miss", exc)
            for name in handles:
                self._forget_shard(name)
            self.misses += 1
            return False
        finally:
            for f in handles.values():
                f.close()
        self.hits += 1
        return True

    def _decode(self, raw: bytes, tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = tokens * self.top_k
        v_end = 2 * n
        i_end = v_end + self.index_bytes * n
        values = np.frombuffer(raw[:v_end], dtype="<f2").astype(np.float32).reshape(tokens, self.top_k)
        indices = _unpack_indices(raw[v_end:i_end], self.index_bytes, n).reshape(tokens, self.top_k)
        offset = np.frombuffer(raw[i_end:], dtype="<f2", count=tokens).astype(np.float32)
        return values, indices, offset

    # -- writing -------------------------------------------------------------------------------
    def store(
        self,
        example_ids: Sequence[int],
        values: torch.Tensor,
        indices: torch.Tensor,
        lengths: Sequence[int],
        logsumexp: torch.Tensor,
    ) -> Path:
        """Write one shard with the first ``lengths[b]`` tokens of each example; returns its path."""
        ids = [int(i) for i in example_ids]
        b = len(ids)
        if b == 0:
            raise ValueError("store: no example ids")
        if values.dim() != 3 or values.shape[0] != b or values.shape[2] != self.top_k:
            raise ValueError(f"values must be [B={b}, L, k={self.top_k}], got {tuple(values.shape)}")
        if tuple(indices.shape) != tuple(values.shape):
            raise ValueError(f"indices shape {tuple(indices.shape)} != values shape {tuple(values.shape)}")
        if tuple(logsumexp.shape) != tuple(values.shape[:2]):
            raise ValueError(f"logsumexp must be [B, L]={tuple(values.shape[:2])}, got {tuple(logsumexp.shape)}")
        if len(lengths) != b or any(not 1 <= int(n) <= values.shape[1] for n in lengths):
            raise ValueError(f"lengths must be {b} values in [1, {values.shape[1]}], got {list(lengths)}")
        v16 = values.detach().to(torch.float16).cpu().numpy()
        ix = indices.detach().to(torch.int64).cpu().numpy()
        lse = logsumexp.detach().to(torch.float32).cpu().numpy()
        header_records: list[tuple[int, int, int, int]] = []
        blobs: list[bytes] = []
        offset = 0
        for row, (ex_id, n) in enumerate(zip(ids, lengths, strict=True)):
            n = int(n)
            v, i, s = v16[row, :n], ix[row, :n], lse[row, :n]
            if not np.isfinite(v).all() or not np.isfinite(s).all():
                raise ValueError(f"example {ex_id}: teacher logits are not finite in fp16 (|logit| > 65504?)")
            if (i < 0).any() or (i >= self.vocab_size).any():
                raise ValueError(f"example {ex_id}: index outside the vocabulary [0, {self.vocab_size})")
            lse_offset = (s - v.astype(np.float32).max(axis=1)).astype("<f2")
            blob = v.astype("<f2").tobytes() + _pack_indices(i, self.index_bytes) + lse_offset.tobytes()
            header_records.append((ex_id, offset, n, zlib.crc32(blob)))
            blobs.append(blob)
            offset += len(blob)
        return self._write_shard(header_records, blobs)

    def _write_shard(self, records: list[tuple[int, int, int, int]], blobs: list[bytes]) -> Path:
        meta = json.dumps(
            {
                "top_k": self.top_k,
                "vocab_size": self.vocab_size,
                "index_bytes": self.index_bytes,
                "namespace": self.namespace,
            }
        ).encode()
        table = b"".join(_RECORD.pack(*r) for r in records)
        header = meta + table
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        tmp = self.root / f"{TMP_PREFIX}{name}"
        final = self.root / name
        with tmp.open("wb") as f:
            f.write(_PREAMBLE.pack(MAGIC, VERSION, len(meta), len(records), zlib.crc32(header)))
            f.write(header)
            for blob in blobs:
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, final)
        self._known.add(name)
        base = _PREAMBLE.size + len(header)
        for ex_id, off, n, crc in records:
            self._entries[ex_id] = _Entry(name, base + off, n, crc)
        return final

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("shard-*" + SUFFIX))
