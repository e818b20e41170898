"""Functions the multi-process tests run on every rank (see harness.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    save_file(
        {
            "logits": logits,
            "ids": ids,
            "mask": mask,
            "param_bytes": torch.tensor([teacher.param_bytes], dtype=torch.int64),
        },
        str(workdir / f"rank{env.rank}.safetensors"),
    )


def token_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token T^2 KL(teacher || student) at T=2 plus cross-entropy: a real KD objective."""
    t = 2.0
    log_s = torch.log_softmax(student.float() / t, -1)
    log_t = torch.log_softmax(teacher.float() / t, -1)
    kd = (log_t.exp() * (log_t - log_s)).sum(-1) * t * t
    ce = torch.nn.functional.cross_entropy(
        student.float().flatten(0, 1), labels.clamp_min(0).flatten(), reduction="none"
    ).view_as(labels)
    return 0.7 * kd + 0.3 * ce


def student_batch(rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = batch(seed=123, rows=rows, length=length)
    labels = ids.masked_fill(mask == 0, -100)
    teacher = torch.randn(rows, length, 64, generator=torch.Generator().manual_seed(7)) * 3
    return ids, mask, labels, teacher


def sample_weights(rows: int, length: int) -> torch.Tensor:
    """Per-token weights [rows, length]: one weight per sample, as entropy weighting gives."""
    return (torch.arange(rows, dtype=torch.float32) * 0.5 + 0.25)[:, None].expand(rows, length).contiguous()


def weighted_token_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``token_loss`` times the weight carried as the teacher's last channel."""
    return token_loss(student, teacher[..., :-1], labels) * teacher[..., -1]


def full_grads(student: Any) -> dict[str, torch.Tensor]:
    """Every gradient this rank holds, re-assembled over tensor-parallel peers where sharded
    (DTensor shards, or plain shards of the Llama plan and GPT2's Conv1D layers)."""
    from kdistill.trainer.parallel.student_state import _full

    out = {}
    for name, p in student.named_params.items():
        if p.grad is not None:
            out[name] = _full(student, name, p.grad).clone()
    return out


def student_step(env: DistEnv, workdir: Path, args: dict) -> None:
    from kdistill.trainer.parallel.mesh import build_device_mesh
    from kdistill.trainer.parallel.student import parallelize_student

    layout = MeshLayout(env.world_size, args["pipeline"], args["data"], args["tensor"], 1)
    mesh = build_device_mesh(layout, "cpu")
    model = tiny_model(args["family"], layers=4)
    loss_fn = weighted_token_loss if args.get("weighted") else token_loss
    student = parallelize_student(model, layout, env.rank, mesh, loss_fn, device=torch.device("cpu"))
    if args.get("qat"):
        from kdistill.trainer.parallel.student_qat import prepare_split_qat

        assert prepare_split_qat(student.model, tensor_parallel=layout.tensor > 1)
    ids, mask, labels, teacher = student_batch(args["rows"], args["length"])
    d = layout.coords(env.rank)["data"]
    per = args["rows"] // layout.data
    rows = slice(d * per, (d + 1) * per)
    weights = None
    if args.get("weighted"):
        weights = sample_weights(args["rows"], args["length"])
        teacher = torch.cat([teacher, weights.unsqueeze(-1)], dim=-1)
        weights = weights[rows]
    accum = int(args.get("accum", 1))
    if accum == 1:
        loss = student.forward_backward(ids[rows], labels[rows], teacher[rows], mask[rows], token_weights=weights)
    else:  # gradient accumulation: the rows in ``accum`` micro-batches, each scaled by 1/accum
        size, loss = per // accum, 0.0
        for i in range(accum):
            part = slice(rows.start + i * size, rows.start + (i + 1) * size)
            loss += student.forward_backward(ids[part], labels[part], teacher[part], mask[part], grad_scale=1 / accum)
        loss /= accum
    grads = full_grads(student)
    grads["__loss__"] = torch.tensor([loss], dtype=torch.float64)
    save_file(grads, str(workdir / f"rank{env.rank}.safetensors"))


def noop(env: DistEnv, workdir: Path, args: dict) -> None:
    (workdir / f"rank{env.rank}.ok").write_text("joined")
