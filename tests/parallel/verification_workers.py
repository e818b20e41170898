"""Rank functions for tests/parallel/test_checkpoint_verification.py (no transformers import)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdistill.trainer import checkpoint
from kdistill.trainer.parallel.distributed import DistEnv
from kdistill.trainer.parallel.runtime import ParallelRuntime


def latest_run(env: DistEnv, workdir: Path, args: dict) -> None:
    """``CheckpointManager.latest`` with this rank's share of the files and the runtime's collectives;
    records which files this rank hashed. ``hide``/``phantom`` ({rank: step}) skew a rank's listing."""
    hashed: list[str] = []
    real = checkpoint.sha256_file

    def counting(path: Path) -> str:
        hashed.append(f"{path.parent.name}/{path.name}")
        return real(path)

    checkpoint.sha256_file = counting  # type: ignore[assignment]

    manager = checkpoint.CheckpointManager(Path(args["root"]), keep=3)
    listing = manager.listed_steps
    hidden = args.get("hide", {}).get(str(env.rank))
    phantom = args.get("phantom", {}).get(str(env.rank))

    def listed_steps() -> list[int]:
        """This rank's listing, as if taken before ``hide`` landed or before ``phantom`` was pruned."""
        found = [step for step in listing() if step != hidden]
        return ([phantom] if phantom is not None else []) + found

    manager.listed_steps = listed_steps  # type: ignore[method-assign]
    group = ParallelRuntime(env=env, layout=None, device=torch.device("cpu"))  # type: ignore[arg-type]
    info = manager.latest((env.rank, env.world_size), group)
    (workdir / f"rank{env.rank}.json").write_text(
        json.dumps({"step": None if info is None else info.step, "path": info and info.path.name, "hashed": hashed})
    )
