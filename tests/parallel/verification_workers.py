"""Rank functions for tests/parallel/test_checkpoint_verification.py (no transformers import)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from kdistill.trainer import checkpoint
from kdistill.trainer.parallel.distributed import DistEnv


def latest_run(env: DistEnv, workdir: Path, args: dict) -> None:
    """``CheckpointManager.latest`` with this rank's share of the files and a MIN all-reduce as the
    agreement (what ``ParallelRuntime.agree_sound`` does); records which files this rank hashed."""
    hashed: list[str] = []
    real = checkpoint.sha256_file

    def counting(path: Path) -> str:
        hashed.append(f"{path.parent.name}/{path.name}")
        return real(path)

    checkpoint.sha256_file = counting  # type: ignore[assignment]

    def agree(local: bool) -> bool:
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    info = checkpoint.CheckpointManager(Path(args["root"]), keep=3).latest((env.rank, env.world_size), agree)
    (workdir / f"rank{env.rank}.json").write_text(
        json.dumps({"step": None if info is None else info.step, "hashed": hashed})
    )
