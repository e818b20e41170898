"""The teacher split by layers over a group of S ranks, run forward-only in micro-batches.

Each rank of a teacher group keeps one contiguous stage (``stages.balance_layers`` balances
them by parameter count) and frees the rest, so a rank holds about 1/S of the teacher.

``SplitTeacher.logits(input_ids, attention_mask)`` is collective over the group: every member
brings its own batch and gets back the teacher logits for it. Inside, with explicit
point-to-point messages (the teacher never runs backward, so a schedule with backward passes
would only add constraints):
1. each member sends its batch to the group's stage-0 rank (tag INPUT);
2. stage 0 cuts every member's batch into micro-batches and streams them through the stages
   (tag ACT: a header ``[member, rows, length, more]``, the activation, the attention mask); while
   stage 1 works on micro-batch m, stage 0 already computes m+1;
3. the last stage sends each micro-batch's logits to the member that owns it (tag LOGITS).
A sequence classifier (GPT2 or Llama family, ``*ForSequenceClassification``) is cut the same way;
stage 0 computes each row's pooled position from the token ids (Hugging Face's rule, the last
token that is not ``config.pad_token_id``: ``stages.pool_positions``) and sends it along with the
activation (tag ACT), and the last stage scores those positions only: the member receives class
logits [B, C], as from the whole model.
``SplitTeacher.forward`` also delivers teacher hidden states (``output_hidden_states`` indices) and
the q/k/v projections of chosen layers, for hidden-state and attention transfer: every stage sends
the member the pieces its own blocks produce (tags HIDDEN, QKV), so nothing is recomputed and no
stage holds more than its layers. A hollowed stage reports ``hidden_states`` for exactly the
full model's indices ``lo .. hi`` of its blocks ``[lo, hi)`` (pass-through blocks are not
recorded), so index i >= 1 comes from the stage owning block i-1 and index 0 from stage 0.
All sends are non-blocking and only waited on at the end of the call, so a rank's roles (member,
stage) never wait on each other in a cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .distributed import peer_guard
from .stages import (
    balance_layers,
    hollow_to_stage,
    is_classifier,
    pool_positions,
    run_stage_model,
    stage_costs,
    unique_param_bytes,
)

TAG_INPUT = 11
TAG_ACT = 12
TAG_LOGITS = 13
TAG_HIDDEN = 14
TAG_QKV = 15


@dataclass(frozen=True)
class TeacherRequest:
    """What a member wants from the teacher for its batch (the same on every member of a call)."""

    logits: bool = True
    hidden: tuple[int, ...] = ()  # ``output_hidden_states`` indices: 0 embeddings, i + 1 block i
    qkv: tuple[int, ...] = ()  # block indices whose q/k/v projections are wanted


@dataclass
class TeacherOutputs:
    logits: torch.Tensor | None = None  # [B, L, V] float32; a classifier's [B, C]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # index -> [B, L, H], teacher dtype
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherSplit:
    group: tuple[int, ...]  # global ranks of this teacher group, in stage order
    stage: int
    layers: range
    all_layers: tuple[range, ...] = ()  # every stage's blocks, in stage order

    def owned_hidden(self, stage: int, wanted: tuple[int, ...]) -> list[int]:
        """The hidden-state indices stage ``stage`` delivers: 0 (embeddings) on stage 0, and
        i + 1 for each of its blocks i (the last index carries the final norm, on the last stage)."""
        r = self.all_layers[stage]
        return sorted(i for i in set(wanted) if (i == 0 and stage == 0) or r.start + 1 <= i <= r.stop)

    def owned_qkv(self, stage: int, wanted: tuple[int, ...]) -> list[int]:
        return sorted(i for i in set(wanted) if i in self.all_layers[stage])


def plan_split(model: nn.Module, group: list[int], rank: int) -> TeacherSplit:
    if rank not in group:
        raise ValueError(f"rank {rank} is not in teacher group {group}")
    stage = group.index(rank)
    ranges = balance_layers(stage_costs(model), len(group))
    return TeacherSplit(tuple(group), stage, ranges[stage], tuple(ranges))


class SplitTeacher:
    """One rank's share of a pipelined teacher. With a group of one it is the plain teacher."""

    def __init__(
        self,
        model: nn.Module,
        group: list[int],
        rank: int,
        *,
        micro_batch_rows: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.split = plan_split(model, group, rank)
        self.num_stages = len(group)
        self.num_layers = sum(len(r) for r in self.split.all_layers)
        s = self.split.stage
        self.model = hollow_to_stage(model, self.split.layers, first=s == 0, last=s == self.num_stages - 1)
        self.model.eval()
        self.device = device or torch.device("cpu")
        self.classifier = is_classifier(model)
        self.pad_token_id = getattr(model.config, "pad_token_id", None)
        # Width of the last stage's output: the vocabulary, or a classifier's labels.
        self.out_width = int(model.config.num_labels if self.classifier else model.config.vocab_size)
        self.hidden_size = int(model.config.hidden_size)
        self.dtype = next(self.model.parameters()).dtype
        self.micro_batch_rows = micro_batch_rows
        self.rank = rank
        self._qkv_dims: tuple[int, int, int] | None = None

    @property
    def param_bytes(self) -> int:
        return unique_param_bytes(self.model)

    @property
    def qkv_dims(self) -> tuple[int, int, int]:
        """Widths of one block's q, k, v projections (blocks of a decoder are alike), probed on
        this rank's own first block: no other stage's weights are needed."""
        if self._qkv_dims is None:
            lo = self.split.layers.start
            if self.split.stage == 0:
                x = torch.zeros((1, 4), dtype=torch.int64, device=self.device)
            else:
                x = torch.zeros((1, 4, self.hidden_size), dtype=self.dtype, device=self.device)
            ones = torch.ones((1, 4), dtype=torch.int64, device=self.device)
            _, _, qkv = self._run_stage(x, ones, TeacherRequest(logits=False, qkv=(lo,)), ones[:, 0] * 3)
            q, k, v = qkv[0]
            self._qkv_dims = (int(q.shape[-1]), int(k.shape[-1]), int(v.shape[-1]))
        return self._qkv_dims

    def _micro_rows(self, rows: int) -> int:
        if self.micro_batch_rows:
            return max(1, self.micro_batch_rows)
        # Enough micro-batches to keep every stage busy for most of the call.
        return max(1, math.ceil(rows / self.num_stages))

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits [B, L, V] (a classifier's [B, C]; float32) for this rank's batch;
        collective over the group."""
        out = self.forward(input_ids, attention_mask, TeacherRequest())
        assert out.logits is not None
        return out.logits

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, request: TeacherRequest | None = None
    ) -> TeacherOutputs:
        """What ``request`` asks for, for this rank's batch; collective over the group (every
        member must pass an equal request)."""
        request = request or TeacherRequest()
        self._check(request)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        if self.num_stages == 1:
            out, hidden, qkv = self._run_stage(input_ids, attention_mask, request)
            return TeacherOutputs(
                logits=out.float() if request.logits else None,
                hidden=dict(zip(self.split.owned_hidden(0, request.hidden), hidden, strict=True)),
                qkv=dict(zip(self.split.owned_qkv(0, request.qkv), qkv, strict=True)),
            )
        with peer_guard("the teacher pipeline"):
            return self._pipelined(input_ids, attention_mask, request)

    def _check(self, request: TeacherRequest) -> None:
        bad = [i for i in request.hidden if not 0 <= i <= self.num_layers]
        if bad:
            raise ValueError(f"hidden-state indices {bad} are outside 0..{self.num_layers} of this teacher")
        bad = [i for i in request.qkv if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"q/k/v layers {bad} are outside 0..{self.num_layers - 1} of this teacher")

    def _run_stage(
        self, x: torch.Tensor, mask: torch.Tensor, request: TeacherRequest, pool: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """This stage on one micro-batch: (outgoing activation or logits, its hidden pieces, its
        q/k/v). ``pool``: a classifier's pooled positions (stage 0 derives them from the ids)."""
        stage = self.split.stage
        own_hidden = self.split.owned_hidden(stage, request.hidden)
        own_qkv = self.split.owned_qkv(stage, request.qkv)
        from ..qkv_capture import QKVCapture

        with QKVCapture(self.model, own_qkv) as cap:
            out = run_stage_model(self.model, x, attention_mask=mask, pool=pool, output_hidden_states=bool(own_hidden))
        lo, hi = self.split.layers.start, self.split.layers.stop
        hidden: list[torch.Tensor] = []
        if own_hidden:
            states = out.hidden_states or ()
            if len(states) != hi - lo + 1:
                raise RuntimeError(
                    f"teacher stage {stage} reported {len(states)} hidden states for blocks "
                    f"[{lo}, {hi}); expected {hi - lo + 1}"
                )
            hidden = [states[i - lo] for i in own_hidden]
        return out.logits, hidden, [cap.qkv[layer] for layer in own_qkv]

    def _out_shape(self, rows: int, length: int) -> tuple[int, ...]:
        return (rows, self.out_width) if self.classifier else (rows, length, self.out_width)

    def _pipelined(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, request: TeacherRequest
    ) -> TeacherOutputs:
        group = self.split.group
        box = _Mailbox(self.rank, self.device)
        rows, length = input_ids.shape
        # 1. hand the batch to stage 0
        box.send(torch.tensor([rows, length], dtype=torch.int64), group[0], TAG_INPUT)
        box.send(input_ids.to(torch.int64), group[0], TAG_INPUT)
        box.send(attention_mask.to(torch.int64), group[0], TAG_INPUT)
        # 2. this rank's stage
        if self.split.stage == 0:
            self._run_first_stage(box, request)
        else:
            self._run_later_stage(box, request)
        # 3. collect this rank's pieces, micro-batch by micro-batch, stage by stage
        logits: list[torch.Tensor] = []
        hidden: dict[int, list[torch.Tensor]] = {}
        qkv: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        dims = self.qkv_dims if request.qkv else (0, 0, 0)
        step = self._micro_rows(rows)
        for lo in range(0, rows, step):
            b = min(step, rows - lo)
            for s, src in enumerate(group):
                for i in self.split.owned_hidden(s, request.hidden):
                    hidden.setdefault(i, []).append(
                        box.recv((b, length, self.hidden_size), self.dtype, src, TAG_HIDDEN)
                    )
                for layer in self.split.owned_qkv(s, request.qkv):
                    qkv.setdefault(layer, []).append(
                        tuple(box.recv((b, length, d), self.dtype, src, TAG_QKV) for d in dims)
                    )
            if request.logits:
                logits.append(box.recv(self._out_shape(b, length), torch.float32, group[-1], TAG_LOGITS))
        box.drain()
        return TeacherOutputs(
            logits=torch.cat(logits, 0) if request.logits else None,
            hidden={i: torch.cat(parts, 0) for i, parts in hidden.items()},
            qkv={layer: tuple(torch.cat([p[j] for p in parts], 0) for j in range(3)) for layer, parts in qkv.items()},
        )

    def _emit(
        self,
        box: _Mailbox,
        member: int,
        x: torch.Tensor,
        mask: torch.Tensor,
        request: TeacherRequest,
        pool: torch.Tensor | None = None,
    ) -> None:
        group, stage = self.split.group, self.split.stage
        if self.classifier and stage == 0:
            pool = pool_positions(x, self.pad_token_id)
        h, hidden, qkv = self._run_stage(x, mask, request, pool)
        for piece in hidden:
            box.send(piece.to(self.dtype), group[member], TAG_HIDDEN)
        for triple in qkv:
            for piece in triple:
                box.send(piece.to(self.dtype), group[member], TAG_QKV)
        if stage == self.num_stages - 1:
            if request.logits:
                box.send(h.float(), group[member], TAG_LOGITS)
            return
        rows, length = mask.shape
        nxt = group[stage + 1]
        box.send(torch.tensor([member, rows, length, 1], dtype=torch.int64), nxt, TAG_ACT)
        box.send(h, nxt, TAG_ACT)
        box.send(mask, nxt, TAG_ACT)
        if pool is not None:
            box.send(pool, nxt, TAG_ACT)

    def _run_first_stage(self, box: _Mailbox, request: TeacherRequest) -> None:
        group = self.split.group
        for member, src in enumerate(group):
            rows, length = box.recv((2,), torch.int64, src, TAG_INPUT).tolist()
            ids = box.recv((rows, length), torch.int64, src, TAG_INPUT)
            mask = box.recv((rows, length), torch.int64, src, TAG_INPUT)
            step = self._micro_rows(rows)
            for lo in range(0, rows, step):
                self._emit(box, member, ids[lo : lo + step], mask[lo : lo + step], request)
        box.send(torch.tensor([-1, 0, 0, 0], dtype=torch.int64), group[1], TAG_ACT)

    def _run_later_stage(self, box: _Mailbox, request: TeacherRequest) -> None:
        group, stage = self.split.group, self.split.stage
        prev = group[stage - 1]
        while True:
            member, rows, length, _ = box.recv((4,), torch.int64, prev, TAG_ACT).tolist()
            if member < 0:
                if stage < self.num_stages - 1:
                    box.send(torch.tensor([-1, 0, 0, 0], dtype=torch.int64), group[stage + 1], TAG_ACT)
                return
            h = box.recv((rows, length, self.hidden_size), self.dtype, prev, TAG_ACT)
            mask = box.recv((rows, length), torch.int64, prev, TAG_ACT)
            pool = box.recv((rows,), torch.int64, prev, TAG_ACT) if self.classifier else None
            self._emit(box, member, h, mask, request, pool)


class _Mailbox:
    """Non-blocking sends kept alive until ``drain``; messages to oneself skip the network."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = device
        self.pending: list[dist.Work] = []
        self.keep: list[torch.Tensor] = []
        self.local: dict[int, list[torch.Tensor]] = {}

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        t = t.to(self.device).contiguous()
        if dst == self.rank:
            self.local.setdefault(tag, []).append(t)
            return
        self.keep.append(t)
        self.pending.append(dist.isend(t, dst, tag=tag))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int) -> torch.Tensor:
        if src == self.rank:
            return self.local[tag].pop(0)
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, src, tag=tag)
        return t

    def drain(self) -> None:
        for w in self.pending:
            w.wait()
        self.pending.clear()
        self.keep.clear()
