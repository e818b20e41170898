"""The student over the (pipeline, data, tensor) mesh: DDP, DTensor tensor parallelism, pipelining.

- **tensor**: Megatron-style sharding through ``parallelize_module``: q/k/v and gate/up are
  ``ColwiseParallel`` (each rank computes its heads / its slice of the MLP), o and down are
  ``RowwiseParallel`` (one all-reduce per block half). Embeddings, norms and the head stay
  replicated. Llama-family layer names only: GPT2's fused ``c_attn`` Conv1D cannot be cut by
  columns without re-ordering q/k/v, which would change checkpoint layouts.
- **data**: ``DistributedDataParallel`` over the mesh's data dimension (with TP, DDP's
  ``device_mesh`` path localises the DTensor parameters). A gradient-compression hook plugs in
  here (``compression.py``).
- **pipeline**: ``torch.distributed.pipelining`` (``PipelineStage`` + ``ScheduleGPipe``) over
  stages cut by ``stages.py``; parameter names stay the full model's, so checkpoints of any
  pipeline degree share keys. Stages get no attention mask: with right padding (what
  ``collate`` builds) causal attention already keeps padding out of every valid token, and the
  loss masks padded rows, so the result on valid tokens is exact.

Loss normalisation is global: every rank divides its token-loss sum by the number of valid
tokens in the whole global micro-batch (all data ranks), times the data degree because DDP
averages. One step therefore equals a single-process step on the concatenated batch exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdistill.api.failures import ExitCode

from ..errors import TrainerError
from .distributed import peer_guard
from .mesh import MeshLayout
from .stages import balance_layers, decoder_parts, hollow_to_stage, stage_costs, stage_forward

# token_loss(student_logits [b,L,V], teacher_logits [b,L,V], labels [b,L]) -> per-token loss [b,L]
# (positions whose label is -100 are masked afterwards, whatever the function returns there).
TokenLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
IGNORE = -100

LLAMA_TP_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    """Shard attention and MLP of every (owned) block over ``tp_mesh`` in place."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parts = decoder_parts(model)
    if parts.family != "llama":
        raise TrainerError(
            ExitCode.BAD_SPEC,
            f"parallelism.student.tensor > 1 supports Llama-family students (q/k/v/o, gate/up/down "
            f"projections); {type(model).__name__} has fused attention projections",
        )
    tp = tp_mesh.size()
    cfg = model.config
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = int(getattr(cfg, name))
        if value % tp:
            raise TrainerError(ExitCode.BAD_SPEC, f"student {name}={value} is not divisible by tensor={tp}")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {k: styles[v]() for k, v in LLAMA_TP_PLAN.items()}
    for layer in parts.layers:
        if hasattr(layer, "self_attn"):  # pass-through blocks of other pipeline stages have none
            parallelize_module(layer, tp_mesh, plan)


@dataclass
class ParallelStudent:
    """One rank's piece of the student and the way to run one micro-batch through it."""

    layout: MeshLayout
    rank: int
    model: nn.Module  # the (hollowed, TP-sharded) HF model: its state_dict has the full model's names
    module: nn.Module  # what runs forward: DDP(model) or DDP(stage wrapper) or the model
    token_loss: TokenLoss
    device: torch.device
    mesh: Any
    micro_batches: int = 1
    # Tied input embedding / LM head cut apart by the pipeline: the first and last stage each
    # hold a copy and add their gradients (Megatron's embedding group).
    tied_group: Any = None
    tied_weight: nn.Parameter | None = None
    # Parameters by full-model name, captured once wrapped: DDP's TP path swaps the module's
    # attributes around every forward, but these objects are the ones DDP reduces and the
    # optimizer must update.
    named_params: dict[str, nn.Parameter] = field(default_factory=dict)
    _schedules: dict[tuple[int, ...], Any] = field(default_factory=dict)
    # The pipeline stage module (pipeline > 1): its forward runs under the step's autocast.
    stage: _Stage | None = None
    # How many times the last step called ``token_loss`` for real. A new schedule also calls it
    # while inferring shapes (on placeholder values), before the real micro-batches.
    last_loss_calls: int = 0

    @property
    def coords(self) -> dict[str, int]:
        return self.layout.coords(self.rank)

    @property
    def is_last_stage(self) -> bool:
        return self.coords["pipeline"] == self.layout.pipeline - 1

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.named_params.values() if p.requires_grad]

    def forward_backward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        grad_scale: float = 1.0,
        autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
        token_weights: torch.Tensor | None = None,
    ) -> float:
        """Forward and backward of this rank's share of the global micro-batch.

        ``input_ids``/``labels`` are this data rank's rows (the same on every tensor and pipeline
        peer); ``teacher_logits`` is needed on the last pipeline stage only. Gradients are left on
        the parameters, reduced over data ranks, multiplied by ``grad_scale`` (1/accumulation
        steps in the training loop); returns the global mean loss (unscaled) on every rank.
        ``autocast`` makes the context the student's forward runs in (QAT's reduced precision);
        the loss and the backward run outside it. ``token_weights`` [b, L] (the loss ranks'
        entropy weights, which ``token_loss`` applies) make the loss a weighted token mean: the
        normalisation divides by their global sum instead of the token count.
        """
        with peer_guard("the student step"):
            input_ids = input_ids.to(self.device)
            labels = labels.to(self.device)
            valid = (labels != IGNORE).sum().to(torch.float64)
            if token_weights is not None:
                valid = (token_weights.to(self.device).double() * (labels != IGNORE)).sum()
            if self.layout.data > 1:
                dist.all_reduce(valid, group=self.mesh["data"].get_group())
            # DDP averages over data ranks; the extra factor makes the result a global token mean.
            scale = float(self.layout.data) / max(float(valid.item()), 1.0) * grad_scale
            self.last_loss_calls = 1
            if self.layout.pipeline == 1:
                mask = None if attention_mask is None else attention_mask.to(self.device)
                with autocast():
                    logits = self.module(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                loss = self._masked_sum(logits, teacher_logits, labels) * scale
                loss.backward()
                local = loss.detach()
            else:
                assert self.stage is not None
                self.stage.autocast = autocast
                local = self._pipeline_step(input_ids, labels, teacher_logits, scale)
                self._sum_tied_grads()
            return self._global_loss(local) / grad_scale

    def _sum_tied_grads(self) -> None:
        weight = self.tied_weight
        if self.tied_group is None or weight is None:
            return
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=self.tied_group)

    def _masked_sum(self, logits: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        if teacher is None:
            raise ValueError("teacher logits are required on the stage that computes the loss")
        per_token = self.token_loss(logits, teacher.to(logits.device), labels)
        return per_token.masked_fill(labels == IGNORE, 0.0).sum()

    def _pipeline_step(
        self, input_ids: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        schedule = self._schedule_for(tuple(input_ids.shape), scale)
        self.last_loss_calls = schedule._n_microbatches if self.is_last_stage else 0
        stage = self.coords["pipeline"]
        losses: list[torch.Tensor] = []
        if stage == 0:
            schedule.step(input_ids)
        elif self.is_last_stage:
            if teacher is None:
                raise ValueError("the last pipeline stage needs the teacher logits")
            # The schedule splits one target tensor into micro-batches: pack labels as a last
            # channel (exact in float32 for any vocabulary below 2**24).
            packed = torch.cat([teacher.to(self.device).float(), labels.unsqueeze(-1).float()], dim=-1)
            schedule.step(target=packed, losses=losses)
        else:
            schedule.step()
        if self.is_last_stage:
            return torch.stack([x.detach() for x in losses]).sum()
        return torch.zeros((), device=self.device)

    def _schedule_for(self, shape: tuple[int, ...], scale: float) -> Any:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        key = shape
        entry = self._schedules.get(key)
        if entry is None:
            # A stage infers the shapes it exchanges on its first step, so one per batch shape.
            stage = PipelineStage(
                self.module,
                stage_index=self.coords["pipeline"],
                num_stages=self.layout.pipeline,
                device=self.device,
                group=self.mesh["pipeline"].get_group(),
            )
            holder: dict[str, float] = {}

            def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                labels = target[..., -1].round().long()
                return self._masked_sum(output, target[..., :-1], labels) * holder["scale"]

            # The schedule chunks rows evenly: use the largest count up to the configured one that
            # divides this batch's rows (a short batch runs fewer micro-batches).
            n_micro = max(n for n in range(1, max(1, min(self.micro_batches, shape[0])) + 1) if shape[0] % n == 0)
            schedule = ScheduleGPipe(stage, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)
            entry = (schedule, holder)
            self._schedules[key] = entry
        entry[1]["scale"] = scale
        return entry[0]

    def _global_loss(self, local: torch.Tensor) -> float:
        """Sum of every data rank's share, counted once per data rank (last stage, tensor rank 0)."""
        if self.layout.world_size == 1:
            return float(local.item())
        c = self.coords
        mine = local.detach().to(torch.float64) / self.layout.data
        if not (self.is_last_stage and c["tensor"] == 0):
            mine = torch.zeros_like(mine)
        dist.all_reduce(mine)
        return float(mine.item())


class _Stage(nn.Module):
    """A hollowed model as a pipeline stage: one tensor in, one tensor out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.autocast: Callable[[], AbstractContextManager[Any]] = nullcontext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = stage_forward(self.model, x)
        # One dtype between stages whatever the precision: a schedule keeps the shapes and dtypes
        # of its first step.
        return out.float()


def parallelize_student(
    model: nn.Module,
    layout: MeshLayout,
    rank: int,
    mesh: Any,
    token_loss: TokenLoss,
    *,
    device: torch.device,
    micro_batches: int | None = None,
    ddp_kwargs: dict[str, Any] | None = None,
) -> ParallelStudent:
    """Cut (pipeline), shard (tensor) and wrap (data) ``model`` for this rank, in that order."""
    coords = layout.coords(rank)
    model.to(device)
    module: nn.Module = model
    tied_group = tied_weight = None
    stage: _Stage | None = None
    if layout.pipeline > 1 and decoder_parts(model).tied:
        tied_weight = decoder_parts(model).head.weight
        # new_group is collective: every rank creates every pair, in the same order.
        for data in range(layout.data):
            for tensor in range(layout.tensor):
                pair = [layout.rank_of(0, data, tensor), layout.rank_of(layout.pipeline - 1, data, tensor)]
                group = dist.new_group(pair)
                if rank in pair:
                    tied_group = group
        if tied_group is None:
            tied_weight = None
    if layout.pipeline > 1:
        try:
            ranges = balance_layers(stage_costs(model), layout.pipeline)
        except ValueError as exc:
            raise TrainerError(ExitCode.BAD_SPEC, f"student pipeline split: {exc}") from None
        p = coords["pipeline"]
        hollow_to_stage(model, ranges[p], first=p == 0, last=p == layout.pipeline - 1)
        module = stage = _Stage(model)
    if layout.tensor > 1:
        apply_tensor_parallel(model, mesh["tensor"])
    if layout.data > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        kwargs = dict(ddp_kwargs or {})
        if layout.tensor > 1:
            # DDP's mesh path localises the DTensor parameters of the TP shards.
            module = DDP(module, device_mesh=mesh["data"], **kwargs)
        else:
            module = DDP(module, process_group=mesh["data"].get_group(), **kwargs)
    return ParallelStudent(
        named_params=dict(model.named_parameters()),
        layout=layout,
        rank=rank,
        model=model,
        module=module,
        token_loss=token_loss,
        device=device,
        mesh=mesh,
        micro_batches=micro_batches or max(1, layout.pipeline),
        tied_group=tied_group,
        tied_weight=tied_weight,
        stage=stage,
    )
