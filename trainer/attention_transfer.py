"""Low-rank attention transfer: MiniLM-style Q-Q / K-K / V-V relations in a rank-r subspace.

MiniLM (Wang et al., 2020; v2 2021) transfers self-attention *relations*: for X in {Q, K, V}
of a layer, R_X = softmax(X Xᵀ / √d) is an LxL matrix that does not depend on the width or the
head count, so a narrow student with fewer heads can match a wide teacher. Computed per teacher
head it costs O(B·H·L²·d_h) = O(B·L²·d) time and O(B·H·L²) memory per relation.

Here each side is first brought into an r-dimensional subspace, then one relation is formed:
- teacher: X̃_t = X_t·P with P a fixed, seeded random matrix with orthonormal columns (when
  r < d; orthonormal rows when r ≥ d), scaled by √(d/r) so that E[X̃ X̃ᵀ] = X Xᵀ
  (Johnson-Lindenstrauss): the teacher's relation logits X̃ X̃ᵀ/√d_t estimate MiniLM's
  whole-width logits X Xᵀ/√d_t and equal them exactly when r ≥ d. P is not trained, so the
  teacher target is fixed.
- student: X̃_s = Linear(d_s → r)(X_s), learned, relation logits X̃ X̃ᵀ/√r.
Padded keys are masked out of the softmax; the loss is KL(R_t ‖ R_s) per query row, averaged
over valid rows, the three relations and the layer pairs.

Cost per relation: O(B·L·d·r) for the projections plus O(B·L²·r) for the relation, against
O(B·L²·d) for full-width relations, and O(B·L²) memory against O(B·H·L²) for per-head ones;
with r ≪ d the L² term, which dominates for long sequences, shrinks by d/r.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hidden_transfer import masked_token_mean, upcast


def orthonormal_projection(d: int, r: int, generator: torch.Generator) -> Tensor:
    """[d, r] with X·P·Pᵀ·Xᵀ ≈ X·Xᵀ in expectation (exact when r >= d)."""
    gauss = torch.randn(max(d, r), min(d, r), generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gauss)  # orthonormal columns, [max, min]
    if r <= d:
        return (q * math.sqrt(d / r)).float()  # [d, r], orthonormal columns, JL-scaled
    return q.t().contiguous().float()  # [d, r] with orthonormal rows: P Pᵀ = I


def relation_kl(student: Tensor, teacher: Tensor, s_scale: float, t_scale: float, mask: Tensor) -> Tensor:
    """KL(softmax(T Tᵀ·t_scale) ‖ softmax(S Sᵀ·s_scale)) per query row, masked keys excluded. [B, L]."""
    key_mask = mask.bool()[:, None, :]  # [B, 1, L]
    s_logits = (student @ student.transpose(1, 2)) * s_scale
    t_logits = (teacher @ teacher.transpose(1, 2)) * t_scale
    # A finite fill keeps rows without valid keys (fully padded samples) NaN-free; those rows
    # are dropped by the query mask anyway.
    fill = torch.finfo(s_logits.dtype).min
    log_s = F.log_softmax(s_logits.masked_fill(~key_mask, fill), dim=-1)
    log_t = F.log_softmax(t_logits.masked_fill(~key_mask, fill), dim=-1)
    kl = log_t.exp() * (log_t - log_s)
    return kl.masked_fill(~key_mask, 0.0).sum(dim=-1)


class LowRankAttentionTransfer(nn.Module):
    """Q-Q/K-K/V-V relation transfer in a rank-r subspace (see the module docstring)."""

    def __init__(
        self,
        student_dims: tuple[int, int, int],
        teacher_dims: tuple[int, int, int],
        rank: int,
        pairs: list[tuple[int, int]],
        seed: int,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"attention rank must be >= 1, got {rank}")
        if not pairs:
            raise ValueError("attention transfer needs at least one layer pair")
        if len(student_dims) != 3 or len(teacher_dims) != 3 or min(*student_dims, *teacher_dims) < 1:
            raise ValueError(f"q/k/v widths must be three positive ints, got {student_dims} and {teacher_dims}")
        self.rank = rank
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.student_dims = tuple(int(d) for d in student_dims)
        self.teacher_dims = tuple(int(d) for d in teacher_dims)
        self.student_proj = nn.ModuleList(
            nn.ModuleList(nn.Linear(d, rank, bias=False) for d in self.student_dims) for _ in self.pairs
        )
        gen = torch.Generator().manual_seed(int(seed))
        for p in range(len(self.pairs)):
            for x, d in enumerate(self.teacher_dims):
                self.register_buffer(f"teacher_proj_{p}_{x}", orthonormal_projection(d, rank, gen))

    def teacher_projection(self, pair: int, which: int) -> Tensor:
        buf = getattr(self, f"teacher_proj_{pair}_{which}")
        assert isinstance(buf, Tensor)
        return buf

    def forward(
        self,
        student_qkv: list[tuple[Tensor, Tensor, Tensor]],
        teacher_qkv: list[tuple[Tensor, Tensor, Tensor]],
        mask: Tensor,
    ) -> Tensor:
        if len(student_qkv) != len(self.pairs) or len(teacher_qkv) != len(self.pairs):
            raise ValueError(
                f"expected q/k/v for {len(self.pairs)} layer pairs, got {len(student_qkv)} (student) and "
                f"{len(teacher_qkv)} (teacher)"
            )
        s_scale = 1.0 / math.sqrt(self.rank)
        losses = []
        for p, (s_xs, t_xs) in enumerate(zip(student_qkv, teacher_qkv, strict=True)):
            for x in range(3):
                s, t = s_xs[x], t_xs[x]
                if s.shape[-1] != self.student_dims[x] or t.shape[-1] != self.teacher_dims[x]:
                    raise ValueError(
                        f"pair {self.pairs[p]} {'qkv'[x]}: widths {s.shape[-1]} (student) / {t.shape[-1]} (teacher) "
                        f"do not match the configured {self.student_dims[x]} / {self.teacher_dims[x]}"
                    )
                if s.shape[:2] != mask.shape or t.shape[:2] != mask.shape:
                    raise ValueError(
                        f"q/k/v {tuple(s.shape[:2])} / {tuple(t.shape[:2])} do not match mask {tuple(mask.shape)}"
                    )
                s_low = self.student_proj[p][x](upcast(s))
                t_in = upcast(t).detach()
                t_low = t_in @ self.teacher_projection(p, x).to(t_in.dtype)
                rows = relation_kl(s_low, t_low, s_scale, 1.0 / math.sqrt(self.teacher_dims[x]), mask)
                losses.append(masked_token_mean(rows, mask))
        return torch.stack(losses).mean()
