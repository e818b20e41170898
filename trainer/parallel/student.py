"""The student over the (pipeline, data, tensor) mesh: DDP, DTensor tensor parallelism, pipelining.

- **tensor**: Megatron-style sharding. Llama family through ``parallelize_module``: q/k/v and
  gate/up are ``ColwiseParallel`` (each rank computes its heads / its slice of the MLP), o and
  down are ``RowwiseParallel`` (one all-reduce per block half). GPT2 (``Conv1D`` layers, weights
  stored [in, out]) through ``ShardedConv1D``: the fused ``c_attn`` is cut per q/k/v section so
  each rank holds its heads' q, k and v columns, ``c_fc`` by columns, both ``c_proj`` by rows;
  checkpoints keep the unsplit layout (each section piece is a chunk of the unsplit tensor). Embeddings,
  norms and the head stay replicated.
- **data**: ``DistributedDataParallel`` over the mesh's data dimension (with TP, DDP's
  ``device_mesh`` path localises the DTensor parameters). A gradient-compression hook plugs in
  here (``compression.py``).
- **pipeline**: ``torch.distributed.pipelining`` (``PipelineStage`` + ``ScheduleGPipe``) over
  stages cut by ``stages.py``; parameter names stay the full model's, so checkpoints of any
  pipeline degree share keys. Stages get no attention mask: with right padding (what
  ``collate`` builds) causal attention already keeps padding out of every valid token, and the
  loss masks padded rows, so the result on valid tokens is exact. A sequence classifier's last
  stage scores each row's pooled position (``stages.pool_positions``, Hugging Face's last non-pad
  token, which right padding leaves with only real tokens before it), handed to it as a
  micro-batched keyword tensor; its class logits [b, C] are scored as a one-position sequence.

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
from .stages import (
    balance_layers,
    decoder_blocks,
    decoder_parts,
    hollow_to_stage,
    is_classifier,
    pool_positions,
    stage_costs,
    stage_forward,
)

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


# GPT2's Conv1D layers (weight [in, out], y = x @ W + b) under tensor parallelism, by name suffix:
# (dimension of the weight/bias the shards cut, number of concatenated sections). The fused
# ``c_attn`` holds [q | k | v] along its output: each rank keeps its heads' columns of each
# section, so its local output is [q_t | k_t | v_t] and the attention splits it into thirds as
# the library does. ``c_proj`` layers are row-parallel (their biases stay whole, added once).
GPT2_TP_SHARDS: dict[str, tuple[int, int]] = {
    "attn.c_attn.weight": (1, 3),
    "attn.c_attn.bias": (0, 3),
    "attn.c_proj.weight": (0, 1),
    "mlp.c_fc.weight": (1, 1),
    "mlp.c_fc.bias": (0, 1),
    "mlp.c_proj.weight": (0, 1),
}


def tp_shard_of(name: str) -> tuple[int, int] | None:
    """(sharded dimension, sections) of a plain tensor-parallel parameter, None when replicated."""
    for suffix, shard in GPT2_TP_SHARDS.items():
        if name.endswith("." + suffix):
            return shard
    for prefix, style in LLAMA_TP_PLAN.items():
        if name.endswith(prefix + ".weight"):
            return (0 if style == "colwise" else 1), 1
        if name.endswith(prefix + ".bias"):
            return (0, 1) if style == "colwise" else None
    return None


def shard_piece(full: torch.Tensor, dim: int, sections: int, size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of ``full``: its slice of each of the ``sections`` along ``dim``."""
    return torch.cat([sec.chunk(size, dim)[rank] for sec in full.chunk(sections, dim)], dim)


def join_pieces(pieces: list[torch.Tensor], dim: int, sections: int) -> torch.Tensor:
    """The inverse of ``shard_piece`` over every rank's piece, in rank order."""
    cut = [p.chunk(sections, dim) for p in pieces]
    return torch.cat([torch.cat([c[s] for c in cut], dim) for s in range(sections)], dim)


class _ToTensorRegion(torch.autograd.Function):
    """Identity forward; the backward sums the input's gradient over the tensor group (each
    rank's column shard contributes its part of it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _FromTensorRegion(torch.autograd.Function):
    """Sums the row shards' partial outputs over the tensor group; identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def to_tensor_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Enter a column-parallel layer: identity forward, the input's gradient summed over ``group``."""
    return _ToTensorRegion.apply(x, group)


def from_tensor_region(partial: torch.Tensor, group: Any) -> torch.Tensor:
    """Leave a row-parallel layer: the partial outputs summed over ``group``."""
    return _FromTensorRegion.apply(partial, group)


class ShardedConv1D(nn.Module):
    """One rank's shard of a GPT2 ``Conv1D``: column-parallel (its output columns; the input's
    gradient is summed over the group) or row-parallel (its input rows; outputs summed over the
    group, then the whole bias). Parameters keep the names ``weight`` and ``bias``."""

    def __init__(self, conv: nn.Module, kind: str, sections: int, group: Any, size: int, rank: int) -> None:
        super().__init__()
        self.kind, self.group = kind, group
        with torch.no_grad():
            if kind == "column":
                weight = shard_piece(conv.weight, 1, sections, size, rank)
                bias = shard_piece(conv.bias, 0, sections, size, rank)
            else:
                weight = conv.weight.chunk(size, 0)[rank]
                bias = conv.bias
        self.weight = nn.Parameter(weight.clone().contiguous(), requires_grad=conv.weight.requires_grad)
        self.bias = nn.Parameter(bias.clone().contiguous(), requires_grad=conv.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.weight.shape[1])
        if self.kind == "column":
            x = to_tensor_region(x, self.group)
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)
        partial = torch.mm(x.reshape(-1, x.shape[-1]), self.weight)
        return (from_tensor_region(partial, self.group) + self.bias).view(shape)


def _gpt2_tensor_parallel(model: nn.Module, layers: nn.ModuleList, tp_mesh: Any) -> None:
    """Megatron's layout on GPT2 blocks: c_attn (cut per q/k/v) and c_fc column-parallel, both
    c_proj row-parallel, each rank with ``n_head / tensor`` heads."""
    size, rank, group = tp_mesh.size(), tp_mesh.get_local_rank(), tp_mesh.get_group()
    cfg = model.config
    inner = int(cfg.n_inner or 4 * cfg.hidden_size)
    for name, value in (("n_head", int(cfg.n_head)), ("n_inner", inner)):
        if value % size:
            raise TrainerError(ExitCode.BAD_SPEC, f"student {name}={value} is not divisible by tensor={size}")
    for layer in layers:
        if not hasattr(layer, "attn"):  # pass-through blocks of other pipeline stages
            continue
        attn, mlp = layer.attn, layer.mlp
        attn.c_attn = ShardedConv1D(attn.c_attn, "column", 3, group, size, rank)
        attn.c_proj = ShardedConv1D(attn.c_proj, "row", 1, group, size, rank)
        attn.split_size = attn.embed_dim // size  # q, k, v of this rank's heads
        mlp.c_fc = ShardedConv1D(mlp.c_fc, "column", 1, group, size, rank)
        mlp.c_proj = ShardedConv1D(mlp.c_proj, "row", 1, group, size, rank)


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    """Shard attention and MLP of every (owned) block over ``tp_mesh`` in place."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    try:
        family, layers = decoder_blocks(model)
    except ValueError as exc:
        raise TrainerError(ExitCode.BAD_SPEC, str(exc)) from None
    if family == "gpt2":
        _gpt2_tensor_parallel(model, layers, tp_mesh)
        return
    tp = tp_mesh.size()
    cfg = model.config
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = int(getattr(cfg, name))
        if value % tp:
            raise TrainerError(ExitCode.BAD_SPEC, f"student {name}={value} is not divisible by tensor={tp}")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {k: styles[v]() for k, v in LLAMA_TP_PLAN.items()}
    for layer in layers:
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
    # Whether the tied gradient on the parameter is this rank's part only (not yet summed over the
    # tied group): true after a micro-batch that kept its gradients local.
    _tied_grad_local: bool = False
    # Parameters by full-model name, captured once wrapped: DDP's TP path swaps the module's
    # attributes around every forward, but these objects are the ones DDP reduces and the
    # optimizer must update.
    named_params: dict[str, nn.Parameter] = field(default_factory=dict)
    _schedules: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    _logit_losses: list[torch.Tensor] = field(default_factory=list)  # per loss_fn call: the logits part
    # How many times the last step called ``token_loss`` for real. A new schedule also calls it
    # while inferring shapes (on placeholder values), before the real micro-batches.
    last_loss_calls: int = 0
    # Hidden/attention terms of this rank's blocks (split_features.py); None: logits only.
    features: Any = None
    stage: Any = None  # the pipeline stage module (_Stage), None without pipelining
    # Top-k compression of a pipelined student (compression.TopKState): its DDP reduces nothing
    # and the step's gradients are compressed here, after the tied parts are added.
    compression: Any = None
    # The logits objective's weight in the phase's loss (1 / number of objectives; 0: not trained).
    logits_weight: float = 1.0

    @property
    def coords(self) -> dict[str, int]:
        return self.layout.coords(self.rank)

    @property
    def is_last_stage(self) -> bool:
        return self.coords["pipeline"] == self.layout.pipeline - 1

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.named_params.values() if p.requires_grad]

    def use_features(self, aux: nn.ModuleDict, pairs: list[tuple[int, int]]) -> Any:
        """Train hidden/attention terms of this rank's blocks with ``aux`` (split_features.py)."""
        from .split_features import StageFeatures

        blocks = getattr(self.model, "kdistill_stage", None)
        layers = blocks[0] if blocks is not None else range(len(decoder_blocks(self.model)[1]))
        tensor = self.mesh["tensor"] if self.layout.tensor > 1 else None
        self.features = StageFeatures(
            aux,
            pairs,
            layers.start,
            layers.stop,
            tensor_group=None if tensor is None else tensor.get_group(),
            tensor_size=self.layout.tensor,
            tensor_rank=self.coords["tensor"],
        )
        if self.stage is not None:
            self.stage.features[:] = [self.features]
        return self.features

    def forward_backward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        grad_scale: float = 1.0,
        targets: dict[str, torch.Tensor] | None = None,
        autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
        token_weights: torch.Tensor | None = None,
    ) -> float:
        """Forward and backward of this rank's share of the global micro-batch.

        ``input_ids``/``labels`` are this data rank's rows (the same on every tensor and pipeline
        peer); ``teacher_logits`` is needed on the last pipeline stage only. Gradients are left on
        the parameters, reduced over data ranks, multiplied by ``grad_scale`` (1/accumulation
        steps in the training loop); returns the global mean loss (unscaled) on every rank.
        ``targets`` are this rank's keyword tensors for its hidden/attention terms (``features``),
        whole-batch; the returned loss is the logits part only (the flow reports the others).
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
            self.last_loss_calls = 1 if self.logits_weight > 0 else 0
            targets = targets or {}
            if self.features is not None:
                self.features.reported.clear()
                self.features.pending.clear()
            if self.layout.pipeline == 1:
                mask = None if attention_mask is None else attention_mask.to(self.device)
                with autocast():
                    if targets:
                        logits, term = self.features.run(
                            self.module, "input_ids", input_ids, targets, attention_mask=mask
                        )
                    else:
                        logits = self.module(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                        term = None
                if logits.dim() == 2:  # a classifier: one row of class logits per sample
                    logits = logits.unsqueeze(1)
                if self.logits_weight > 0:
                    loss = self._masked_sum(logits, teacher_logits, labels) * scale
                    local = loss.detach()
                    loss = loss * self.logits_weight
                    loss = loss if term is None else loss + term
                else:
                    local = torch.zeros((), device=self.device)
                    loss = term if term is not None else logits.sum() * 0.0
                loss.backward()
            else:
                assert self.stage is not None
                self.stage.autocast = autocast
                summed = self._summed_tied_grad()
                local = self._pipeline_step(input_ids, labels, teacher_logits, scale, targets)
                # Under momentum compression a step's micro-batches but the last keep their gradients
                # local (compression.keeps_local): the tied parts are added once, at the last.
                keep = self.compression is not None and self.compression.keeps_local(self.compression.step)
                if not keep:
                    self._sum_tied_grads(summed)
                self._tied_grad_local = keep
                if self.compression is not None:
                    self._compressed_reduce()
            return self._global_loss(local) / grad_scale

    def _summed_tied_grad(self) -> torch.Tensor | None:
        """A copy of the tied gradient that earlier micro-batches of this step already summed over
        the tied group (the same on both stages), or None."""
        weight = self.tied_weight
        if self.tied_group is None or weight is None or weight.grad is None or self._tied_grad_local:
            return None
        return weight.grad.clone()

    def _sum_tied_grads(self, summed: torch.Tensor | None) -> None:
        """Adds the first and last stage's parts of the tied gradient. With gradient accumulation
        the parameter also holds what earlier micro-batches summed (``summed``): only the part this
        micro-batch added is summed, or that earlier part would be counted once per stage."""
        weight = self.tied_weight
        if self.tied_group is None or weight is None:
            return
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        if summed is None:
            dist.all_reduce(weight.grad, group=self.tied_group)
            return
        added = weight.grad - summed
        dist.all_reduce(added, group=self.tied_group)
        weight.grad.copy_(summed.add_(added))

    def _compressed_reduce(self) -> None:
        from .compression import reduce_gradients

        params = self.parameters()
        # The last stage's copy of the tied weight is the first stage's: its norm counts once.
        counted = [not (self.is_last_stage and p is self.tied_weight) for p in params]
        reduce_gradients(self.compression, params, norm_group=self.mesh["pipeline"].get_group(), counted=counted)

    def _masked_sum(self, logits: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        if teacher is None:
            raise ValueError("teacher logits are required on the stage that computes the loss")
        per_token = self.token_loss(logits, teacher.to(logits.device), labels)
        return per_token.masked_fill(labels == IGNORE, 0.0).sum()

    def _pipeline_step(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        teacher: torch.Tensor | None,
        scale: float,
        targets: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        active = self.logits_weight > 0
        signature = (tuple(input_ids.shape), active, tuple(sorted(targets)))
        schedule = self._schedule_for(signature, scale)
        self.last_loss_calls = schedule._n_microbatches if self.is_last_stage and active else 0
        stage = self.coords["pipeline"]
        losses: list[torch.Tensor] = []
        # Keyword tensors are split into micro-batches like the inputs, on every stage.
        targets = {k: v.to(self.device) for k, v in targets.items()}
        self._logit_losses = []
        if stage == 0:
            schedule.step(input_ids, **targets)
        elif self.is_last_stage:
            if active and teacher is None:
                raise ValueError("the last pipeline stage needs the teacher logits")
            # The schedule splits one target tensor into micro-batches: pack labels as a last
            # channel (exact in float32 for any vocabulary below 2**24).
            parts = [teacher.to(self.device).float()] if active and teacher is not None else []
            packed = torch.cat([*parts, labels.unsqueeze(-1).float()], dim=-1)
            if is_classifier(self.model):
                # The positions the classifier scores, from the ids this stage holds too.
                targets["pool"] = pool_positions(input_ids, self.model.config.pad_token_id)
            schedule.step(target=packed, losses=losses, **targets)
        else:
            schedule.step(**targets)
        if self.features is not None:
            # Shape inference of a new schedule ran the stage once before the real micro-batches.
            calls = schedule._n_microbatches
            del self.features.reported[: max(0, len(self.features.reported) - calls)]
        if self.is_last_stage and active:
            return torch.stack(self._logit_losses[-schedule._n_microbatches :]).sum()
        return torch.zeros((), device=self.device)

    def _schedule_for(self, signature: tuple[Any, ...], scale: float) -> Any:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        key = signature
        shape = signature[0]
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
                # This micro-batch's hidden/attention term of the last stage's own blocks.
                features = self.features
                term = features.pending.pop(0) if features is not None and features.pending else None
                if self.logits_weight == 0:
                    if term is None:  # nothing of this stage is trained in this phase
                        return output.sum() * 0.0
                    self._logit_losses.append(term.detach() * 0.0)
                    return term
                labels = target[..., -1].round().long()
                logit_loss = self._masked_sum(output, target[..., :-1], labels) * holder["scale"]
                self._logit_losses.append(logit_loss.detach())
                loss = logit_loss * self.logits_weight
                return loss if term is None else loss + term

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
    """A hollowed model as a pipeline stage: one tensor in, one tensor out. Keyword tensors, when
    given, are the teacher targets of the stage's hidden/attention terms (split_features.py)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # Kept out of the module tree: the aux modules are not the stage's (nor DDP's) parameters.
        self.features: list[Any] = []
        self.autocast: Callable[[], AbstractContextManager[Any]] = nullcontext

    def forward(self, x: torch.Tensor, pool: torch.Tensor | None = None, **targets: torch.Tensor) -> torch.Tensor:
        # One dtype between stages whatever the precision: a schedule keeps the shapes and dtypes
        # of its first step. ``pool``: a classifier's scored positions (its last stage only).
        if not targets or not self.features:
            with self.autocast():
                return _as_sequence(stage_forward(self.model, x, pool=pool).float())
        features = self.features[0]
        _, first, last = self.model.kdistill_stage
        with self.autocast():
            out, term = features.run(
                self.model, "input_ids" if first else "inputs_embeds", x, targets, attention_mask=None, pool=pool
            )
        out = _as_sequence(out.float())
        if last:
            features.pending.append(term)  # the loss function adds it
            return out
        return features.attach(out, term)


def _as_sequence(out: torch.Tensor) -> torch.Tensor:
    """A classifier's class logits [b, C] as a one-position sequence [b, 1, C], as the loss reads them."""
    return out.unsqueeze(1) if out.dim() == 2 else out


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
    materialize: Callable[[nn.Module], None] | None = None,
) -> ParallelStudent:
    """Cut (pipeline), shard (tensor) and wrap (data) ``model`` for this rank, in that order.

    A ``model`` whose parameters are on the meta device (``meta_load.py``) is cut and sharded
    there; ``materialize`` then fills this rank's pieces, before DDP (which needs real values)."""
    coords = layout.coords(rank)
    on_meta = materialize is not None
    if not on_meta:
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
    if materialize is not None:
        materialize(model)
        if tied_weight is not None:  # the meta Parameter was replaced by this rank's real one
            last = coords["pipeline"] == layout.pipeline - 1
            tied_weight = model.lm_head.weight if last else model.get_input_embeddings().weight
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
