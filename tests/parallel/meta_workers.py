"""What each rank of tests/parallel/test_meta_student.py runs: the same saved student split two
ways in one process, today's (every rank loads it whole, then cuts) and the meta-device one
(cut on the meta device, then each rank reads its slices), one SGD step on each, and the
trained student written both ways (gathered to rank 0, and streamed shard by shard)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdistill.trainer.parallel.distributed import DistEnv
from kdistill.trainer.parallel.mesh import MeshLayout

from .workers import student_batch, token_loss

LR = 0.5
ROWS, LENGTH = 4, 12


def _local(p: torch.Tensor) -> torch.Tensor:
    return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()


def _step(student: object) -> float:
    ids, mask, labels, teacher = student_batch(ROWS, LENGTH)
    loss = student.forward_backward(ids, labels, teacher, mask)  # type: ignore[attr-defined]
    with torch.no_grad():
        for p in student.parameters():  # type: ignore[attr-defined]
            if p.grad is not None:
                p.add_(p.grad, alpha=-LR)
                p.grad = None
    return loss


def meta_vs_today(env: DistEnv, workdir: Path, args: dict) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdistill.trainer.parallel.mesh import build_device_mesh
    from kdistill.trainer.parallel.meta_load import StudentMaterializer, WeightSource, build_on_meta
    from kdistill.trainer.parallel.student import parallelize_student
    from kdistill.trainer.parallel.student_save import stream_student
    from kdistill.trainer.parallel.student_state import FullLayout, gather_state

    layout = MeshLayout(env.world_size, args["pipeline"], 1, args["tensor"], 1)
    mesh = build_device_mesh(layout, "cpu")
    cpu = torch.device("cpu")
    folder = workdir / "model"

    today = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    today_layout = FullLayout.of(today)
    old = parallelize_student(today, layout, env.rank, mesh, token_loss, device=cpu)

    meta = build_on_meta(AutoConfig.from_pretrained(str(folder)), "causal-lm")
    full = FullLayout.of(meta)
    assert full == today_layout
    fill = StudentMaterializer(
        WeightSource.of(folder, prefix=meta.base_model_prefix),
        device=cpu,
        tensor=layout.tensor,
        tensor_rank=layout.coords(env.rank)["tensor"],
        aliases=full.aliases,
    )
    new = parallelize_student(meta, layout, env.rank, mesh, token_loss, device=cpu, materialize=fill)

    # Same parameters (names, pieces, values) and the same buffers (rotary inv_freq, ...).
    assert list(old.named_params) == list(new.named_params)
    for name, p in old.named_params.items():
        assert torch.equal(_local(p), _local(new.named_params[name])), name
    for (a, x), (b, y) in zip(old.model.named_buffers(), new.model.named_buffers(), strict=True):
        assert a == b and torch.equal(x, y), a
    if old.tied_weight is not None:
        # The tied copy the stage sums gradients of is the parameter the stage trains.
        assert new.tied_weight is not None and any(p is new.tied_weight for p in new.model.parameters())

    losses = [(_step(old), _step(new)) for _ in range(2)]

    # gather_state writes an optimizer state of the trainer's two groups (matrices, the rest).
    params = old.parameters()
    groups = [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2]}]
    gathered = gather_state(old, torch.optim.SGD(groups, lr=LR), today_layout)
    out = workdir / "streamed" if env.rank == 0 else None
    stream_student(new, full, out, meta.config, shard_bytes=args["shard_bytes"])
    mine = {name: _local(p) for name, p in new.named_params.items()}
    save_file(
        {**{f"old.{n}": _local(p) for n, p in old.named_params.items()}, **{f"new.{n}": v for n, v in mine.items()}},
        str(workdir / f"params{env.rank}.safetensors"),
    )
    if gathered is not None:
        save_file({k: v.contiguous() for k, v in gathered.weights.items()}, str(workdir / "gathered.safetensors"))
    (workdir / f"rank{env.rank}.json").write_text(
        json.dumps({"losses": losses, "reads": fill.reads, "coords": layout.coords(env.rank)})
    )
