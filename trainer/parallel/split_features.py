"""Hidden-state and attention transfer for a student split by tensor and/or pipeline parallelism.

The single-process loss of a phase is the mean of its objectives; the hidden objective is the
mean over layer pairs of a token mean of ``MSE(proj(h_s), h_t)``, the attention objective the
mean over pairs and q/k/v of a token mean of a relation KL (``hidden_transfer.py``,
``attention_transfer.py``). Every one of those terms is a sum over tokens divided by the
micro-batch's attention-mask count, so it splits exactly:

- **where**: a pair's term is computed on the pipeline stage that owns its student block (the
  student's hidden index ``s + 1`` is block ``s``'s output, after the final norm for the last
  block, as in Hugging Face's ``hidden_states``), on every tensor peer there. Nothing of the
  student travels between stages for it, and the teacher's hidden states / q/k/v for that pair
  are computed (or received from the split teacher) on that stage.
- **gradients**: on a stage that is not the last, the term is attached to the stage's outgoing
  activation (``_AttachLoss``): when the pipeline's backward brings the activation's gradient
  back, autograd also backpropagates 1 into the term, so the stage's blocks and the aux
  projection receive exactly its gradient, and the block's inputs carry it on to earlier stages.
  On the last stage the schedule's loss function adds the term of its micro-batch.
- **tensor shards**: q/k/v projections are column-parallel, so each tensor peer holds its heads'
  columns; they are gathered along the feature axis (``_GatherColumns``, whose backward keeps
  the rank's own columns, as every tensor peer computes the same loss). Hidden states between
  blocks are replicated already.
- **normalisation**: per micro-batch, ``sum / N`` with ``N`` the attention-mask count of the
  whole global micro-batch (all data ranks), times the data degree (DDP averages), times
  ``1 / n_objectives`` and ``1 / n_terms`` (pairs, or pairs x 3) as the single-process means.

The aux modules are replicated on every rank: ``ParallelRuntime.average_grads`` sums their
gradients over the world and divides by ``data * tensor`` (only the owning stage contributes,
once per tensor peer), keeping a gradient absent where no rank produced one, as a single
process leaves it ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..attention_transfer import relation_kl
from ..hidden_transfer import upcast

TARGET_MASK = "kd_mask"


class _AttachLoss(torch.autograd.Function):
    """Returns ``x``; its backward also sends a gradient of 1 into ``term``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, term: Tensor) -> Tensor:
        ctx.term_shape = term.shape
        ctx.term_dtype = term.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, torch.ones(ctx.term_shape, dtype=ctx.term_dtype, device=grad.device)


class _GatherColumns(torch.autograd.Function):
    """All-gather column shards along the last axis; the backward keeps this rank's columns."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, world: int, rank: int) -> Tensor:
        ctx.world, ctx.rank = world, rank
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad.chunk(ctx.world, dim=-1)[ctx.rank].contiguous(), None, None, None


def hidden_key(teacher_index: int) -> str:
    return f"kd_hidden_{teacher_index}"


def qkv_key(teacher_layer: int, which: int) -> str:
    return f"kd_{'qkv'[which]}_{teacher_layer}"


@dataclass
class StepObjectives:
    """What the current micro-step trains (set by the flow before each one)."""

    hidden: bool = False
    attention: bool = False
    attention_key: str = ""
    weight: float = 1.0  # 1 / number of objectives of the phase
    scale: float = 1.0  # data degree / global mask count * grad scale


@dataclass
class StageFeatures:
    """The hidden/attention terms of one rank's student blocks ``[lo, hi)``."""

    aux: nn.ModuleDict
    pairs: list[tuple[int, int]]  # (student layer, teacher layer)
    lo: int
    hi: int
    tensor_group: Any = None  # the tensor-parallel group (q/k/v columns are sharded over it)
    tensor_size: int = 1
    tensor_rank: int = 0
    step: StepObjectives = field(default_factory=StepObjectives)
    # Per call (micro-batch): float64 [hidden sum, attention sum] for the report, and on the last
    # stage the term the loss function adds (forward and loss alternate per micro-batch).
    reported: list[Tensor] = field(default_factory=list)
    pending: list[Tensor] = field(default_factory=list)

    def owned(self) -> list[int]:
        """Indices into ``pairs`` whose student block this stage runs."""
        return [p for p, (s, _) in enumerate(self.pairs) if self.lo <= s < self.hi]

    @property
    def active(self) -> bool:
        return bool(self.owned()) and (self.step.hidden or self.step.attention)

    def student_layers(self) -> list[int]:
        return sorted({self.pairs[p][0] for p in self.owned()}) if self.step.attention else []

    # ---- the teacher side: what this stage needs, as keyword tensors ---------------------------
    def wanted(self) -> tuple[list[int], list[int]]:
        """(teacher hidden indices, teacher q/k/v layers) this stage's terms read."""
        own = self.owned() if self.active else []
        hidden = sorted({self.pairs[p][1] + 1 for p in own}) if self.step.hidden else []
        qkv = sorted({self.pairs[p][1] for p in own}) if self.step.attention else []
        return hidden, qkv

    def targets(
        self, mask: Tensor, hidden: dict[int, Tensor], qkv: dict[int, tuple[Tensor, Tensor, Tensor]]
    ) -> dict[str, Tensor]:
        """The keyword tensors of one stage call: the mask and the teacher pieces it reads."""
        want_hidden, want_qkv = self.wanted()
        if not want_hidden and not want_qkv:
            return {}
        out = {TARGET_MASK: mask}
        for i in want_hidden:
            out[hidden_key(i)] = hidden[i].float()
        for layer in want_qkv:
            for x in range(3):
                out[qkv_key(layer, x)] = qkv[layer][x].float()
        return out

    # ---- the student side ----------------------------------------------------------------------
    def term(
        self, states: tuple[Tensor, ...], qkv: dict[int, tuple[Tensor, ...]], targets: dict[str, Tensor]
    ) -> Tensor:
        """This call's scaled term to backpropagate; keeps the unscaled sums for the report.

        ``states[i - lo]`` is the student's hidden index i for ``lo <= i <= hi``."""
        mask = targets[TARGET_MASK].to(states[0].device)
        m = mask.to(torch.float32)
        own = self.owned()
        total = states[0].new_zeros((), dtype=torch.float32)
        sums = torch.zeros(2, dtype=torch.float64)
        n = len(self.pairs)
        if self.step.hidden:
            proj = self.aux["hidden"].projections
            hidden_sum = total
            for p in own:
                s, t = self.pairs[p]
                hs = states[s + 1 - self.lo]
                ht = targets[hidden_key(t + 1)].to(hs.device)
                diff = proj[p](upcast(hs)) - upcast(ht).detach()
                hidden_sum = hidden_sum + (diff.pow(2).mean(dim=-1) * m).sum()
            hidden_sum = hidden_sum / n
            sums[0] = hidden_sum.detach().double().cpu()
            total = total + hidden_sum
        if self.step.attention:
            module = self.aux[self.step.attention_key]
            s_scale = 1.0 / math.sqrt(module.rank)
            attn_sum = states[0].new_zeros((), dtype=torch.float32)
            for p in own:
                s, t = self.pairs[p]
                for x in range(3):
                    sx = self._full_columns(qkv[s][x])
                    tx = targets[qkv_key(t, x)].to(sx.device).detach()
                    s_low = module.student_proj[p][x](upcast(sx))
                    t_low = tx @ module.teacher_projection(p, x).to(tx.dtype)
                    t_scale = 1.0 / math.sqrt(module.teacher_dims[x])
                    attn_sum = attn_sum + (relation_kl(s_low, t_low, s_scale, t_scale, mask) * m).sum()
            attn_sum = attn_sum / (3 * n)
            sums[1] = attn_sum.detach().double().cpu()
            total = total + attn_sum
        self.reported.append(sums)
        return total * (self.step.weight * self.step.scale)

    def _full_columns(self, x: Tensor) -> Tensor:
        if self.tensor_size == 1:
            return x
        return _GatherColumns.apply(x, self.tensor_group, self.tensor_size, self.tensor_rank)

    def run(
        self,
        model: nn.Module,
        key: str,
        x: Tensor,
        targets: dict[str, Tensor],
        pool: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """One forward of the (hollowed) model with this stage's terms: the outgoing activation
        (or logits on the last stage), with the term attached or queued for the loss. ``pool``:
        a split classifier's scored positions (``stages.run_stage_model``)."""
        from ..qkv_capture import QKVCapture
        from .stages import run_stage_model

        with QKVCapture(model, self.student_layers()) as cap:
            if getattr(model, "kdistill_stage", None) is not None:
                out = run_stage_model(model, x, pool=pool, output_hidden_states=True, **kwargs)
            else:
                out = model(**{key: x}, use_cache=False, output_hidden_states=True, **kwargs)
        states = tuple(out.hidden_states or ())
        if len(states) != self.hi - self.lo + 1:
            raise RuntimeError(
                f"student stage reported {len(states)} hidden states for blocks [{self.lo}, {self.hi}); "
                f"expected {self.hi - self.lo + 1}"
            )
        term = self.term(states, cap.qkv, targets)
        return out.logits, term

    def attach(self, output: Tensor, term: Tensor) -> Tensor:
        return _AttachLoss.apply(output, term)
