"""Hidden-state transfer: student layers regress onto teacher layers through learned projections.

Layer indices are transformer-layer indices (0-based); in a model's ``output_hidden_states``
tuple, entry 0 is the embedding output, so layer i lives at index i + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def resolve_layer_map(
    num_student_layers: int, num_teacher_layers: int, explicit: list[tuple[int, int]] | None
) -> list[tuple[int, int]]:
    """The (student, teacher) layer pairs to match.

    Without an explicit map every student layer i is paired with teacher layer
    ⌊(i+1)·T/S⌋ - 1: evenly spaced, the last student layer on the last teacher layer (as
    DistilBERT keeps every other layer). An explicit map is validated and returned as given.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got student={num_student_layers}, teacher={num_teacher_layers}")
    if not explicit:
        return [(i, max(0, (i + 1) * num_teacher_layers // num_student_layers - 1)) for i in range(num_student_layers)]
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    for raw in explicit:
        s, t = int(raw[0]), int(raw[1])
        if not 0 <= s < num_student_layers:
            raise ValueError(
                f"layer pair (student={s}, teacher={t}): student layer must be in [0, {num_student_layers})"
            )
        if not 0 <= t < num_teacher_layers:
            raise ValueError(
                f"layer pair (student={s}, teacher={t}): teacher layer must be in [0, {num_teacher_layers})"
            )
        if (s, t) in seen:
            raise ValueError(f"layer pair (student={s}, teacher={t}) is listed twice")
        seen.add((s, t))
        pairs.append((s, t))
    return pairs


def upcast(x: Tensor) -> Tensor:
    """float32 for half-precision inputs (losses are summed in fp32); other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean of a [B, L] tensor over the positions where ``mask`` is non-zero (0 if none)."""
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


class HiddenStateTransfer(nn.Module):
    """MSE between projected student hidden states and teacher hidden states, per layer pair.

    The projection is a learned Linear(student_dim → teacher_dim) per pair (FitNets-style hint
    layers), or the identity when the widths agree, so equal-width students match directly.
    Cost: O(B·L·ds·dt) per pair for the projection, negligible beside the models.
    """

    def __init__(self, student_dim: int, teacher_dim: int, pairs: list[tuple[int, int]]) -> None:
        super().__init__()
        if student_dim < 1 or teacher_dim < 1:
            raise ValueError(f"hidden sizes must be >= 1, got student={student_dim}, teacher={teacher_dim}")
        if not pairs:
            raise ValueError("hidden-state transfer needs at least one layer pair")
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.projections = nn.ModuleList(
            nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim) for _ in self.pairs
        )

    def forward(self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], mask: Tensor) -> Tensor:
        losses = []
        for (s, t), proj in zip(self.pairs, self.projections, strict=True):
            if s + 1 >= len(student_hidden) or t + 1 >= len(teacher_hidden):
                raise ValueError(
                    f"layer pair (student={s}, teacher={t}) is out of range for hidden-state tuples of "
                    f"length {len(student_hidden)} (student) and {len(teacher_hidden)} (teacher)"
                )
            hs, ht = student_hidden[s + 1], teacher_hidden[t + 1]
            if hs.shape[-1] != self.student_dim or ht.shape[-1] != self.teacher_dim:
                raise ValueError(
                    f"hidden widths {hs.shape[-1]} (student) / {ht.shape[-1]} (teacher) do not match the "
                    f"configured {self.student_dim} / {self.teacher_dim}"
                )
            if hs.shape[:2] != mask.shape or ht.shape[:2] != mask.shape:
                raise ValueError(
                    f"hidden states {tuple(hs.shape[:2])} / {tuple(ht.shape[:2])} do not match mask {tuple(mask.shape)}"
                )
            diff = proj(upcast(hs)) - upcast(ht).detach()
            losses.append(masked_token_mean(diff.pow(2).mean(dim=-1), mask))
        return torch.stack(losses).mean()
