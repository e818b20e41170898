"""Sharded checkpoints on real ranks (see harness.py): one AdamW step of a split student, a save
through ``parallel/sharded_checkpoint.py``, a load under another layout, and the whole-student
values every rank then holds. ``reference`` is the same in one process without a split."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from kdistill.api.spec import Distillation
from kdistill.trainer.checkpoint import CheckpointManager
from kdistill.trainer.data import TokenizedExample
from kdistill.trainer.flows.base import CheckpointState
from kdistill.trainer.optim import build_optimizer
from kdistill.trainer.parallel.distributed import DistEnv, peer_guard
from kdistill.trainer.parallel.mesh import MeshLayout
from kdistill.trainer.sampling import BatchSampler

from .models import tiny_model
from .workers import student_batch, token_loss

ROWS, LENGTH = 4, 12
KEEP = 3


def aux_modules() -> nn.ModuleDict:
    """A replicated aux module, identical on every rank (as the hidden projections are)."""
    torch.manual_seed(5)
    return nn.ModuleDict({"proj": nn.Linear(32, 16)})


def aux_backward(aux: nn.ModuleDict, step: int) -> None:
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(100 + step))
    aux["proj"](x).pow(2).mean().backward()


def checkpoint_state(root: Path, aux: nn.ModuleDict, named: list[tuple[str, nn.Parameter]]) -> CheckpointState:
    optimizer, scheduler = build_optimizer(named, Distillation(learning_rate=1e-2, warmup_steps=0), 10, foreach=False)
    examples = [TokenizedExample(i, list(range(1, 4 + i % 5)), None) for i in range(16)]
    sampler = BatchSampler(examples, 4, strategy="uniform", tiers=None, shares=(1.0, 0.0, 0.0), seed=0)
    return CheckpointState(CheckpointManager(root, KEEP), aux, optimizer, scheduler, sampler, {"tokens_seen": 7})


def optimizer_step(state: CheckpointState) -> None:
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)


class Split:
    """The split student of one rank, its aux modules and optimizer (the loop's naming)."""

    def __init__(self, env: DistEnv, root: Path, args: dict[str, Any], seed: int = 0) -> None:
        from kdistill.trainer.parallel.mesh import build_device_mesh
        from kdistill.trainer.parallel.student import parallelize_student
        from kdistill.trainer.parallel.student_state import FullLayout

        self.layout = MeshLayout(env.world_size, args["pipeline"], args["data"], args["tensor"], 1)
        model = tiny_model(args["family"], layers=4, seed=seed)
        self.full = FullLayout.of(model)
        mesh = build_device_mesh(self.layout, "cpu")
        self.ps = parallelize_student(model, self.layout, env.rank, mesh, token_loss, device=torch.device("cpu"))
        self.aux = aux_modules()
        named = [(f"student.{n}", p) for n, p in self.ps.named_params.items() if p.requires_grad]
        named += [(f"aux.{n}", p) for n, p in self.aux.named_parameters()]
        self.state = checkpoint_state(root, self.aux, named)

    def step(self, step: int) -> None:
        ids, mask, labels, teacher = student_batch(ROWS, LENGTH)
        d, per = self.ps.coords["data"], ROWS // self.layout.data
        rows = slice(d * per, (d + 1) * per)
        self.ps.forward_backward(ids[rows], labels[rows], teacher[rows], mask[rows])
        aux_backward(self.aux, step)
        optimizer_step(self.state)

    def save(self, step: int) -> Path | None:
        from kdistill.trainer.parallel import sharded_checkpoint

        held = sharded_checkpoint.student_held(self.ps, self.full, for_save=True)
        return sharded_checkpoint.save(self.state, held, step=step, stage="output", temperature=1.0, guard=peer_guard)

    def restore(self) -> None:
        from kdistill.trainer.parallel import sharded_checkpoint

        info = self.state.manager.latest()
        assert info is not None and info.sharded
        held = sharded_checkpoint.student_held(self.ps, self.full, for_save=False)
        sharded_checkpoint.restore(info.path, self.state, held, set(self.full.shapes), guard=peer_guard)

    def whole(self) -> dict[str, torch.Tensor]:
        """Every weight and Adam moment this rank holds, re-joined over tensor peers."""
        from kdistill.trainer.parallel.student_state import _full

        out: dict[str, torch.Tensor] = {}
        for name, p in self.ps.named_params.items():
            out[name] = _full(self.ps, name, p).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}:{key}"] = _full(self.ps, name, self.state.optimizer.state[p][key]).clone()
        return out


def save_split(env: DistEnv, workdir: Path, args: dict[str, Any]) -> None:
    """One step, then a sharded checkpoint at step 1."""
    split = Split(env, workdir / "checkpoints", args)
    split.step(1)
    path = split.save(1)
    assert (path is not None) == (env.rank == 0)


def resume_split(env: DistEnv, workdir: Path, args: dict[str, Any]) -> None:
    """From another seed, restore the newest checkpoint under this layout; dump what every rank
    holds, then after one more step."""
    split = Split(env, workdir / "checkpoints", args, seed=1)
    split.restore()
    assert split.state.scheduler.last_epoch == 1
    save_file(split.whole(), str(workdir / f"loaded{env.rank}.safetensors"))
    split.step(2)
    save_file(split.whole(), str(workdir / f"stepped{env.rank}.safetensors"))


def save_and_hang(env: DistEnv, workdir: Path, args: dict[str, Any]) -> None:
    """A checkpoint at step 1, then one at step 2 during which rank 1 stops for good right after
    writing its shard (the test kills it there with SIGKILL)."""
    from kdistill.trainer import dcp_storage

    split = Split(env, workdir / "checkpoints", args)
    split.step(1)
    split.save(1)
    split.step(2)
    if env.rank == 1:
        write = dcp_storage.SafetensorsStorageWriter.write_data

        def write_then_stop(self: Any, plan: Any, planner: Any) -> Any:
            result = write(self, plan, planner)
            (workdir / "rank1-wrote").write_text(str(os.getpid()))
            while True:  # until SIGKILL
                time.sleep(1)
            return result

        dcp_storage.SafetensorsStorageWriter.write_data = write_then_stop  # type: ignore[method-assign]
    try:
        split.save(2)
    finally:
        (workdir / f"rank{env.rank}-left-save").write_text("")


def resume_and_save(env: DistEnv, workdir: Path, args: dict[str, Any]) -> None:
    """Restore the newest checkpoint, one step, a checkpoint at step 3."""
    split = Split(env, workdir / "checkpoints", args, seed=1)
    split.restore()
    split.step(2)
    split.save(3)
