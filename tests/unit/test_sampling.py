"""Tiers, stratified and uniform batches, length bucketing, data-parallel slices, exact resume."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import numpy as np
import pytest

from kdistill.trainer.batching import padding_efficiency
from kdistill.trainer.data import TokenizedExample
from kdistill.trainer.sampling import HEAD, TAIL, TORSO, BatchSampler, assign_tiers, tier_counts, token_rarity

SHARES = (0.7, 0.2, 0.1)


def make_examples(n: int, seed: int = 0, max_len: int = 120) -> list[TokenizedExample]:
    rng = random.Random(seed)
    # Long-tailed labels and widely spread lengths, like real data.
    labels = [0] * 50 + [1] * 25 + [2] * 12 + [3] * 6 + [4] * 4 + [5] * 3
    return [
        TokenizedExample(i, [rng.randrange(50) for _ in range(rng.randint(1, max_len))], rng.choice(labels))
        for i in range(n)
    ]


def sampler(examples: list[TokenizedExample], **kw: object) -> BatchSampler:
    args: dict[str, object] = dict(strategy="stratified", shares=SHARES, seed=3, batch_size=16)
    args.update(kw)
    if args["strategy"] == "stratified" and "tiers" not in args:
        args["tiers"] = assign_tiers(examples, "sequence-classification", SHARES[:2])
    args.setdefault("tiers", None)
    return BatchSampler(examples, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("batch", "shares", "expected"),
    [
        (32, SHARES, [23, 6, 3]),  # 22.4, 6.4, 3.2 -> floors 22, 6, 3; one left: largest remainder (head .4)
        (10, SHARES, [7, 2, 1]),
        (4, SHARES, [3, 1, 0]),  # 2.8, 0.8, 0.4: the two leftovers go to the .8 remainders
        (10, (0.5, 0.0, 0.5), [5, 0, 5]),
        (3, (1 / 3, 1 / 3, 1 / 3), [1, 1, 1]),
        (7, (0.5, 0.25, 0.25), [3, 2, 2]),  # 3.5, 1.75, 1.75: leftovers to the .75 remainders, not .5
        (5, (0.5, 0.5, 0.0), [3, 2, 0]),  # equal remainders: the earlier tier first
    ],
)
def test_tier_counts_largest_remainder(batch: int, shares: tuple[float, ...], expected: list[int]) -> None:
    counts = tier_counts(batch, shares)
    assert counts == expected
    assert sum(counts) == batch
    assert all(abs(c - batch * s / sum(shares)) < 1 for c, s in zip(counts, shares, strict=True))


def test_classification_tiers_follow_label_frequency() -> None:
    # Label counts 50, 30, 10, 5, 3, 2 (N=100). Labels before: 0, 50, 80, 90, 95, 98.
    labels = [0] * 50 + [1] * 30 + [2] * 10 + [3] * 5 + [4] * 3 + [5] * 2
    random.Random(0).shuffle(labels)
    ex = [TokenizedExample(i, [1], lab) for i, lab in enumerate(labels)]
    tiers = assign_tiers(ex, "sequence-classification", (0.7, 0.2))
    want = {0: HEAD, 1: HEAD, 2: TORSO, 3: TAIL, 4: TAIL, 5: TAIL}
    assert tiers == [want[lab] for lab in labels]
    # Equal counts: the lower label id is the more frequent one.
    tie = [TokenizedExample(i, [1], lab) for i, lab in enumerate([1, 0, 1, 0])]
    assert assign_tiers(tie, "sequence-classification", (0.5, 0.5)) == [TORSO, HEAD, TORSO, HEAD]
    with pytest.raises(ValueError, match="label on every example"):
        assign_tiers([TokenizedExample(0, [1], None)], "sequence-classification", (0.7, 0.2))


def test_token_rarity_is_mean_negative_log_unigram_frequency() -> None:
    ex = [TokenizedExample(0, [1, 1, 2], None), TokenizedExample(1, [1, 3], None)]
    # Frequencies over the 5 tokens: p(1)=3/5, p(2)=1/5, p(3)=1/5.
    want = [(-2 * math.log(3 / 5) - math.log(1 / 5)) / 3, (-math.log(3 / 5) - math.log(1 / 5)) / 2]
    assert np.allclose(token_rarity(ex), want)


def test_causal_lm_tiers_put_rare_vocabulary_in_the_tail() -> None:
    rng = random.Random(1)
    common = [TokenizedExample(i, [rng.randrange(5) for _ in range(20)], None) for i in range(80)]
    rare = [TokenizedExample(80 + i, [1000 + rng.randrange(400) for _ in range(20)], None) for i in range(20)]
    mixed = common + rare
    order = list(range(100))
    rng.shuffle(order)
    ex = [mixed[i] for i in order]
    tiers = assign_tiers(ex, "causal-lm", (0.7, 0.2, 0.1))
    assert Counter(tiers) == {HEAD: 70, TORSO: 20, TAIL: 10}
    assert all(ex[i].index >= 80 for i, t in enumerate(tiers) if t == TAIL)
    assert all(ex[i].index < 80 for i, t in enumerate(tiers) if t == HEAD)
    with pytest.raises(ValueError, match="unknown task"):
        assign_tiers(ex, "translation", (0.7, 0.2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head \\+ torso <= 1"):
        assign_tiers(ex, "causal-lm", (0.9, 0.2))


def test_every_stratified_batch_draws_each_tiers_share() -> None:
    ex = make_examples(400)
    tiers = assign_tiers(ex, "sequence-classification", SHARES[:2])
    assert {HEAD, TORSO, TAIL} <= set(tiers)
    for batch_size in (10, 16, 32):
        s = sampler(ex, tiers=tiers, batch_size=batch_size)
        want = tier_counts(batch_size, SHARES)
        for _ in range(60):
            batch = next(s)
            assert len(batch) == batch_size
            got = Counter(tiers[p] for p in batch)
            assert [got[t] for t in (HEAD, TORSO, TAIL)] == want


def test_a_small_tier_is_sampled_with_replacement_and_fully_covered() -> None:
    ex = make_examples(60)
    tiers = [HEAD] * 58 + [TAIL, TAIL]
    for bucket in (False, True):
        # 4 tail slots a batch, 2 tail examples: each must repeat.
        s = sampler(ex, tiers=tiers, batch_size=20, shares=(0.8, 0.0, 0.2), window_batches=10, bucket_by_length=bucket)
        window = [next(s) for _ in range(10)]
        tails = [[p for p in b if tiers[p] == TAIL] for b in window]
        assert all(len(t) == 4 for t in tails)
        assert Counter(p for t in tails for p in t) == {58: 20, 59: 20}
        if not bucket:  # unbucketed, each batch reads the tier's shuffles in turn
            assert all(Counter(t) == {58: 2, 59: 2} for t in tails)


def test_an_empty_tier_gives_its_share_to_the_others() -> None:
    ex = make_examples(50)
    tiers = [HEAD] * 40 + [TAIL] * 10  # no torso
    s = sampler(ex, tiers=tiers, batch_size=10)
    assert s.counts == tier_counts(10, (0.7, 0.0, 0.1)) == [9, 0, 1]
    batch = next(s)
    assert sum(tiers[p] == TAIL for p in batch) == 1


def test_uniform_covers_every_example_once_per_pass() -> None:
    ex = make_examples(96)
    for bucket in (True, False):
        s = sampler(ex, strategy="uniform", batch_size=8, window_batches=12, bucket_by_length=bucket)
        first_pass = [p for _ in range(12) for p in next(s)]
        assert sorted(first_pass) == list(range(96))
        second_pass = [p for _ in range(12) for p in next(s)]
        assert sorted(second_pass) == list(range(96))
        assert first_pass != second_pass


def test_length_bucketing_cuts_padding_without_changing_what_is_drawn() -> None:
    ex = make_examples(600, max_len=256)
    lengths = [len(e.input_ids) for e in ex]
    for strategy in ("uniform", "stratified"):
        on = sampler(ex, strategy=strategy, batch_size=16, window_batches=20, bucket_by_length=True)
        off = sampler(ex, strategy=strategy, batch_size=16, window_batches=20, bucket_by_length=False)
        b_on = [next(on) for _ in range(100)]  # five whole windows
        b_off = [next(off) for _ in range(100)]
        assert sorted(p for b in b_on for p in b) == sorted(p for b in b_off for p in b)
        eff_on = padding_efficiency([[lengths[p] for p in b] for b in b_on])
        eff_off = padding_efficiency([[lengths[p] for p in b] for b in b_off])
        assert eff_on > eff_off + 0.2, (strategy, eff_on, eff_off)
        assert eff_on > 0.85


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    ex = make_examples(200)
    a, b, c = sampler(ex, seed=5), sampler(ex, seed=5), sampler(ex, seed=6)
    seq_a = [next(a) for _ in range(20)]
    assert seq_a == [next(b) for _ in range(20)]
    assert seq_a != [next(c) for _ in range(20)]


@pytest.mark.parametrize("strategy", ["uniform", "stratified"])
@pytest.mark.parametrize("stop_after", [0, 1, 31, 32, 45])
def test_resume_from_state_continues_exactly(strategy: str, stop_after: int) -> None:
    ex = make_examples(300)
    uninterrupted = sampler(ex, strategy=strategy, window_batches=32)
    expected = [next(uninterrupted) for _ in range(stop_after + 40)]

    first = sampler(ex, strategy=strategy, window_batches=32)
    got = [next(first) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # as it travels in a checkpoint
    del first
    resumed = sampler(ex, strategy=strategy, window_batches=32)
    next(resumed)  # a fresh process may have touched its sampler before restoring
    resumed.load_state_dict(state)
    it = iter(resumed)
    got += [next(it) for _ in range(40)]
    assert got == expected


def test_data_parallel_ranks_split_each_global_batch() -> None:
    ex = make_examples(300)
    world = 4
    ranks = [sampler(ex, batch_size=16, rank=r, world=world) for r in range(world)]
    whole = sampler(ex, batch_size=16)
    lengths = [len(e.input_ids) for e in ex]
    for _ in range(20):
        global_batch = next(whole)
        parts = [next(r) for r in ranks]
        assert all(len(p) == 4 for p in parts)
        assert sorted(p for part in parts for p in part) == sorted(global_batch)
        # Strided over the length-sorted batch: every rank gets one of the w longest examples, so no
        # rank pads far beyond the others (a contiguous split would leave rank 0 the short ones).
        top = sorted(lengths[p] for p in global_batch)[-world]
        assert all(max(lengths[p] for p in part) >= top for part in parts)


def test_resume_at_another_world_size_continues_the_same_global_stream() -> None:
    ex = make_examples(300)
    one = sampler(ex, batch_size=16)
    for _ in range(7):
        next(one)
    state = one.state_dict()
    expected = next(one)
    halves = [sampler(ex, batch_size=16, rank=r, world=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert sorted(next(halves[0]) + next(halves[1])) == sorted(expected)


def test_state_from_other_data_or_settings_is_refused() -> None:
    ex = make_examples(300)
    state = sampler(ex).state_dict()
    with pytest.raises(ValueError, match="num_examples: saved 300, now 299"):
        sampler(ex[:299]).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        sampler(ex, batch_size=8).load_state_dict(state)
    changed = [TokenizedExample(e.index, [*e.input_ids, 1], e.label) for e in ex]
    with pytest.raises(ValueError, match="fingerprint"):
        sampler(changed, tiers=assign_tiers(ex, "sequence-classification", SHARES[:2])).load_state_dict(state)
    with pytest.raises(ValueError, match="bad batch count"):
        sampler(ex).load_state_dict({**state, "batches": -1})


def test_bad_settings_are_rejected() -> None:
    ex = make_examples(20)
    with pytest.raises(ValueError, match="does not split evenly over 3 data ranks"):
        sampler(ex, batch_size=16, world=3)
    with pytest.raises(ValueError, match="one tier per example"):
        BatchSampler(ex, 4, strategy="stratified", tiers=None, shares=SHARES, seed=0)
    with pytest.raises(ValueError, match="summing to 1"):
        sampler(ex, shares=(0.5, 0.2, 0.1))
    with pytest.raises(ValueError, match="unknown sampling strategy"):
        sampler(ex, strategy="random")
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        sampler(ex, rank=2, world=2)
    with pytest.raises(ValueError, match="no examples in any tier"):
        sampler(ex, tiers=[HEAD] * 20, shares=(0.0, 0.0, 1.0))
