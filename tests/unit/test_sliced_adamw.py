"""SlicedAdamW: torch's AdamW, bit for bit, with its per-parameter temporaries bounded by a slice."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import kdistill.trainer.optim as optim
from kdistill.api.spec import Distillation
from kdistill.trainer.optim import SlicedAdamW, build_optimizer

SHAPES = [(37, 53), (1000,), (30, 31), (5,), (64, 64)]


def _groups(params: list[nn.Parameter]) -> list[dict[str, object]]:
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _train(params: list[nn.Parameter], opt: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        scheduler.step()


@pytest.mark.parametrize("slice_elements", [1, 7, 999, 1 << 22])
def test_equals_adamw_bit_for_bit(slice_elements: int) -> None:
    a, b = _params(), _params()
    plain = torch.optim.AdamW(_groups(a), lr=0.01, foreach=False)
    sliced = SlicedAdamW(_groups(b), lr=0.01, slice_elements=slice_elements)
    _train(a, plain, 4)
    _train(b, sliced, 4)
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sliced.state[pb][key], plain.state[pa][key], rtol=0, atol=0)


def test_state_dicts_load_into_each_other() -> None:
    a, b, c = _params(), _params(), _params()
    plain = torch.optim.AdamW(_groups(a), lr=0.01, foreach=False)
    _train(a, plain, 2)
    for p, q in zip(b, a, strict=True):
        p.data.copy_(q.detach())
    resumed = SlicedAdamW(_groups(b), lr=0.01, slice_elements=100)
    resumed.load_state_dict(copy.deepcopy(plain.state_dict()))  # load_state_dict keeps the tensors
    _train(a, plain, 2)
    _train(b, resumed, 2)
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)
    back = torch.optim.AdamW(_groups(c), lr=0.01, foreach=False)
    back.load_state_dict(resumed.state_dict())
    assert back.state[c[0]]["exp_avg"].shape == c[0].shape


def test_no_update_touches_more_than_a_slice_of_a_large_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    updated: list[int] = []
    real = optim.adam

    def counting(params: list[torch.Tensor], *args: object, **kwargs: object) -> None:
        updated.extend(p.numel() for p in params)
        real(params, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(optim, "adam", counting)
    params = _params()
    _train(params, SlicedAdamW(_groups(params), lr=0.01, slice_elements=500), 1)
    assert max(updated) == 500
    assert sum(updated) == sum(p.numel() for p in params)  # every entry once
    assert 5 in updated  # a parameter within one slice is updated whole


def test_foreach_takes_adamw_own_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SlicedAdamW, "_sliced_group_step", lambda *_: pytest.fail("sliced a foreach step"))
    a, b = _params(), _params()
    plain = torch.optim.AdamW(_groups(a), lr=0.01, foreach=True)
    sliced = SlicedAdamW(_groups(b), lr=0.01, foreach=True, slice_elements=7)
    _train(a, plain, 2)
    _train(b, sliced, 2)
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)


def test_build_optimizer_slices_and_rejects_an_empty_slice() -> None:
    params = _params()
    optimizer, _ = build_optimizer([(f"p{i}", p) for i, p in enumerate(params)], Distillation(), 10)
    assert isinstance(optimizer, SlicedAdamW)
    with pytest.raises(ValueError, match="slice_elements must be >= 1"):
        SlicedAdamW(params, slice_elements=0)


def test_dtensor_shards_are_sliced_in_place(tmp_path: Path) -> None:
    """A tensor-parallel student's parameters are DTensors: the slices are views of the local shard,
    so the update lands in the parameter (world of one process, gloo)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain_params = _params()
        placements = [[Shard(0)], [Replicate()], [Shard(1)], [Replicate()], [Shard(0)]]
        dparams = [
            nn.Parameter(distribute_tensor(p.detach().clone(), mesh, pl))
            for p, pl in zip(plain_params, placements, strict=True)
        ]
        plain = torch.optim.AdamW(_groups(plain_params), lr=0.01, foreach=False)
        sliced = SlicedAdamW(_groups(dparams), lr=0.01, foreach=False, slice_elements=100)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p, d, pl in zip(plain_params, dparams, placements, strict=True):
                g = torch.randn(p.shape, generator=gen)
                p.grad = g
                d.grad = distribute_tensor(g.clone(), mesh, pl)
            plain.step()
            sliced.step()
        for p, d in zip(plain_params, dparams, strict=True):
            torch.testing.assert_close(d.full_tensor(), p.detach(), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
