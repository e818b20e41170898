"""The whole state of a tensor/pipeline-parallel student in the gathered layout, cut out of a
gathered checkpoint on load; the split student's gradient clipping.

The trainer checkpoints a split student sharded (``sharded_checkpoint.py``) and streams its final
weights to rank 0 (``student_save.py``); no rank holds the whole student. The gathered layout (the
whole student and an optimizer state in the single-process layout: parameter order of the unsplit
student, decay group first, as a single process or data-parallel run writes it) still resumes a
split student: every rank cuts its own shard out of the whole files (``load_state``). Writing that
layout (``gather_state``, ``load_into_template``) is what checkpoints of earlier versions did; the
trainer no longer calls it, and it stays for the tests of that loader and for the comparison of
the two layouts in ``benchmarks/sharded_checkpoint.py``.

Gathering (``gather_state``, collective on every rank):
- tensor-parallel shards become full tensors (``DTensor.full_tensor``, or an all-gather over
  the tensor group where DDP's mesh path left plain local shards);
- the first rank of every other pipeline stage (data 0, tensor 0) sends its parameters and
  Adam moments to rank 0 point to point: an index tensor into the full parameter order, then
  one stacked ``[param, exp_avg, exp_avg_sq]`` tensor and the step per parameter, all with
  shapes rank 0 already knows, so no Python objects travel;
- a tied embedding/head copy on the last stage is left out: stage 0 sends the same values
  (their gradients are summed, so both copies and their moments stay equal).

Gradient clipping (``clip_grad_norm``) needs the norm of the whole student: squares of sharded
gradients are summed over the tensor group, replicated ones counted once, then summed over
pipeline stages; every rank scales by the same factor, so replicated weights stay identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..optim import local_shard
from .stages import decoder_parts
from .student import ParallelStudent, join_pieces, shard_piece, tp_shard_of


@dataclass(frozen=True)
class FullLayout:
    """The unsplit student's parameters as the single-process optimizer orders them."""

    order: tuple[str, ...]  # decay group (ndim >= 2) first, then the no-decay group
    n_decay: int
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    aliases: dict[str, str]  # name in a split stage -> name in the unsplit model (tied head)

    @classmethod
    def of(cls, model: nn.Module) -> FullLayout:
        """Read before the model is split: every rank still holds the whole student then."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [n for n, p in named if p.ndim >= 2]
        no_decay = [n for n, p in named if p.ndim < 2]
        aliases: dict[str, str] = {}
        try:
            parts = decoder_parts(model)
        except ValueError:
            parts = None
        if parts is not None and parts.tied:
            embed = next(n for n, p in model.named_parameters() if p is parts.head.weight)
            aliases["lm_head.weight"] = embed
        return cls(
            order=tuple(decay + no_decay),
            n_decay=len(decay),
            shapes={n: tuple(p.shape) for n, p in named},
            dtypes={n: p.dtype for n, p in named},
            aliases=aliases,
        )

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.order)}


# ---- tensor-parallel shards ------------------------------------------------------------------
def _plain_shard(ps: ParallelStudent, name: str) -> tuple[int, int] | None:
    """(dimension, sections) a plain local tensor is sharded on under tensor parallelism."""
    return tp_shard_of(name) if ps.layout.tensor > 1 else None


def _shard_dim(ps: ParallelStudent, name: str, value: torch.Tensor) -> int | None:
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(value, DTensor):
        dims = [pl.dim for pl in value.placements if isinstance(pl, Shard)]
        return dims[0] if dims else None
    shard = _plain_shard(ps, name)
    return None if shard is None else shard[0]


def _full(ps: ParallelStudent, name: str, value: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor (collective over the tensor group when sharded)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().detach()
    shard = _plain_shard(ps, name)
    if shard is None:
        return value.detach()
    parts = [torch.empty_like(value) for _ in range(ps.layout.tensor)]
    dist.all_gather(parts, value.detach().contiguous(), group=ps.mesh["tensor"].get_group())
    return join_pieces(parts, *shard)


def _local(ps: ParallelStudent, name: str, like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` in the form of ``like`` (a DTensor when ``like`` is one)."""
    from torch.distributed.tensor import DTensor

    if isinstance(like, DTensor):
        dim = _shard_dim(ps, name, like)
        shard = None if dim is None else (dim, 1)
    else:
        shard = _plain_shard(ps, name)
    piece = full if shard is None else shard_piece(full, shard[0], shard[1], ps.layout.tensor, ps.coords["tensor"])
    ref = like.to_local() if isinstance(like, DTensor) else like
    piece = piece.to(device=ref.device, dtype=ref.dtype).contiguous()
    if isinstance(like, DTensor):
        return DTensor.from_local(piece, like.device_mesh, like.placements, run_check=False)
    return piece


def _canonical(full: FullLayout, ps: ParallelStudent, name: str) -> str | None:
    """The unsplit model's name for a local parameter; None for a tied copy stage 0 owns."""
    if name in full.shapes:
        return name
    target = full.aliases.get(name)
    if target is None:
        raise KeyError(f"parameter {name} of the split student is not in the unsplit student")
    return None if target not in ps.named_params else target


# ---- gather to rank 0 ------------------------------------------------------------------------
@dataclass
class GatheredState:
    """What rank 0 writes: the whole student's weights and its optimizer state, single-process layout."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]

    def optimizer_view(self) -> Any:
        """An object whose ``state_dict()`` is this state (what CheckpointManager.save calls)."""
        state = self.optimizer

        class _View:
            def state_dict(self) -> dict[str, Any]:
                return state

        return _View()


def _moments(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, Any] | None:
    moments = optimizer.state.get(p)
    if not moments or "exp_avg" not in moments:
        return None
    return moments


# One parameter's gathered state: full weight, Adam's two moments (None before the first step),
# and the step count (-1 before the first step).
_Piece = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]


def _local_pieces(ps: ParallelStudent, optimizer: torch.optim.Optimizer, full: FullLayout) -> dict[str, _Piece]:
    """This rank's parameters and moments as full tensors on the CPU, by unsplit name (collective
    over the tensor group: the all-gathers pair up, peers hold the same names in the same order)."""
    mine: dict[str, _Piece] = {}
    for name, p in ps.named_params.items():
        canonical = _canonical(full, ps, name)
        moments = _moments(optimizer, p)
        weight = _full(ps, name, p)
        if moments is None:
            avg = avg_sq = None
            step = -1.0
        else:
            avg, avg_sq = _full(ps, name, moments["exp_avg"]), _full(ps, name, moments["exp_avg_sq"])
            step = float(moments["step"])
        if canonical is not None:
            mine[canonical] = (
                weight.cpu(),
                None if avg is None else avg.cpu(),
                None if avg_sq is None else avg_sq.cpu(),
                step,
            )
    return mine


def send_index(indices: list[int], device: torch.device) -> None:
    """To rank 0: which parameters follow, as their count and then their full-order indices."""
    dist.send(torch.tensor([len(indices)], dtype=torch.int64, device=device), 0)
    dist.send(torch.tensor(indices, dtype=torch.int64, device=device), 0)


def receive_index(src: int, device: torch.device) -> list[int]:
    """What ``send_index`` sent from ``src``."""
    count = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(count, src)
    idx = torch.zeros(int(count.item()), dtype=torch.int64, device=device)
    dist.recv(idx, src)
    return [int(i) for i in idx.tolist()]


def _send_pieces(mine: dict[str, _Piece], index: dict[str, int], device: torch.device) -> None:
    """To rank 0: the count, the full-order indices, then per parameter [w, m, v] and the step."""
    names = sorted(mine, key=index.__getitem__)
    send_index([index[n] for n in names], device)
    for n in names:
        w, a, b, step = mine[n]
        stacked = torch.stack(
            [w, a if a is not None else torch.zeros_like(w), b if b is not None else torch.zeros_like(w)]
        ).float()
        dist.send(stacked.to(device), 0)
        dist.send(torch.tensor([step], dtype=torch.float64, device=device), 0)


def _receive_pieces(src: int, full: FullLayout, device: torch.device) -> dict[str, _Piece]:
    """What ``_send_pieces`` sent from ``src``; shapes and dtypes come from the full layout."""
    got: dict[str, _Piece] = {}
    for i in receive_index(src, device):
        n = full.order[i]
        stacked = torch.zeros((3, *full.shapes[n]), dtype=torch.float32, device=device)
        dist.recv(stacked, src)
        step = torch.zeros(1, dtype=torch.float64, device=device)
        dist.recv(step, src)
        s = float(step.item())
        got[n] = (
            stacked[0].to(full.dtypes[n]).cpu(),
            None if s < 0 else stacked[1].cpu(),
            None if s < 0 else stacked[2].cpu(),
            s,
        )
    return got


AuxParams = Sequence[tuple[str, nn.Parameter]]


def optimizer_order(full: FullLayout, aux: AuxParams) -> tuple[list[str], int]:
    """The single-process optimizer's parameter order over student and aux parameters (the loop
    names them ``student.*`` then ``aux.*``; each group keeps that order): student matrices, aux
    matrices, student vectors, aux vectors. Aux names carry an ``aux.`` prefix. Returns the order
    and the size of the decay group."""
    aux_decay = [f"aux.{n}" for n, p in aux if p.ndim >= 2]
    aux_rest = [f"aux.{n}" for n, p in aux if p.ndim < 2]
    order = [*full.order[: full.n_decay], *aux_decay, *full.order[full.n_decay :], *aux_rest]
    return order, full.n_decay + len(aux_decay)


def _aux_pieces(optimizer: torch.optim.Optimizer, aux: AuxParams) -> dict[str, _Piece]:
    """The aux parameters and moments of this rank (replicated: every rank holds the same)."""
    mine: dict[str, _Piece] = {}
    for name, p in aux:
        moments = _moments(optimizer, p)
        if moments is None:
            mine[f"aux.{name}"] = (p.detach().cpu(), None, None, -1.0)
        else:
            mine[f"aux.{name}"] = (
                p.detach().cpu(),
                moments["exp_avg"].detach().cpu(),
                moments["exp_avg_sq"].detach().cpu(),
                float(moments["step"]),
            )
    return mine


def _assemble(
    pieces: dict[str, _Piece], optimizer: torch.optim.Optimizer, full: FullLayout, aux: AuxParams = ()
) -> GatheredState:
    """The whole student's weights and a single-process optimizer state from every piece."""
    missing = [n for n in full.order if n not in pieces]
    if missing:
        raise RuntimeError(f"gathering the split student lost parameters: {missing[:5]}")
    weights = {n: pieces[n][0] for n in full.order}
    pieces = {**pieces, **_aux_pieces(optimizer, aux)}
    order, n_decay = optimizer_order(full, aux)
    states: dict[int, dict[str, torch.Tensor]] = {}
    for i, n in enumerate(order):
        _, a, b, step = pieces[n]
        if a is not None and b is not None:
            states[i] = {"step": torch.tensor(step), "exp_avg": a, "exp_avg_sq": b}
    groups = []
    bounds = [(0, n_decay), (n_decay, len(order))]
    for group, (lo, hi) in zip(optimizer.param_groups, bounds, strict=True):
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": list(range(lo, hi))})
    return GatheredState(weights=weights, optimizer={"state": states, "param_groups": groups})


def gather_state(
    ps: ParallelStudent, optimizer: torch.optim.Optimizer, full: FullLayout, aux: AuxParams = ()
) -> GatheredState | None:
    """Collective on every rank; returns the whole state on rank 0, None elsewhere. ``aux``: the
    replicated aux parameters (by name), written from rank 0's own copy."""
    mine = _local_pieces(ps, optimizer, full)
    sources = [ps.layout.rank_of(s, 0, 0) for s in range(1, ps.layout.pipeline)]
    if ps.rank in sources:
        _send_pieces(mine, full.index(), ps.device)
    if ps.rank != 0:
        return None
    assert ps.coords == {"pipeline": 0, "data": 0, "tensor": 0}
    for src in sources:
        mine.update(_receive_pieces(src, full, ps.device))
    return _assemble(mine, optimizer, full, aux)


def load_into_template(template: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Copy gathered weights into an unsplit student built whole (``template``), strictly."""
    missing, unexpected = template.load_state_dict(weights, strict=False)
    params = {n for n, _ in template.named_parameters()}
    lost = [n for n in missing if n in params]
    if lost or unexpected:
        raise RuntimeError(f"gathered state does not fit the student: missing {lost[:5]}, unexpected {unexpected[:5]}")
    return template


# ---- load (reshard) on every rank ------------------------------------------------------------
def load_state(
    ps: ParallelStudent,
    optimizer: torch.optim.Optimizer,
    full: FullLayout,
    weights: dict[str, torch.Tensor],
    opt_state: dict[str, Any],
    aux: AuxParams = (),
) -> None:
    """Cut this rank's shard out of a whole-student checkpoint (any layout wrote it); the aux
    parameters' optimizer state is restored whole (their weights come from aux.safetensors)."""
    state_by_name: dict[str, dict[str, Any]] = {}
    saved_order = [i for g in opt_state["param_groups"] for i in g["params"]]
    order, _ = optimizer_order(full, aux)
    if len(saved_order) != len(order):
        raise ValueError(
            f"the checkpoint's optimizer holds {len(saved_order)} parameters, the student and aux modules {len(order)}"
        )
    for i, name in enumerate(order):
        saved = opt_state["state"].get(i, opt_state["state"].get(str(i)))
        if saved is not None:
            state_by_name[name] = saved
    for name, p in aux:
        moments = state_by_name.get(f"aux.{name}")
        if moments is not None:
            optimizer.state[p] = {
                "step": moments["step"].clone().float(),
                "exp_avg": moments["exp_avg"].to(device=p.device, dtype=p.dtype).clone(),
                "exp_avg_sq": moments["exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone(),
            }
    for name, p in ps.named_params.items():
        source = name if name in full.shapes else full.aliases[name]
        value = weights.get(source)
        if value is None:  # safetensors kept the other name of a tied pair
            value = next((weights[a] for a, b in full.aliases.items() if b == source and a in weights), None)
        if value is None:
            raise ValueError(f"checkpoint has no weights for {source}")
        with torch.no_grad():
            local = _local(ps, name, p, value)
            local_shard(p).copy_(local_shard(local))
        moments = state_by_name.get(source)
        if moments is not None:
            optimizer.state[p] = {
                "step": moments["step"].clone().float(),
                "exp_avg": _local(ps, name, p, moments["exp_avg"]),
                "exp_avg_sq": _local(ps, name, p, moments["exp_avg_sq"]),
            }
    for group, saved in zip(optimizer.param_groups, opt_state["param_groups"], strict=True):
        for key, value in saved.items():
            if key != "params":
                group[key] = value


# ---- gradient norm of the whole student ------------------------------------------------------
def clip_grad_norm(ps: ParallelStudent, full: FullLayout, max_norm: float, extra: Sequence[torch.Tensor] = ()) -> float:
    """Clip by the norm of the whole student's gradient (as a single process would); returns it.
    ``extra``: gradients replicated on every rank (the aux modules', already reduced), counted once
    and clipped with the rest."""
    from torch.distributed.tensor import DTensor

    device = ps.device
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    grads = []
    for name, p in ps.named_params.items():
        g = p.grad
        if g is None:
            continue
        grads.append(g)
        if _canonical(full, ps, name) is None:
            continue  # the tied copy: stage 0 counts it
        local = g.to_local() if isinstance(g, DTensor) else g
        sq = local.detach().double().pow(2).sum()
        if _shard_dim(ps, name, g) is not None:
            sharded += sq
        else:
            replicated += sq
    if ps.layout.tensor > 1:
        dist.all_reduce(sharded, group=ps.mesh["tensor"].get_group())
    total = sharded + replicated
    if ps.layout.pipeline > 1:
        dist.all_reduce(total, group=ps.mesh["pipeline"].get_group())
    for g in extra:
        total += g.detach().double().pow(2).sum().to(device)
        grads.append(g)
    norm = float(total.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm
