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
All sends are non-blocking and only waited on at the end of the call, so a rank's roles (member,
stage) never wait on each other in a cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .distributed import peer_guard
from .stages import balance_layers, hollow_to_stage, stage_costs, stage_forward, unique_param_bytes

TAG_INPUT = 11
TAG_ACT = 12
TAG_LOGITS = 13


@dataclass(frozen=True)
class TeacherSplit:
    group: tuple[int, ...]  # global ranks of this teacher group, in stage order
    stage: int
    layers: range


def plan_split(model: nn.Module, group: list[int], rank: int) -> TeacherSplit:
    if rank not in group:
        raise ValueError(f"rank {rank} is not in teacher group {group}")
    stage = group.index(rank)
    ranges = balance_layers(stage_costs(model), len(group))
    return TeacherSplit(tuple(group), stage, ranges[stage])


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
        s = self.split.stage
        self.model = hollow_to_stage(model, self.split.layers, first=s == 0, last=s == self.num_stages - 1)
        self.model.eval()
        self.device = device or torch.device("cpu")
        self.vocab_size = int(model.config.vocab_size)
        self.hidden_size = int(model.config.hidden_size)
        self.dtype = next(self.model.parameters()).dtype
        self.micro_batch_rows = micro_batch_rows
        self.rank = rank

    @property
    def param_bytes(self) -> int:
        return unique_param_bytes(self.model)

    def _micro_rows(self, rows: int) -> int:
        if self.micro_batch_rows:
            return max(1, self.micro_batch_rows)
        # Enough micro-batches to keep every stage busy for most of the call.
        return max(1, math.ceil(rows / self.num_stages))

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits [B, L, V] (float32) for this rank's batch; collective over the group."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        if self.num_stages == 1:
            return stage_forward(self.model, input_ids, attention_mask).float()
        with peer_guard("the teacher pipeline"):
            return self._pipelined(input_ids, attention_mask)

    def _pipelined(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        group = self.split.group
        box = _Mailbox(self.rank, self.device)
        rows, length = input_ids.shape
        # 1. hand the batch to stage 0
        box.send(torch.tensor([rows, length], dtype=torch.int64), group[0], TAG_INPUT)
        box.send(input_ids.to(torch.int64), group[0], TAG_INPUT)
        box.send(attention_mask.to(torch.int64), group[0], TAG_INPUT)
        # 2. this rank's stage
        if self.split.stage == 0:
            self._run_first_stage(box)
        else:
            self._run_later_stage(box)
        # 3. collect this rank's logits from the last stage
        pieces = []
        step = self._micro_rows(rows)
        for lo in range(0, rows, step):
            b = min(step, rows - lo)
            pieces.append(box.recv((b, length, self.vocab_size), torch.float32, group[-1], TAG_LOGITS))
        box.drain()
        return torch.cat(pieces, 0)

    def _emit(self, box: _Mailbox, member: int, h: torch.Tensor, mask: torch.Tensor) -> None:
        group, stage = self.split.group, self.split.stage
        if stage == self.num_stages - 1:
            box.send(h.float(), group[member], TAG_LOGITS)
            return
        rows, length = mask.shape
        nxt = group[stage + 1]
        box.send(torch.tensor([member, rows, length, 1], dtype=torch.int64), nxt, TAG_ACT)
        box.send(h, nxt, TAG_ACT)
        box.send(mask, nxt, TAG_ACT)

    def _run_first_stage(self, box: _Mailbox) -> None:
        group = self.split.group
        for member, src in enumerate(group):
            rows, length = box.recv((2,), torch.int64, src, TAG_INPUT).tolist()
            ids = box.recv((rows, length), torch.int64, src, TAG_INPUT)
            mask = box.recv((rows, length), torch.int64, src, TAG_INPUT)
            step = self._micro_rows(rows)
            for lo in range(0, rows, step):
                m_ids, m_mask = ids[lo : lo + step], mask[lo : lo + step]
                self._emit(box, member, stage_forward(self.model, m_ids, m_mask), m_mask)
        box.send(torch.tensor([-1, 0, 0, 0], dtype=torch.int64), group[1], TAG_ACT)

    def _run_later_stage(self, box: _Mailbox) -> None:
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
            self._emit(box, member, stage_forward(self.model, h, mask), mask)


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
