"""The teacher split by layers over real gloo processes gives the unsplit teacher's logits,
with about 1/S of its parameters on each rank."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.trainer.parallel.stages import StageCosts, balance_layers, stage_costs, unique_param_bytes

from .harness import run_ranks
from .models import tiny_model


@pytest.mark.parametrize(("family", "world", "stages"), [("gpt2", 2, 2), ("llama", 4, 4), ("gpt2", 4, 2)])
def test_split_teacher_matches_unsplit(tmp_path: Path, family: str, world: int, stages: int) -> None:
    run_ranks(
        world, "tests.parallel.workers:teacher_split", tmp_path, {"family": family, "layers": 8, "stages": stages}
    )
    full = tiny_model(family, layers=8).eval()
    total = unique_param_bytes(full)
    for rank in range(world):
        out = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        with torch.no_grad():
            ref = full(input_ids=out["ids"], attention_mask=out["mask"]).logits
        valid = out["mask"].bool()
        assert out["logits"].shape == ref.shape
        torch.testing.assert_close(out["logits"][valid], ref[valid], rtol=1e-5, atol=1e-5)
        share = int(out["param_bytes"]) / total
        # Balanced by parameter count: each rank near 1/S (the tied head adds a copy on the last).
        assert abs(share - 1 / stages) < 0.25 / stages, (rank, share)


def _max_cost(costs: StageCosts, ranges: list[range]) -> int:
    n = len(ranges)
    return max(
        sum(costs.layers[i] for i in r) + (costs.first if j == 0 else 0) + (costs.last if j == n - 1 else 0)
        for j, r in enumerate(ranges)
    )


def test_balance_is_optimal_against_brute_force() -> None:
    gen = random.Random(0)
    for _ in range(200):
        n, s = gen.randint(1, 8), gen.randint(1, 4)
        if s > n:
            continue
        costs = StageCosts(gen.randint(0, 50), tuple(gen.randint(1, 40) for _ in range(n)), gen.randint(0, 50))
        got = balance_layers(costs, s)
        assert [i for r in got for i in r] == list(range(n)) and all(len(r) for r in got)
        best = min(
            _max_cost(costs, [range(a, b) for a, b in zip((0, *cuts), (*cuts, n), strict=True)])
            for cuts in itertools.combinations(range(1, n), s - 1)
        )
        assert _max_cost(costs, got) == best
    costs = StageCosts(first=50, layers=(10, 10, 10, 10, 40, 40), last=0)
    with pytest.raises(ValueError, match="cannot split 6 layers into 7"):
        balance_layers(costs, 7)


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(ValueError, match="Linear"):
        stage_costs(torch.nn.Linear(2, 2))
    assert sum(len(r) for r in balance_layers(stage_costs(tiny_model("llama", layers=5)), 3)) == 5
