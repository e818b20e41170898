"""The aux modules of a run: hidden-state projections and attention-transfer factors.

They are built for every stage up front, so the optimizer's parameter set never changes between
stages, and initialised from their own seed, so adding one does not shift the student's or the
data's random streams.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode

from .errors import TrainerError
from .stages import Phase


def layer_pairs(spec: DistillationJobSpec, student: nn.Module, teacher: nn.Module) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs: the spec's layerMap, or evenly spaced teacher layers."""
    from .hidden_transfer import resolve_layer_map

    explicit = [(p.student, p.teacher) for p in spec.distillation.layer_map] or None
    try:
        return resolve_layer_map(int(student.config.num_hidden_layers), int(teacher.config.num_hidden_layers), explicit)
    except ValueError as exc:
        raise TrainerError(ExitCode.BAD_SPEC, f"distillation.layerMap: {exc}") from None


@torch.no_grad()
def probe_qkv_dims(model: nn.Module, layers: list[int], pad_id: int, device: torch.device) -> tuple[int, int, int]:
    """Widths of the q/k/v projections of ``model``'s first listed layer, from a 4-token forward."""
    from .qkv_capture import QKVCapture

    was = model.training
    model.eval()
    ids = torch.full((1, 4), pad_id, dtype=torch.long, device=device)
    try:
        with QKVCapture(model, layers) as cap:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        q, k, v = cap.qkv[layers[0]]
    except ValueError as exc:
        raise TrainerError(ExitCode.BAD_SPEC, f"attention transfer: {exc}") from None
    finally:
        model.train(was)
    return int(q.shape[-1]), int(k.shape[-1]), int(v.shape[-1])


def build_aux(
    spec: DistillationJobSpec,
    plan: list[Phase],
    student: nn.Module,
    teacher: nn.Module,
    parallel: Any,  # ParallelRuntime
    pad_id: int,
    device: torch.device,
    student_qkv_dims: tuple[int, int, int] | None = None,
) -> tuple[nn.ModuleDict, list[tuple[int, int]]]:
    """The aux modules every stage of ``plan`` needs, on ``device``, and the layer pairs they use.
    ``student_qkv_dims``: the student's q/k/v widths when the student can no longer be probed
    (split over ranks; the model-parallel flow probed it before the split)."""
    aux = nn.ModuleDict()
    objectives = {o for p in plan for o in p.objectives}
    if not objectives & {"hidden", "attention"}:
        return aux, []
    pairs = layer_pairs(spec, student, teacher)
    seed = spec.distillation.seed
    torch.manual_seed(seed + 1)
    if "hidden" in objectives:
        from .hidden_transfer import HiddenStateTransfer

        aux["hidden"] = HiddenStateTransfer(int(student.config.hidden_size), int(teacher.config.hidden_size), pairs)
    if "attention" in objectives:
        from .attention_transfer import LowRankAttentionTransfer

        s_dims = student_qkv_dims or probe_qkv_dims(student, [s for s, _ in pairs], pad_id, device)
        # A split teacher holds one stage: it knows its q/k/v widths without the other blocks.
        t_dims = (
            parallel.teacher.qkv_dims
            if parallel.split_teacher
            else probe_qkv_dims(teacher, [t for _, t in pairs], pad_id, device)
        )
        for rank in sorted({p.attention_rank for p in plan if "attention" in p.objectives}):
            aux[f"attention_r{rank}"] = LowRankAttentionTransfer(s_dims, t_dims, rank, pairs, seed=seed)
    torch.manual_seed(seed)
    return aux.to(device), pairs
