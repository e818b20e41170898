"""Sharded checkpoints of a tensor/pipeline-parallel student: every rank writes its own part.

A save is collective. Rank 0 empties the attempt's temporary directory
(``CheckpointManager.shared_tmp``); after a barrier every rank writes into it through DCP
(``sharded_state``): its tensor shards of its pipeline stage's parameters and their AdamW
moments, under the unsplit student's names; data-parallel replicas and the replicated aux
modules are written once (DCP's planner deduplicates them across ranks). With top-k gradient
compression each rank also writes its own error-feedback residuals,
``compression-rank<R>.safetensors`` (the ``restore_residuals`` format, one rank each). DCP's
finish step on rank 0 follows every rank's fsynced write; rank 0 then adds the param groups
(``optimizer.json``), scheduler, RNG, sampler and ``trainer.json``, writes the manifest last and
renames the directory into place under the attempt fence (``CheckpointManager.commit``). A rank
killed mid-save leaves a directory without a manifest that is never renamed, and the next
commit prunes it.

A restore reads, on every rank, only the chunks that overlap what the rank holds now, whatever
layout wrote them: DCP matches the saved chunks to the new ones by global offsets. The last
pipeline stage's copy of a tied embedding/head is not saved (stage 0's copy is the same tensor)
and is read from the embedding's key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from .. import sharded_state
from ..fsio import fsync_file
from ..sharded_state import Held, Shard
from .student import ParallelStudent, tp_shard_of
from .student_state import FullLayout

STUDENT, AUX = "student/", "aux/"
OPTIMIZER_JSON = "optimizer.json"


def _shard(ps: ParallelStudent, name: str, p: torch.Tensor) -> Shard | None:
    """How this rank's parameter covers the whole one under tensor parallelism."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as DShard

    if ps.layout.tensor == 1:
        return None
    if isinstance(p, DTensor):
        dims = [pl.dim for pl in p.placements if isinstance(pl, DShard)]
        spec = (dims[0], 1) if dims else None
    else:
        spec = tp_shard_of(name)
    if spec is None:
        return None
    return Shard(spec[0], spec[1], ps.layout.tensor, ps.coords["tensor"])


def student_held(ps: ParallelStudent, full: FullLayout, *, for_save: bool) -> list[Held]:
    """This rank's student parameters under the unsplit names; for a save without the tied copy
    that stage 0 holds too, for a load with it (read from the embedding's key)."""
    held = []
    for name, p in ps.named_params.items():
        canonical = name if name in full.shapes else full.aliases.get(name)
        if canonical is None:
            raise KeyError(f"parameter {name} of the split student is not in the unsplit student")
        if for_save and canonical != name:
            continue
        held.append(Held(STUDENT + canonical, p, full.shapes[canonical], _shard(ps, name, p)))
    return held


def whole_held(student: nn.Module) -> list[Held]:
    """A whole student's trainable parameters (one process holds them all)."""
    return [Held(STUDENT + n, p, tuple(p.shape)) for n, p in student.named_parameters() if p.requires_grad]


def residual_file(rank: int) -> str:
    return f"compression-rank{rank}.safetensors"


def _write_residuals(tmp: Path, compression: Any, params: list[nn.Parameter]) -> None:
    from .compression import rank_vectors

    rank, world = dist.get_rank(), dist.get_world_size()
    tensors = {
        **rank_vectors(compression, params, rank),
        "hook_step": torch.tensor([compression.step], dtype=torch.int64),
        "world": torch.tensor([world], dtype=torch.int64),
    }
    save_file(tensors, str(tmp / residual_file(rank)))
    fsync_file(tmp / residual_file(rank))


def save(
    state: Any,  # flows.base.CheckpointState
    held: list[Held],
    *,
    step: int,
    stage: str,
    temperature: float,
    guard: Any,
    compression: Any = None,
    compressed: list[nn.Parameter] | None = None,
) -> Path | None:
    """Collective: write one sharded checkpoint; rank 0 returns its path, the others None."""
    manager, rank = state.manager, dist.get_rank()
    tmp = manager.shared_tmp(step)
    if rank == 0:
        manager.begin(tmp)
    with guard("the start of a sharded checkpoint"):
        dist.barrier()
    if compression is not None:
        _write_residuals(tmp, compression, compressed or [])
    tensors = sharded_state.state_dict([*held, *sharded_state.module_held(AUX, state.aux)], state.optimizer)
    with guard("the sharded checkpoint"):
        digests = sharded_state.save(tmp, tensors)
    if rank != 0:
        return None
    (tmp / OPTIMIZER_JSON).write_text(json.dumps({"param_groups": sharded_state.param_groups(state.optimizer)}))
    manager.write_state(
        tmp,
        step=step,
        stage=stage,
        temperature=temperature,
        scheduler=state.scheduler,
        sampler=state.sampler.state_dict(),
        meta=state.meta,
    )
    return manager.commit(tmp, step, digests)


def restore(
    path: Path,
    state: Any,  # flows.base.CheckpointState
    held: list[Held],
    expected: set[str],
    *,
    guard: Any,
) -> None:
    """Collective: read this process's part of a sharded checkpoint into the student (``held``;
    the checkpoint must hold exactly the ``expected`` student names), the aux modules, the
    optimizer and the scheduler, and restore rank 0's RNG states. ValueError/KeyError when the
    checkpoint does not fit."""
    from ..checkpoint import restore_rng
    from ..dcp_storage import read_metadata

    md = read_metadata(path)
    aux = sharded_state.module_held(AUX, state.aux)
    sharded_state.check_keys(md, STUDENT, expected)
    sharded_state.check_keys(md, AUX, {h.key[len(AUX) :] for h in aux})
    with guard("loading the sharded checkpoint"):
        sharded_state.load(path, [*held, *aux], state.optimizer)
    saved = json.loads((path / OPTIMIZER_JSON).read_text())
    sharded_state.apply_param_groups(state.optimizer, saved.get("param_groups"))
    state.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    restore_rng(torch.load(path / "rng.pt", weights_only=True))


def restore_residuals(path: Path, compression: Any, params: list[nn.Parameter]) -> None:
    """This rank's error-feedback residuals from its own file (they start from zero, with a
    warning, when the checkpoint has none for this rank or another layout wrote them)."""
    from .compression import restore_residuals as restore

    own = path / residual_file(dist.get_rank() if dist.is_initialized() else 0)
    restore(compression, params, load_file(str(own)) if own.is_file() else None)
