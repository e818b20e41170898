"""Top-k compression under real DDP on two gloo processes: bytes and unbiased accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdistill.trainer.parallel.compression import TopKState

from .harness import run_ranks


def _results(tmp_path: Path, world: int) -> list[dict]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_topk_one_percent_sends_20x_fewer_bytes_and_error_feedback_is_unbiased(tmp_path: Path) -> None:
    run_ranks(
        2,
        "tests.parallel.compression_workers:topk_run",
        tmp_path,
        {"fraction": 0.01, "warmup": 2, "steps": 8},
        timeout=180,
    )
    ranks = _results(tmp_path, 2)
    for r in ranks:
        # Warm-up steps are plain all-reduce, then two ramp steps get sparser (density 1%^(1/3),
        # 1%^(2/3)); afterwards every step is >= 20x smaller.
        assert r["step_ratios"][:2] == [1.0, 1.0]
        assert 1.0 < r["step_ratios"][2] < r["step_ratios"][3] < r["step_ratios"][4]
        assert min(r["step_ratios"][4:]) >= 20
        # Error feedback: nothing is lost, only delayed.
        assert r["gap"] < 1e-5 * max(1.0, r["scale"])
        # ... and the residual really carried something (the identity is not trivially true).
        assert r["gap_without_residual"] > 100 * r["gap"] + 1e-4
    # Data-parallel replicas stay identical.
    assert ranks[0]["params"] == ranks[1]["params"]


def test_error_feedback_identity_holds_when_top_k_ranks_by_a_selection_scale(tmp_path: Path) -> None:
    run_ranks(
        2,
        "tests.parallel.compression_workers:topk_run",
        tmp_path,
        {"fraction": 0.01, "warmup": 1, "steps": 6, "selection_scale": True},
        timeout=180,
    )
    ranks = _results(tmp_path, 2)
    for r in ranks:
        assert r["gap"] < 1e-5 * max(1.0, r["scale"])
        assert r["gap_without_residual"] > 100 * r["gap"] + 1e-4
    assert ranks[0]["params"] == ranks[1]["params"]


def test_momentum_compression_sends_each_ranks_momentum_and_loses_none_of_it(tmp_path: Path) -> None:
    """Momentum compression: on compressed steps every matrix's rank-local momentum
    m = 0.9 m + 0.1 g (recomputed in the worker from the rank's own gradients) is what top-k
    sends; applied updates + mean residual = dense steps' mean gradients + every compressed step's
    mean momentum, exactly. 1-D tensors keep going as gradients."""
    run_ranks(
        2,
        "tests.parallel.compression_workers:topk_run",
        tmp_path,
        {"fraction": 0.01, "warmup": 2, "steps": 8, "momentum": 0.9, "selection_scale": True},
        timeout=180,
    )
    ranks = _results(tmp_path, 2)
    for r in ranks:
        assert r["compressed"] == [False] * 2 + [True] * 6
        assert r["momenta"] == 3  # the three weight matrices, not the biases
        assert r["momentum_gap"] < 1e-6
        assert r["gap"] < 1e-5 * max(1.0, r["scale"])
        assert r["gap_without_residual"] > 100 * r["gap"] + 1e-4
    assert ranks[0]["params"] == ranks[1]["params"]


@pytest.mark.parametrize("follow", [True, False], ids=["residuals-follow", "residuals-fixed"])
def test_residuals_follow_the_learning_rate_so_no_displacement_is_lost(tmp_path: Path, follow: bool) -> None:
    """Under a decaying learning rate, a residual applied later moves the weights by its value
    times that later, smaller rate. Rescaled by before/after at every change, it keeps what it
    owes in weight displacement: applied updates + lr_next * mean residual = the sum over steps of
    lr_t * (mean gradient or momentum), exactly. Left as it was, the identity breaks."""
    lrs = [1.0 * 0.8**i for i in range(9)]
    run_ranks(
        2,
        "tests.parallel.compression_workers:topk_run",
        tmp_path,
        {"fraction": 0.01, "warmup": 2, "steps": 8, "momentum": 0.9, "lrs": lrs, "follow_lr": follow},
        timeout=180,
    )
    for r in _results(tmp_path, 2):
        exact = r["gap"] < 1e-5 * max(1.0, r["scale"])
        assert exact == follow, r["gap"]
        if follow:
            # The control: the residual term is not negligible (the rate has decayed to 0.17 by then).
            assert r["gap_without_residual"] > 1000 * r["gap"] + 1e-5


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["gradient", "momentum"])
def test_a_student_wrapped_again_keeps_the_hooks_schedule_residuals_and_momenta(
    tmp_path: Path, momentum: float
) -> None:
    """QAT's fake quantizers may give the student new Parameter objects mid-run, and DDP then wraps
    it again: the hook carries on where it was (no second warm-up), and what it had not sent yet
    (residuals, each rank's momentum) still reaches the weights."""
    run_ranks(
        2,
        "tests.parallel.compression_workers:topk_run",
        tmp_path,
        {"fraction": 0.01, "warmup": 2, "ramp": 0, "steps": 8, "momentum": momentum, "rewrap_at": 5},
        timeout=180,
    )
    ranks = _results(tmp_path, 2)
    for r in ranks:
        assert r["compressed"] == [False] * 2 + [True] * 6
        assert min(r["step_ratios"][2:]) >= 20
        assert r["momenta"] == (3 if momentum else 0)
        assert r["momentum_gap"] < 1e-6
        assert r["gap"] < 1e-5 * max(1.0, r["scale"])
        assert r["gap_without_residual"] > 100 * r["gap"] + 1e-4
    assert ranks[0]["params"] == ranks[1]["params"]


def test_the_runtime_wrapping_the_student_again_keeps_its_hook_state(tmp_path: Path) -> None:
    run_ranks(2, "tests.parallel.compression_workers:runtime_rewrap_run", tmp_path, {}, timeout=180)
    for r in _results(tmp_path, 2):
        assert r == {
            "same_state": True,
            "step": 5,
            "residuals_carried": True,
            "residual_keys_are_the_new_parameters": True,
            "bytes_grew": True,
        }


def test_momentum_compression_with_accumulation_sends_once_per_step(tmp_path: Path) -> None:
    """Under momentum compression a step's first micro-batches keep their gradient local (no
    bytes) and the last sends the step's whole gradient through the momentum: two micro-batches
    of 8 rows end where one batch of the same 16 rows ends, at the same bytes."""
    for name, accumulation in (("one", 1), ("two", 2)):
        run_ranks(
            2,
            "tests.parallel.compression_workers:topk_run",
            tmp_path / name,
            # warmupSteps counts micro-batches (the hook runs per micro-batch): two optimizer steps each.
            {
                "fraction": 0.05,
                "warmup": 2 * accumulation,
                "steps": 6,
                "ramp": 0,
                "momentum": 0.9,
                "accumulation": accumulation,
            },
            timeout=180,
        )
    one, two = _results(tmp_path / "one", 2)[0], _results(tmp_path / "two", 2)[0]
    assert two["compressed"] == one["compressed"] == [False] * 2 + [True] * 4
    # The dense warm-up all-reduces each micro-batch; a compressed step sends one message.
    assert two["step_ratios"][:2] == [1.0, 1.0]
    assert two["step_ratios"][2:] == pytest.approx([2 * r for r in one["step_ratios"][2:]])
    for a, b in zip(one["params"], two["params"], strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_momentum_compression_with_accumulation_after_the_backward(tmp_path: Path) -> None:
    """The pipelined student's path (reduce_gradients after each micro-batch's backward) keeps a
    compressed step's first micro-batch local too: two micro-batches end where one batch does."""
    run_ranks(2, "tests.parallel.compression_workers:reduce_accumulation_run", tmp_path, {"steps": 6}, timeout=180)
    for r in _results(tmp_path, 2):
        two, one = r["two"], r["one"]
        assert two["compressed"] and one["compressed"] and two["momenta"] == one["momenta"] == 3
        # The dense warm-up all-reduces both micro-batches of its 2 steps: 2 extra buffers; the
        # compressed steps send one message each either way.
        dense = 4 * sum(len(p) for p in one["params"])
        assert two["bytes_sent"] == one["bytes_sent"] + 2 * dense
        for a, b in zip(one["params"], two["params"], strict=True):
            assert a == pytest.approx(b, abs=1e-6)


def test_selection_scale_ranks_entries_by_the_step_they_would_take() -> None:
    import torch
    from torch import nn

    from kdistill.trainer.optim import FROZEN_VARIANCE_FLOOR, update_scale
    from kdistill.trainer.parallel.compression import _selection_score, _split_indices

    weight, bias = nn.Parameter(torch.zeros(200)), nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([weight, bias], lr=0.1)
    scale = update_scale(opt)
    assert scale(weight) is None  # no second moment before the first step
    # Entry 0 has a 100x larger gradient than the rest, so a 10^4x larger second moment.
    weight.grad = torch.cat([torch.tensor([1.0]), torch.full((199,), 0.01)])
    bias.grad = torch.ones(3)
    opt.step()
    s = scale(weight)
    assert s is not None and s.shape == (200,)
    torch.testing.assert_close(s[1] / s[0], torch.tensor(100.0))
    # The floor: an entry whose variance is (near) zero gets a bounded weight, not 1/sqrt(0).
    opt.state[weight]["exp_avg_sq"][5] = 0.0
    v = opt.state[weight]["exp_avg_sq"]
    assert float(scale(weight)[5]) == pytest.approx(float(v.mean() * FROZEN_VARIANCE_FLOOR) ** -0.5, rel=1e-5)
    v[5] = v[6]

    state = TopKState(fraction=0.01)
    acc = torch.cat([torch.tensor([5.0]), torch.full((199,), 0.1), torch.tensor([0.2, 0.3]), torch.tensor([7.0])])
    acc[1 + 57] = 0.2  # the largest of the small-variance entries
    params, small = [weight, nn.Parameter(torch.zeros(2)), bias[:1]], [False, True, True]
    # By magnitude entry 0 wins (5 > 0.2); by the step it would take (5 / 1 < 0.2 * 100) entry 58.
    _, by_magnitude, _ = _split_indices(acc, [200, 2, 1], small, 0.005)
    state.selection_scale = scale
    score = _selection_score(state, params, acc, small)
    _, by_update, _ = _split_indices(score, [200, 2, 1], small, 0.005)
    assert by_magnitude.tolist() == [0] and by_update.tolist() == [58]
    assert torch.equal(score[200:], acc[200:])  # tensors sent whole are not scaled


def test_without_error_feedback_the_update_is_biased(tmp_path: Path) -> None:
    run_ranks(
        2,
        "tests.parallel.compression_workers:topk_run",
        tmp_path,
        {"fraction": 0.01, "warmup": 0, "steps": 4, "error_feedback": False},
        timeout=180,
    )
    for r in _results(tmp_path, 2):
        # Dropped entries are gone for good: applied updates miss part of the true gradient sum.
        assert r["gap"] > 1e-4


def test_local_clipping_bounds_each_compressed_step(tmp_path: Path) -> None:
    """DGC's local clipping: on compressed steps each rank clips its own gradient (per bucket, to
    its share of the norm) before compressing; SGD(lr=1) moves by the mean sent gradient, so with
    error feedback off every compressed step moves by at most clip_norm."""
    clip = 1e-4
    for name, args in (("clipped", {"clip": clip}), ("free", {})):
        run_ranks(
            2,
            "tests.parallel.compression_workers:topk_run",
            tmp_path / name,
            {"fraction": 0.1, "warmup": 1, "steps": 4, "error_feedback": False, **args},
            timeout=180,
        )
    clipped, free = _results(tmp_path / "clipped", 2)[0], _results(tmp_path / "free", 2)[0]
    assert clipped["compressed"] == [False, True, True, True]
    assert max(clipped["update_norms"][1:]) <= clip * (1 + 1e-4)
    assert min(free["update_norms"][1:]) > 10 * clip  # the control: unclipped steps are larger
    assert clipped["update_norms"][0] == pytest.approx(free["update_norms"][0])  # dense step: the loop's job


def test_density_warm_up_then_exponential_ramp_then_fraction() -> None:
    state = TopKState(fraction=0.01, warmup_steps=2, ramp_steps=3)
    got = [state.density(s) for s in range(7)]
    assert got[:2] == [1.0, 1.0] and got[5:] == [0.01, 0.01]
    for i, d in enumerate(got[2:5], start=1):
        assert abs(d - 0.01 ** (i / 4)) < 1e-12
    assert TopKState(fraction=0.1).density(0) == 0.1  # no warm-up, no ramp
    # From ramp_from instead of dense: the same exponential, between 0.1 and 0.01.
    cheap = TopKState(fraction=0.01, warmup_steps=2, ramp_steps=3, ramp_from=0.1)
    got = [cheap.density(s) for s in range(7)]
    assert got[:2] == [1.0, 1.0] and got[5:] == [0.01, 0.01]
    for i, d in enumerate(got[2:5], start=1):
        assert abs(d - 0.1 * 0.1 ** (i / 4)) < 1e-12


def test_per_tensor_topk_gives_every_tensor_its_share() -> None:
    import torch

    from kdistill.trainer.parallel.compression import _per_tensor_topk

    # A large-gradient tensor next to a tiny-gradient one: a bucket-wide top-k would take only
    # the first; per tensor, each keeps ceil(p * n) of its own entries.
    acc = torch.cat([torch.linspace(100, 200, 1000), torch.linspace(1e-6, 2e-6, 300), torch.tensor([5e-7])])
    idx, bases = _per_tensor_topk(acc, [1000, 300, 1], 0.01)
    assert sorted(idx.tolist()) == [*range(990, 1000), *range(1297, 1300), 1300]
    assert sorted(bases.tolist()) == [0] * 10 + [1000] * 3 + [1300]


def test_one_dimensional_tensors_go_whole_and_the_rest_by_top_k() -> None:
    import torch

    from kdistill.trainer.parallel.compression import _split_indices

    # [weight 1000 | bias 30 | weight 300]: the bias is sent whole (no indices on the wire), the
    # weights keep ceil(p * n) entries each.
    acc = torch.cat([torch.linspace(1, 2, 1000), torch.full((30,), 1e-9), torch.linspace(-3, -1, 300)])
    dense, sparse, bases = _split_indices(acc, [1000, 30, 300], [False, True, False], 0.01)
    assert dense.tolist() == list(range(1000, 1030))
    assert sorted(sparse.tolist()) == [*range(990, 1000), 1030, 1031, 1032]
    assert bases.tolist() == [0] * 10 + [1030] * 3


def test_spec_defaults_are_the_measured_ones() -> None:
    from kdistill.api.spec import GradientCompression

    gc = GradientCompression(top_k=0.01)
    assert (
        gc.warmup_steps,
        gc.ramp_steps,
        gc.ramp_from,
        gc.byte_budget,
        gc.freeze_variance,
        gc.selection,
        gc.compress,
    ) == (10, None, None, 0.05, True, "update", "momentum")
    # The ramp scales with the run: 25% of its steps, rounded up, unless rampSteps is set.
    assert (gc.ramp_for(400), gc.ramp_for(2000), gc.ramp_for(1)) == (100, 500, 1)
    assert GradientCompression(top_k=0.01, ramp_steps=0).ramp_for(2000) == 0


@pytest.mark.parametrize(
    "schedule",
    [
        {"fraction": 0.05, "warmup": 2, "ramp": 6, "steps": 12, "budget": 0.3},
        # Momentum compression with accumulation: a step's first micro-batch sends nothing.
        {"fraction": 0.05, "warmup": 2, "ramp": 6, "steps": 8, "budget": 0.17, "momentum": 0.9, "accumulation": 2},
    ],
    ids=["plain", "momentum-accumulation"],
)
def test_a_byte_budget_plans_the_ramps_start_and_the_run_keeps_within_it(tmp_path: Path, schedule: dict) -> None:
    """The planned start is what the hook then counts: the run's bytes stay within the budget and
    exceed it by the plan's padding bound at most below the plan."""
    run_ranks(2, "tests.parallel.compression_workers:topk_run", tmp_path, schedule, timeout=180)
    for r in _results(tmp_path, 2):
        ramp_from, planned, planned_dense, within = r["plan"]
        sent, dense = r["bytes"]
        assert within and schedule["fraction"] < ramp_from < 1.0  # the budget binds: neither end
        assert dense == planned_dense
        # The plan bounds the padding by 2 bytes per tensor (6 here) and step; the hook pads per bucket.
        assert planned - 2 * 6 * schedule["steps"] * schedule.get("accumulation", 1) <= sent <= planned
        assert sent <= schedule["budget"] * dense
    ranks = _results(tmp_path, 2)
    assert ranks[0]["plan"] == ranks[1]["plan"] and ranks[0]["params"] == ranks[1]["params"]


def test_state_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="fraction"):
        TopKState(fraction=0.0)
    with pytest.raises(ValueError, match="warmup"):
        TopKState(fraction=0.1, warmup_steps=-1)
    with pytest.raises(ValueError, match="ramp_steps"):
        TopKState(fraction=0.1, ramp_steps=-1)
    with pytest.raises(ValueError, match="ramp_from"):
        TopKState(fraction=0.1, ramp_from=0.05)
    with pytest.raises(ValueError, match="ramp_from"):
        TopKState(fraction=0.1, ramp_from=1.5)
    with pytest.raises(ValueError, match="momentum"):
        TopKState(fraction=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="accumulation"):
        TopKState(fraction=0.1, accumulation=0)


def test_momentum_compression_warms_up_whole_steps_and_keeps_all_but_their_last_micro_batch_local() -> None:
    state = TopKState(fraction=0.01, warmup_steps=5, momentum=0.9, accumulation=4)
    assert state.warmup_steps == 8  # rounded up to whole optimizer steps of 4 micro-batches
    assert [state.keeps_local(s) for s in range(12)] == [False] * 8 + [True, True, True, False]
    assert not any(TopKState(fraction=0.01, warmup_steps=5, accumulation=4).keeps_local(s) for s in range(12))


def test_spec_ramp_steps_reach_the_runtime() -> None:
    import torch

    from kdistill.api import parse_job
    from kdistill.trainer.parallel.distributed import DistEnv
    from kdistill.trainer.parallel.runtime import ParallelRuntime
    from tests.spec_table import with_spec

    spec = parse_job(
        with_spec(**{"parallelism.gradientCompression": {"topK": 0.01, "warmupSteps": 3, "rampSteps": 40}})
    ).spec
    rt = ParallelRuntime.create(spec, torch.device("cpu"), env=DistEnv(0, 1, 0, "127.0.0.1", 29500))
    assert (rt.top_k, rt.compression_warmup, rt.compression_ramp) == (0.01, 3, 40)
    assert (rt.compression_momentum, rt.accumulation) == (0.9, 1)  # compress: momentum, AdamW's beta1
    assert rt.compression_clip == spec.distillation.max_grad_norm > 0  # local clipping, the job's norm
    state = TopKState(fraction=rt.top_k, warmup_steps=rt.compression_warmup, ramp_steps=rt.compression_ramp)
    assert state.density(3 + 39) > 0.01 and state.density(3 + 40) == 0.01  # 0-based steps
    # rampFrom unset: the start comes from byteBudget's plan over the job's micro-batches.
    assert (rt.compression_ramp_from, rt.compression_budget, rt.compression_micro_batches) == (
        None,
        0.05,
        spec.total_steps,
    )

    # Unset, the ramp is 25% of the job's micro-batches (all stages and the QAT phase, times the
    # accumulation: the hook counts micro-batches) from rampFrom, or from topK when that is larger.
    spec = parse_job(
        with_spec(
            **{
                "distillation.stages": [{"name": "output", "steps": 700, "objectives": ["logits"]}],
                "distillation.gradientAccumulationSteps": 2,
                "quantization": {"mode": "qat-int8", "qatSteps": 100},
                "parallelism.gradientCompression": {"topK": 0.01, "rampFrom": 0.3},
            }
        )
    ).spec
    rt = ParallelRuntime.create(spec, torch.device("cpu"), env=DistEnv(0, 1, 0, "127.0.0.1", 29500))
    assert (spec.total_steps, rt.compression_ramp, rt.compression_ramp_from) == (800, 400, 0.3)
    assert (rt.compression_micro_batches, rt.ramp_start([])) == (1600, 0.3)
    rt.top_k = 0.5
    assert rt.ramp_start([]) == 0.5


def test_large_tensors_are_cut_into_spans_whose_offsets_fit_16_bits() -> None:
    import torch

    from kdistill.trainer.parallel.compression import INDEX_SPAN, _decode, _encode, _per_tensor_topk

    # 2.5 spans: each span keeps ceil(p * m) of its own entries, the extremes of a span included.
    n = 2 * INDEX_SPAN + INDEX_SPAN // 2
    acc = torch.zeros(n)
    hot = [0, INDEX_SPAN - 1, INDEX_SPAN, 2 * INDEX_SPAN - 1, 2 * INDEX_SPAN, n - 1]
    acc[hot] = torch.arange(1.0, 7.0)
    idx, bases = _per_tensor_topk(acc, [n], 1e-5)  # k = 1 per span
    assert idx.tolist() == [INDEX_SPAN - 1, 2 * INDEX_SPAN - 1, n - 1]
    assert bases.tolist() == [0, INDEX_SPAN, 2 * INDEX_SPAN]
    # Round trip: 16-bit offsets (0 and 65535 included) and bfloat16 / float32 values.
    offsets = torch.tensor([0, INDEX_SPAN - 1, 12345, 40000])
    values = torch.tensor([1.5, -2.25, 3.0e-3, 7.0])
    for half in (True, False):
        payload = _encode(values, offsets, half)
        assert payload.dtype == torch.int32
        assert payload.numel() * 4 == (2 if half else 4) * 4 + 2 * 4  # 2-byte indices
        got_values, got_offsets = _decode(payload, 4, 4, half)
        assert got_offsets.tolist() == offsets.tolist()
        expect = values.to(torch.bfloat16).float() if half else values
        assert torch.equal(got_values, expect)
