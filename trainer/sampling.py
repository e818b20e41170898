"""Frequency tiers and the batch sampler: uniform or stratified, length-bucketed, exactly resumable.

Tiers (``assign_tiers``; 0 = head, 1 = torso, 2 = tail), from the spec's shares (head, torso):

- **sequence-classification: label frequency.** Labels are sorted by example count, most
  frequent first (ties: lower label id first). Walking that list, a label is *head* while the
  examples of the labels before it cover less than ``head`` of all examples, *torso* while they
  cover less than ``head + torso``, and *tail* after. The first label is always head. Each
  example takes its label's tier, so a tier holds whole labels.
- **causal-lm: token rarity.** Over the training examples, the unigram frequency of each token
  id is p(t) = count(t) / total tokens. An example's rarity is the mean of -log p(t) over its
  tokens. Examples sorted by rarity (ascending; ties by position): the first
  ``round(head * N)`` are head (the most common text), up to ``round((head + torso) * N)``
  torso, the rest tail (rare vocabulary: code, names, symbols).

Batches (``BatchSampler``) are *global micro-batches* of ``batch_size`` example positions;
data-parallel rank r of world w takes every w-th entry of the length-sorted global batch, so
each rank sees a similar length mix. The global stream depends only on the seed and the data,
never on the world size.

- **uniform**: one stream of fresh shuffles of all examples (every example once per pass),
  cut into batches; nothing is dropped at a pass boundary.
- **stratified**: batch size B is split over the tiers as round(share * B) with
  largest-remainder rounding (remainders ties go to the earlier tier), so the counts always sum
  to B; a tier with no examples gives its share to the others in proportion. Each tier is read as
  its own stream of fresh shuffles. A tier smaller than its per-batch count wraps around inside
  a batch, so its examples repeat: sampling with replacement where the tier is too small, which
  is the oversampling stratification asks for. With tiny batches a small share can round to 0
  (B=4, tail 0.1 gives 0 tail examples per batch): use batches of >= 1/share examples.
- **length bucketing**: batches are built ``window_batches`` at a time. In a window, each tier's
  drawn examples are sorted by length and dealt out in consecutive chunks, so batch j holds the
  j-th length quantile of every tier (tier counts unchanged), then the window's batch order is
  shuffled. Padding shrinks; which examples are drawn does not change. Side effects: copies of
  one example have one length, so a tier too small for the window's demand has its repeats
  grouped (a batch may hold several copies of one tail example; over the window each member
  still appears equally often), and at a pass boundary an example may meet its own next-pass
  copy in one batch.

Exact resume: batch k is a pure function of (seed, data, k). ``state_dict()`` holds k (the
number of batches already handed out) plus a fingerprint of the data and settings;
``load_state_dict`` checks them and continues at batch k, so a resumed run gets exactly the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from .data import TokenizedExample

Strategy = Literal["uniform", "stratified"]
Task = Literal["causal-lm", "sequence-classification"]
HEAD, TORSO, TAIL = 0, 1, 2
FLOAT_TOLERANCE = 1e-6
STATE_VERSION = 1
_STREAM_TAG, _ORDER_TAG = 0, 1
_PERM_CACHE = 6


def _check_shares(head: float, torso: float) -> None:
    if head < 0 or torso < 0 or head + torso > 1 + FLOAT_TOLERANCE:
        raise ValueError(f"tier shares must be >= 0 with head + torso <= 1, got head={head} torso={torso}")


def token_rarity(examples: Sequence[TokenizedExample]) -> np.ndarray:
    """Mean -log unigram frequency of each example's tokens, frequencies over ``examples``."""
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError("token_rarity: an example has no tokens")
    ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int64, count=int(lengths.sum()))
    counts = np.bincount(ids)
    surprisal = -np.log(counts[ids] / ids.size)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return np.add.reduceat(surprisal, starts) / lengths


def assign_tiers(examples: Sequence[TokenizedExample], task: Task, shares: Sequence[float] = (0.7, 0.2)) -> list[int]:
    """Tier of each example (0 head, 1 torso, 2 tail); see the module docstring for the rules.

    ``shares`` is (head, torso) or (head, torso, tail); tail is always the remainder.
    """
    if len(shares) not in (2, 3):
        raise ValueError(f"shares must be (head, torso) or (head, torso, tail), got {tuple(shares)}")
    head, torso = float(shares[0]), float(shares[1])
    _check_shares(head, torso)
    n = len(examples)
    if n == 0:
        return []
    if task == "sequence-classification":
        labels = [e.label for e in examples if e.label is not None]
        if len(labels) != len(examples):
            raise ValueError("assign_tiers: sequence-classification needs a label on every example")
        counts: dict[int, int] = {}
        for lab in labels:
            counts[lab] = counts.get(lab, 0) + 1
        tier_of: dict[int, int] = {}
        before = 0
        for lab, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if before < head * n - FLOAT_TOLERANCE:
                tier_of[lab] = HEAD
            elif before < (head + torso) * n - FLOAT_TOLERANCE:
                tier_of[lab] = TORSO
            else:
                tier_of[lab] = TAIL
            before += c
        return [tier_of[lab] for lab in labels]
    if task == "causal-lm":
        order = np.argsort(token_rarity(examples), kind="stable")
        b1, b2 = round(head * n), round((head + torso) * n)
        tiers = np.full(n, TAIL, dtype=np.int64)
        tiers[order[:b1]] = HEAD
        tiers[order[b1:b2]] = TORSO
        return tiers.tolist()
    raise ValueError(f"unknown task {task!r}: expected 'causal-lm' or 'sequence-classification'")


def tier_counts(batch_size: int, shares: Sequence[float]) -> list[int]:
    """round(share * batch_size) per tier by largest remainder; sums to batch_size exactly."""
    total = float(sum(shares))
    if any(s < 0 for s in shares) or total <= 0:
        raise ValueError(f"shares must be >= 0 with a positive sum, got {tuple(shares)}")
    exact = [batch_size * s / total for s in shares]
    counts = [math.floor(x + FLOAT_TOLERANCE) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: batch_size - sum(counts)]:
        counts[i] += 1
    return counts


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


class BatchSampler:
    """Endless iterator of this rank's example positions, one list per global micro-batch."""

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        batch_size: int,
        *,
        strategy: Strategy,
        tiers: Sequence[int] | None,
        shares: tuple[float, float, float],
        seed: int,
        bucket_by_length: bool = True,
        rank: int = 0,
        world: int = 1,
        window_batches: int = 32,
    ) -> None:
        n = len(examples)
        if n == 0:
            raise ValueError("BatchSampler needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        if batch_size % world:
            raise ValueError(f"global micro-batch {batch_size} does not split evenly over {world} data ranks")
        if window_batches < 1:
            raise ValueError(f"window_batches must be >= 1, got {window_batches}")
        self.lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
        if strategy == "uniform":
            groups = [np.arange(n, dtype=np.int64)]
            counts = [batch_size]
            tier_arr = np.zeros(n, dtype=np.int64)
        elif strategy == "stratified":
            if tiers is None or len(tiers) != n:
                raise ValueError(
                    f"stratified sampling needs one tier per example ({n}), got {None if tiers is None else len(tiers)}"
                )
            if len(shares) != 3 or abs(sum(shares) - 1.0) > FLOAT_TOLERANCE:
                raise ValueError(f"shares must be (head, torso, tail) summing to 1, got {tuple(shares)}")
            tier_arr = np.asarray(tiers, dtype=np.int64)
            if ((tier_arr < 0) | (tier_arr > 2)).any():
                raise ValueError("tiers must be 0 (head), 1 (torso) or 2 (tail)")
            groups = [np.flatnonzero(tier_arr == t) for t in (HEAD, TORSO, TAIL)]
            # An empty tier cannot supply its share: the others absorb it in proportion.
            live = [s if g.size else 0.0 for s, g in zip(shares, groups, strict=True)]
            if sum(live) <= 0:
                raise ValueError(f"no examples in any tier with a positive share {tuple(shares)}")
            counts = tier_counts(batch_size, live)
        else:
            raise ValueError(f"unknown sampling strategy {strategy!r}: expected 'uniform' or 'stratified'")
        self.num_examples = n
        self.batch_size = batch_size
        self.strategy = strategy
        self.seed = int(seed) % 2**63
        self.bucket_by_length = bucket_by_length
        self.rank, self.world = rank, world
        self.window_batches = window_batches
        self.groups = groups
        self.counts = counts
        self._fingerprint = zlib.crc32(self.lengths.tobytes() + tier_arr.tobytes())
        self._next = 0
        self._window: tuple[int, list[np.ndarray]] | None = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    # -- the deterministic global stream -------------------------------------------------------
    def _draw(self, group: int, start: int, stop: int) -> np.ndarray:
        """Stream positions [start, stop) of a tier: concatenated seeded shuffles of its members."""
        members = self.groups[group]
        size = members.size
        parts = []
        for p in range(start // size, (stop - 1) // size + 1):
            perm = self._pass_order(group, p)
            lo, hi = max(start - p * size, 0), min(stop - p * size, size)
            parts.append(perm[lo:hi])
        return np.concatenate(parts)

    def _pass_order(self, group: int, p: int) -> np.ndarray:
        # Consecutive windows mostly read the same pass: keep the last few shuffles.
        key = (group, p)
        perm = self._perms.get(key)
        if perm is None:
            members = self.groups[group]
            perm = members[_rng(self.seed, _STREAM_TAG, group, p).permutation(members.size)]
            if len(self._perms) >= _PERM_CACHE:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return perm

    def _build_window(self, w: int) -> list[np.ndarray]:
        nb = self.window_batches
        pieces: list[list[np.ndarray]] = [[] for _ in range(nb)]
        for g, c in enumerate(self.counts):
            if c == 0:
                continue
            drawn = self._draw(g, w * nb * c, (w + 1) * nb * c)
            if self.bucket_by_length:
                drawn = drawn[np.argsort(self.lengths[drawn], kind="stable")]
            for j in range(nb):
                pieces[j].append(drawn[j * c : (j + 1) * c])
        batches = [np.concatenate(p) for p in pieces]
        if self.bucket_by_length:
            batches = [b[np.argsort(self.lengths[b], kind="stable")] for b in batches]
            order = _rng(self.seed, _ORDER_TAG, w).permutation(nb)
            batches = [batches[i] for i in order]
        return batches

    def global_batch(self, k: int) -> list[int]:
        """The k-th global micro-batch (all ranks' positions)."""
        if k < 0:
            raise ValueError(f"batch index must be >= 0, got {k}")
        w, j = divmod(k, self.window_batches)
        if self._window is None or self._window[0] != w:
            self._window = (w, self._build_window(w))
        return self._window[1][j].tolist()

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        batch = self.global_batch(self._next)
        self._next += 1
        return batch[self.rank :: self.world]

    # -- exact resume ---------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "strategy": self.strategy,
            "counts": list(self.counts),
            "seed": self.seed,
            "bucket_by_length": self.bucket_by_length,
            "window_batches": self.window_batches,
            "fingerprint": self._fingerprint,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches handed out so far; world size free (any world may resume)."""
        return {"version": STATE_VERSION, "batches": self._next, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self._settings()
        differ = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if differ:
            raise ValueError("sampler state does not match this data/config: " + "; ".join(differ))
        batches = state.get("batches")
        if not isinstance(batches, int) or batches < 0:
            raise ValueError(f"sampler state has a bad batch count {batches!r}")
        self._next = batches


def stage_sampler(
    examples: Sequence[Any],
    spec: Any,
    *,
    data_rank: int,
    plan: Sequence[Any],
    objective: str,
    start_step: int,
) -> tuple[BatchSampler, int]:
    """The sampler of an objective that draws from its own examples (sequence, on-policy):
    uniform and length-bucketed over this data rank's share, positioned where a run that starts
    at ``start_step`` stands (after the micro-batches of that objective's steps already taken,
    so a resume draws the batches an uninterrupted run would). Returns it and that count."""
    d = spec.distillation
    sampler = BatchSampler(
        examples,
        d.batch_size // d.gradient_accumulation_steps,
        strategy="uniform",
        tiers=None,
        shares=(1.0, 0.0, 0.0),
        seed=d.seed,
        bucket_by_length=True,
        rank=data_rank,
        world=spec.parallelism.student.data,
    )
    done = sum(max(0, min(start_step, p.end) - p.start) for p in plan if objective in p.objectives)
    batches = done * d.gradient_accumulation_steps
    state = sampler.state_dict()
    state["batches"] = batches
    sampler.load_state_dict(state)
    return sampler, batches
