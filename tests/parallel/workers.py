"""Functions the multi-process tests run on every rank (see harness.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from kdistill.trainer.parallel.distributed import DistEnv
from kdistill.trainer.parallel.mesh import MeshLayout
from kdistill.trainer.parallel.teacher_pipeline import SplitTeacher

from .models import batch, tiny_model


def teacher_split(env: DistEnv, workdir: Path, args: dict) -> None:
    model = tiny_model(args["family"], layers=args["layers"])
    layout = MeshLayout(env.world_size, 1, env.world_size, 1, args["stages"])
    teacher = SplitTeacher(model, layout.teacher_group(env.rank), env.rank, micro_batch_rows=args.get("micro"))
    # Members bring batches of different sizes and lengths.
    ids, mask = batch(seed=env.rank, rows=2 + env.rank, length=10 + env.rank)
    logits = teacher.logits(ids, mask)
    save_file({"logits": logits, "ids": ids, "mask": mask,
               "param_bytes": torch.tensor([teacher.param_bytes], dtype=torch.int64)},
              str(workdir / f"rank{env.rank}.safetensors"))
