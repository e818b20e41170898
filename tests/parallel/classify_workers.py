"""Functions the split-classifier tests run on every rank (see harness.py): a decoder
``*ForSequenceClassification`` teacher split into pipeline stages, and one step of a student
classifier split over a (pipeline, data, tensor) mesh."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from kdistill.trainer.parallel.distributed import DistEnv
from kdistill.trainer.parallel.mesh import MeshLayout
from kdistill.trainer.parallel.teacher_pipeline import SplitTeacher

from .models import VOCAB, tiny_model
from .workers import full_grads, token_loss

LABELS = 3


def padded_batch(seed: int, rows: int, length: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (never the pad id 0) with rows of different lengths, padded with 0 on ``side``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        pad = (r * 2) % (length - 1)
        if pad:
            cols = slice(length - pad, length) if side == "right" else slice(0, pad)
            ids[r, cols] = 0
            mask[r, cols] = 0
    return ids, mask


def classifier_teacher_split(env: DistEnv, workdir: Path, args: dict) -> None:
    model = tiny_model(args["family"], layers=args["layers"], num_labels=LABELS)
    layout = MeshLayout(env.world_size, 1, env.world_size, 1, args["stages"])
    teacher = SplitTeacher(model, layout.teacher_group(env.rank), env.rank, micro_batch_rows=args.get("micro"))
    # Members bring batches of different sizes and lengths.
    ids, mask = padded_batch(env.rank, rows=3 + env.rank, length=9 + env.rank, side=args["side"])
    save_file(
        {"logits": teacher.logits(ids, mask), "ids": ids, "mask": mask},
        str(workdir / f"rank{env.rank}.safetensors"),
    )


def classifier_batch(rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (as collate builds them), one label per row, teacher class logits [rows, 1, C]."""
    ids, mask = padded_batch(123, rows, length, "right")
    labels = (torch.arange(rows) % LABELS).reshape(rows, 1)
    teacher = torch.randn(rows, 1, LABELS, generator=torch.Generator().manual_seed(7)) * 3
    return ids, mask, labels, teacher


def classifier_student_step(env: DistEnv, workdir: Path, args: dict) -> None:
    from kdistill.trainer.parallel.mesh import build_device_mesh
    from kdistill.trainer.parallel.student import parallelize_student

    layout = MeshLayout(env.world_size, args["pipeline"], args["data"], args["tensor"], 1)
    mesh = build_device_mesh(layout, "cpu")
    model = tiny_model(args["family"], layers=4, num_labels=LABELS)
    student = parallelize_student(model, layout, env.rank, mesh, token_loss, device=torch.device("cpu"))
    if args.get("qat"):
        from kdistill.trainer.parallel.student_qat import prepare_split_qat

        assert prepare_split_qat(student.model, tensor_parallel=layout.tensor > 1)
    ids, mask, labels, teacher = classifier_batch(args["rows"], args["length"])
    d = layout.coords(env.rank)["data"]
    per = args["rows"] // layout.data
    rows = slice(d * per, (d + 1) * per)
    loss = student.forward_backward(ids[rows], labels[rows], teacher[rows], mask[rows])
    grads = full_grads(student)
    grads["__loss__"] = torch.tensor([loss], dtype=torch.float64)
    save_file(grads, str(workdir / f"rank{env.rank}.safetensors"))
