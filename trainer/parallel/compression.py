"""Top-k gradient compression as a DDP communication hook, with error feedback.

Per DDP bucket and step, each rank adds its residual (what it did not send before) to its
gradient, keeps the ``fraction`` largest entries *of each parameter tensor* and sends only those:
values and positions are all-gathered (one int32 message: the values' bits followed by 16-bit
positions), every rank scatters all contributions into a zero tensor and divides by the world
size. What a rank did not send stays in its residual for the next step, so over many
steps every gradient entry is eventually applied: the sum of applied updates plus the mean
residual equals the sum of the true mean gradients exactly (the test checks this identity;
local clipping, below, scales a rank's gradient before it counts).

Why per tensor, not per bucket: the loop's optimizer is AdamW, whose update size does not depend
on a gradient's scale. A bucket-wide top-k picks almost only the largest-gradient tensors (the
tied embedding/LM head), so LayerNorms, biases and whole attention blocks went for tens of steps
without any update; under Adam those tensors matter as much as the big ones. Per-tensor top-k
gives every tensor its share each step (Deep Gradient Compression selects per layer too).

Warm-up: the first ``warmup_steps`` steps run plain all-reduce (early gradients are large and
dense). Then the kept fraction decays exponentially from ``ramp_from`` to ``fraction`` over
``ramp_steps`` steps (DGC's sparsity warm-up), then stays at ``fraction``. The spec's default ramp
is 25% of the job's steps, from the densest start that keeps the whole run within its byte budget
(``compression_budget``): the first compressed steps, while the loss still falls fast, then lose
little to delay.

Local clipping (DGC): on compressed steps each rank clips its own gradient before it enters the
residual (``clip_norm``, the job's maxGradNorm, times the bucket's share of the entries); the loop
then does not clip the reduced gradient, which is sparse and whose entries carry many steps of
residual, so its norm is no measure of the step. ``last_compressed`` tells the loop which kind of
step just ran. The optimizer side (AdamW's variance frozen when compression starts) is
``trainer/optim.FrozenVarianceAdamW``.

In a tensor-parallel student the hook sits on the DDP of the mesh's data axis: each rank
compresses its own shard's gradient over its data peers only. With pipeline stages the same
compression runs after the step's backward instead (``reduce_gradients``; DDP gets
``local_only_hook``): the first and last stage each hold a copy of a tied embedding/LM head,
and its two gradient parts must be added before top-k picks from their sum, as in the unsplit
student; local clipping then takes the norm over all stages.

Momentum compression (``momentum`` > 0; the spec's default ``compress: momentum``, 0/1 Adam's
recipe with top-k): on compressed steps each rank folds its (locally clipped) gradient of every
matrix into its own momentum, m = b1 m + (1 - b1) g, started from AdamW's first moment after the
dense warm-up, and top-k picks from m + residual instead of g + residual. The mean of what the
ranks sent is AdamW's first moment for the step (``optim.FrozenVarianceAdamW``, frozen variance):
the optimizer does not smooth it again. Why: with gradients, an entry that waited D steps
arrives as one spike that AdamW's momentum then spreads over another ~b1/(1 - b1) = 9 steps, so
its gradient reaches the weights about D + 9 steps late; with momenta the smoothing happens while
the entry waits, and the mass sent is the same (the identity below holds
with momenta in place of gradients: applied + mean residual = the sum of the ranks' mean
momenta). 1-D tensors stay gradients (sent whole, plain AdamW). With gradient accumulation a
compressed step's micro-batches but the last keep their gradient local (``keeps_local``), so
the momentum takes each step's gradient once.

Learning-rate changes: with AdamW's variance frozen the weights move by the learning rate times
what was sent, so what a residual owes is a displacement, the learning rate of the steps its mass
came from times that mass (error feedback as compress(lr * g + e)). An entry that waits D steps
under a decaying schedule would otherwise arrive scaled by the later, smaller rate and be partly
lost. The loop therefore calls ``follow_learning_rate(before, after)`` after every scheduler step,
so the residuals are always expressed at the rate of the step that sends them; a checkpoint taken
after the call holds them at the rate the restored scheduler gives next, so a resume continues
exactly.

Residuals (and momenta) are part of a checkpoint (``rank_vectors`` / ``restore_residuals``): a
resumed run continues with the unsent mass it had, so its trajectory equals the uninterrupted one.

Which entries are largest: by default (``selection_scale``, installed by the loop from the
optimizer, ``optim.update_scale``) an entry ranks by the step AdamW would take for it, its
gradient plus residual times 1/sqrt(v) of AdamW's second moment, not by the raw value. The same
reason as per tensor, one level down: Adam moves every entry by about the learning rate whatever
its gradient's scale, but by magnitude an entry of small typical gradient waits behind the
large-gradient entries of its tensor until its residual has grown to their size. Ranked by the
step it would take, each entry is sent once its pending update is among the largest. The
selection decides only what is sent when; error feedback keeps the rest.

Positions: each tensor is cut into spans of 2**16 entries, each span keeps its own top share, and
a position travels as its 16-bit offset within its span (every rank knows the spans from the
shapes alone), 2 bytes instead of an int32's 4.

Tiny tensors (1-D: biases, norms; about 0.5% of a small GPT2's entries) are sent whole, values
only (every rank knows their positions), instead of 1% of them with indices: each gets its full
gradient every step for a negligible share of the bytes, counted like the rest.

Values travel as bfloat16 (2 bytes instead of 4): with error feedback the rounding error is not
lost but stays in the residual (what is subtracted from the residual is the rounded value), so
the "applied + residual = true" identity still holds; measured at p = 0.01 it left the loss
unchanged (docs/parallel.md).

Bytes: the hook counts its own payload per rank (k values at 2 bytes + k 16-bit offsets = 4k
bytes, plus 2 bytes per entry of the whole-sent tensors, against 4n bytes of an all-reduce);
``wire_bytes`` also estimates ring traffic, where an
all-gather sends (W-1) payloads but a ring all-reduce only 2(W-1)/W of the buffer: top-k loses
its edge as the data-parallel degree grows past ~1/(4p).
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class TopKState:
    fraction: float
    warmup_steps: int = 0
    process_group: Any = None
    error_feedback: bool = True
    ramp_steps: int | None = None  # steps from ``ramp_from`` down to ``fraction`` after warm-up (None: warmup_steps)
    ramp_from: float = 1.0  # the fraction kept at the ramp's start (1: dense)
    step: int = 0
    # Residuals per parameter (by identity): DDP rebuilds its buckets after the first step, so a
    # per-bucket residual would not line up with the new buckets.
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)
    bytes_sent: int = 0  # this rank's payload through the hook
    bytes_dense: int = 0  # what plain all-reduce of the same buckets carries
    wire_sent: float = 0.0  # ring estimate for the hook's collectives
    wire_dense: float = 0.0  # ring estimate for plain all-reduce
    # Test and benchmark instrumentation: the running sum of this rank's raw gradients.
    track_totals: bool = False
    grad_totals: dict[int, torch.Tensor] = field(default_factory=dict)
    log_every: int = 0  # log the byte counters every this many steps (0: never)
    dense_small: bool = True  # send 1-D tensors (biases, norms) whole: values only, no indices
    half_values: bool = True  # send values as bfloat16; the rounding error stays in the residual
    # Local gradient clipping (DGC): on compressed steps each rank clips its own gradient before
    # it enters the residual, to clip_norm times the bucket's share sqrt(n_bucket / total_numel)
    # (one bucket: exactly the local gradient's norm); 0 turns it off.
    clip_norm: float = 0.0
    total_numel: int = 0
    last_compressed: bool = False  # whether the last finished step sent top-k (not all-reduce)
    # Per parameter, a per-entry weight to rank entries by (|gradient + residual| times it) instead
    # of by magnitude; None (or None for a parameter) ranks by magnitude. The loop installs AdamW's
    # 1/sqrt(v) (optim.update_scale): entries rank by the step they would take.
    selection_scale: Callable[[torch.Tensor], torch.Tensor | None] | None = None
    # Momentum compression (0/1 Adam's recipe with top-k), 0 turns it off: on compressed steps each
    # rank folds its (clipped) gradient of every matrix into its own momentum,
    # m = momentum * m + (1 - momentum) * g, and top-k sends m + residual instead of g + residual;
    # the optimizer applies the mean of what was sent as its first moment
    # (optim.FrozenVarianceAdamW's ``grad_is_momentum``). 1-D tensors stay gradients.
    momentum: float = 0.0
    momenta: dict[int, torch.Tensor] = field(default_factory=dict)  # per matrix, by identity
    # Where a matrix's momentum starts at the first compressed step: the loop installs the
    # optimizer's first moment after the dense warm-up (optim.first_moment); None: zeros.
    momentum_source: Callable[[torch.Tensor], torch.Tensor | None] | None = None
    momentum_totals: dict[int, torch.Tensor] = field(default_factory=dict)  # with track_totals
    # Micro-batches per optimizer step (the hook runs once per micro-batch). Under momentum
    # compression a compressed step's micro-batches but the last keep their gradient local, as
    # DDP's no_sync would, so each rank's momentum takes the step's whole gradient once; the
    # warm-up is then rounded up to whole steps.
    accumulation: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"top-k fraction must be in (0, 1), got {self.fraction}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.ramp_steps is None:
            self.ramp_steps = self.warmup_steps
        if self.ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {self.ramp_steps}")
        if not self.fraction <= self.ramp_from <= 1.0:
            raise ValueError(f"ramp_from must be in [fraction, 1] = [{self.fraction}, 1], got {self.ramp_from}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {self.accumulation}")
        if self.momentum > 0:
            self.warmup_steps = -(-self.warmup_steps // self.accumulation) * self.accumulation

    def keeps_local(self, step: int) -> bool:
        """Whether micro-batch ``step`` (0-based) keeps its gradient local instead of sending:
        under momentum compression, every micro-batch of a compressed step but its last."""
        return self.momentum > 0 and step >= self.warmup_steps and (step + 1) % self.accumulation != 0

    def density(self, step: int) -> float:
        """The fraction kept at ``step`` (0-based): 1 during warm-up, then
        ramp_from * (fraction / ramp_from)**(i/(R+1)) for the i-th ramp step, then ``fraction``."""
        if step < self.warmup_steps:
            return 1.0
        i = step - self.warmup_steps + 1
        ramp = int(self.ramp_steps or 0)
        if i > ramp:
            return self.fraction
        return self.ramp_from * (self.fraction / self.ramp_from) ** (i / (ramp + 1))

    def summary(self) -> dict[str, float]:
        return {
            "step": self.step,
            "fraction": self.fraction,
            "bytes_sent": self.bytes_sent,
            "bytes_dense": self.bytes_dense,
            "ratio": round(self.ratio, 3),
            "wire_ratio": round(self.wire_dense / self.wire_sent, 3) if self.wire_sent else 1.0,
        }

    @property
    def ratio(self) -> float:
        """How many times fewer bytes the hook sent than plain all-reduce would have."""
        return self.bytes_dense / self.bytes_sent if self.bytes_sent else 1.0

    def rekey(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> None:
        """Move the per-parameter state (residuals, momenta, running totals), which is keyed by
        identity, from ``old``'s Parameters to ``new``'s of the same name."""
        if set(old) != set(new):
            raise ValueError(f"rekey: the parameters differ in name: {sorted(set(old) ^ set(new))[:5]}")
        moves = {id(old[name]): id(new[name]) for name in old}
        for table in (self.residuals, self.momenta, self.momentum_totals, self.grad_totals):
            moved = {moves[key]: value for key, value in table.items() if key in moves}
            table.clear()
            table.update(moved)

    def follow_learning_rate(self, before: float, after: float) -> None:
        """Rescale every residual by ``before / after`` when the learning rate changes between two
        steps (see "Learning-rate changes" above). A next rate of 0 leaves them as they are."""
        if after <= 0 or before == after:
            return
        factor = before / after
        for residual in self.residuals.values():
            residual.mul_(factor)

    def residual_for(self, param: torch.Tensor) -> torch.Tensor:
        r = self.residuals.get(id(param))
        if r is None:
            r = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            self.residuals[id(param)] = r
        return r


def _world(group: Any) -> int:
    return dist.get_world_size(group)


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    params = bucket.parameters()
    n = buffer.numel()
    world = _world(state.process_group)
    dense_bytes = n * buffer.element_size()
    state.bytes_dense += dense_bytes
    state.wire_dense += 2 * (world - 1) / world * dense_bytes
    if state.track_totals:
        _add_totals(state, params, buffer)
    step = state.step
    if bucket.is_last():
        state.step += 1
        state.last_compressed = step >= state.warmup_steps
    if state.keeps_local(step):
        _maybe_log(state, bucket)
        return local_only_hook(None, bucket)
    if step < state.warmup_steps:
        state.bytes_sent += dense_bytes
        state.wire_sent += 2 * (world - 1) / world * dense_bytes
        _maybe_log(state, bucket)
        buffer.div_(world)
        fut = dist.all_reduce(buffer, group=state.process_group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    acc = buffer.to(torch.float32)
    if state.clip_norm > 0 and state.total_numel > 0:
        acc = _clip(acc, float(acc.norm()), state.clip_norm * math.sqrt(n / state.total_numel))
    work, combine = _exchange(state, params, acc, step, world)
    _maybe_log(state, bucket)
    return work.get_future().then(lambda _: combine().to(buffer.dtype))


def _clip(acc: torch.Tensor, norm: float, limit: float) -> torch.Tensor:
    return acc * (limit / norm) if norm > limit else acc


def _exchange(
    state: TopKState, params: list[torch.Tensor], acc: torch.Tensor, step: int, world: int
) -> tuple[Any, Callable[[], torch.Tensor]]:
    """Error feedback, top-k and the all-gather of one flat float32 gradient ``acc`` of ``params``:
    (the gather's work, a function giving the mean of every rank's sent entries once it is done)."""
    n = acc.numel()
    if state.momentum > 0:
        acc = _local_momentum(state, params, acc)
    if state.error_feedback:
        acc = acc + _flat_residual(state, params, n)
    small = [state.dense_small and p.dim() <= 1 for p in params]
    score = _selection_score(state, params, acc, small)
    dense_idx, idx, bases = _split_indices(score, [p.numel() for p in params], small, state.density(step))
    n_dense, k = dense_idx.numel(), idx.numel()
    picked = torch.cat([dense_idx, idx])
    values = acc[picked]
    sent = values.to(torch.bfloat16).to(torch.float32) if state.half_values else values
    if state.error_feedback:
        # What went out (after rounding) leaves the residual; the rest stays for later steps.
        acc[picked] -= sent
        _store_residual(state, params, acc)
    payload = _encode(values, idx - bases, state.half_values)
    state.bytes_sent += payload.numel() * payload.element_size()
    state.wire_sent += (world - 1) * payload.numel() * payload.element_size()
    gathered = [torch.empty_like(payload) for _ in range(world)]
    work = dist.all_gather(gathered, payload, group=state.process_group, async_op=True)

    def combine() -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.float32, device=acc.device)
        for part in gathered:
            vals, offsets = _decode(part, n_dense + k, k, state.half_values)
            out.index_add_(0, dense_idx, vals[:n_dense])
            out.index_add_(0, bases + offsets, vals[n_dense:])
        return out.div_(world)

    return work, combine


def sends_momentum(state: TopKState, param: torch.Tensor) -> bool:
    """Whether the hook sends ``param``'s momentum rather than its gradient: matrices, under
    momentum compression."""
    return state.momentum > 0 and param.dim() >= 2


def _local_momentum(state: TopKState, params: list[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    """``grad`` (flat, of ``params``) with every matrix's slice replaced by this rank's momentum,
    updated with that slice: m = momentum * m + (1 - momentum) * g."""
    out, offset = grad.clone(), 0
    for p in params:
        n = p.numel()
        if sends_momentum(state, p):
            m = state.momenta.get(id(p))
            if m is None:
                m = _initial_momentum(state, p)
            m = m * state.momentum + grad[offset : offset + n] * (1 - state.momentum)
            state.momenta[id(p)] = m
            out[offset : offset + n] = m
            if state.track_totals:
                total = state.momentum_totals.get(id(p))
                state.momentum_totals[id(p)] = m.clone() if total is None else total + m
        offset += n
    return out


def _initial_momentum(state: TopKState, param: torch.Tensor) -> torch.Tensor:
    start = state.momentum_source(param) if state.momentum_source is not None else None
    if start is None:
        return torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
    if start.numel() != param.numel():
        raise RuntimeError(f"momentum source of {start.numel()} entries for a parameter of {param.numel()}")
    return start.detach().reshape(-1).to(device=param.device, dtype=torch.float32).clone()


def reduce_gradients(
    state: TopKState, params: list[torch.Tensor], norm_group: Any = None, counted: list[bool] | None = None
) -> None:
    """The hook's reduction run by hand on ``params``' gradients (in place), for a student whose
    DDP does not reduce (pipeline stages: ``local_only_hook``). The caller first adds the tied
    embedding/head parts, so the tied weight is compressed whole, as in the unsplit student.
    Local clipping uses the rank's whole gradient: the norm of its ``counted`` entries (a tied
    copy is counted on one stage only) over ``norm_group`` (the pipeline stages), against
    ``clip_norm``, as the hook does for a student whose gradient fits one DDP bucket."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    n, world = sum(p.numel() for p in params), _world(state.process_group)
    state.bytes_dense += 4 * n
    state.wire_dense += 2 * (world - 1) / world * 4 * n
    step = state.step
    state.step += 1
    state.last_compressed = step >= state.warmup_steps
    if state.keeps_local(step):
        return
    flat = torch.cat([g.detach().reshape(-1).to(torch.float32) for g in grads])
    if step < state.warmup_steps:
        state.bytes_sent += 4 * n
        state.wire_sent += 2 * (world - 1) / world * 4 * n
        dist.all_reduce(flat, group=state.process_group)
        out = flat.div_(world)
    else:
        if state.clip_norm > 0:
            flat = _clip(flat, _rank_norm(grads, norm_group, counted), state.clip_norm)
        work, combine = _exchange(state, params, flat, step, world)
        work.wait()
        out = combine()
    if state.log_every and state.step % state.log_every == 0:
        log.info("gradient compression %s", json.dumps(state.summary()))
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = out[offset : offset + p.numel()].view_as(p).to(g.dtype).clone()
        offset += p.numel()


def _rank_norm(grads: list[torch.Tensor], group: Any, counted: list[bool] | None) -> float:
    keep = counted or [True] * len(grads)
    total = torch.zeros(1, dtype=torch.float64)
    for g, c in zip(grads, keep, strict=True):
        if c:
            total += g.detach().double().pow(2).sum()
    if group is not None:
        dist.all_reduce(total, group=group)
    return float(total.sqrt())


def local_only_hook(_: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP hook that reduces nothing: the bucket keeps this rank's own gradient, for
    ``reduce_gradients`` to reduce after the step's backward."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


# Sparse positions travel as 16-bit offsets: a tensor is cut into spans of 2**16 entries, each
# keeps its own top share, and an index is sent as its offset within its span (every rank knows
# the spans' starts from the shapes alone). 2 bytes instead of an int32's 4.
INDEX_SPAN = 1 << 16


def _selection_score(
    state: TopKState, params: list[torch.Tensor], acc: torch.Tensor, small: list[bool]
) -> torch.Tensor:
    """What top-k ranks: ``acc`` itself, or each entry times its parameter's selection scale."""
    if state.selection_scale is None:
        return acc
    pieces, offset = [], 0
    for p, whole in zip(params, small, strict=True):
        piece = acc[offset : offset + p.numel()]
        scale = None if whole else state.selection_scale(p)
        if scale is not None and scale.numel() == piece.numel():
            piece = piece * scale.to(piece.device)
        pieces.append(piece)
        offset += p.numel()
    return torch.cat(pieces)


def _split_indices(
    acc: torch.Tensor, sizes: list[int], small: list[bool], density: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions of the tensors sent whole, top-k positions of the others, the start of each
    top-k position's span) in the flat bucket."""
    dense, picks, bases, offset = [], [], [], 0
    for n, whole in zip(sizes, small, strict=True):
        if whole:
            dense.append(torch.arange(offset, offset + n, device=acc.device))
        else:
            idx, base = _per_tensor_topk(acc[offset : offset + n], [n], density)
            picks.append(idx + offset)
            bases.append(base + offset)
        offset += n
    empty = torch.zeros(0, dtype=torch.long, device=acc.device)
    return (
        torch.cat(dense) if dense else empty,
        torch.cat(picks) if picks else empty,
        torch.cat(bases) if bases else empty,
    )


def _per_tensor_topk(acc: torch.Tensor, sizes: list[int], density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices into ``acc``, the start of each index's span): the top ceil(density * m) entries
    of every span of m <= INDEX_SPAN entries of each tensor. The counts depend only on the shapes,
    so every rank sends equally long messages and the i-th index of each lies in the same span."""
    picks, bases, offset = [], [], 0
    for n in sizes:
        for start in range(offset, offset + n, INDEX_SPAN):
            m = min(INDEX_SPAN, offset + n - start)
            k = max(1, math.ceil(density * m))
            piece = acc[start : start + m]
            chosen = piece.abs().topk(k, sorted=False).indices if k < m else torch.arange(m, device=acc.device)
            picks.append(chosen + start)
            bases.append(torch.full((chosen.numel(),), start, dtype=torch.long, device=acc.device))
        offset += n
    empty = torch.zeros(0, dtype=torch.long, device=acc.device)
    return (torch.cat(picks), torch.cat(bases)) if picks else (empty, empty)


def _encode(values: torch.Tensor, offsets: torch.Tensor, half: bool) -> torch.Tensor:
    """One int32 message: the values' bits (bfloat16 or float32), then the 16-bit span offsets.
    gloo has no 16-bit integers: the int16 stream travels as int32, padded to an even length."""
    value_bits = (values.to(torch.bfloat16) if half else values.to(torch.float32)).view(torch.int16)
    offset_bits = (offsets - 32768).to(torch.int16)  # 0..65535 shifted into int16's range
    bits = torch.cat([value_bits, offset_bits])
    if bits.numel() % 2:
        bits = torch.cat([bits, bits.new_zeros(1)])
    return bits.view(torch.int32)


def _decode(payload: torch.Tensor, n_values: int, k: int, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``_encode``: (float32 values, int64 span offsets)."""
    bits = payload.view(torch.int16)
    width = 1 if half else 2
    values = bits[: n_values * width].view(torch.bfloat16 if half else torch.float32).to(torch.float32)
    offsets = bits[n_values * width : n_values * width + k].to(torch.int64) + 32768
    return values, offsets


def residual_vector(state: TopKState, params: list[torch.Tensor]) -> torch.Tensor:
    """This rank's residuals for ``params`` (in that order) as one float32 vector; zeros where a
    parameter has none yet. With the step counter this is all the hook carries between steps."""
    return (
        torch.cat([state.residual_for(p).detach().reshape(-1).float().cpu() for p in params])
        if params
        else torch.zeros(0)
    )


def momentum_vector(state: TopKState, params: list[torch.Tensor]) -> torch.Tensor:
    """This rank's momenta for ``params`` (momentum compression) as one float32 vector laid out like
    ``residual_vector``, zeros for the tensors sent as gradients."""
    return torch.cat(
        [state.momenta.get(id(p), torch.zeros(p.numel())).detach().reshape(-1).float().cpu() for p in params]
    )


def rank_vectors(state: TopKState, params: list[torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """What the hook carries between steps for one rank, as checkpoint tensors: ``rank<R>`` its
    residuals and, under momentum compression once it has started, ``momentum_rank<R>`` its momenta."""
    out = {f"rank{rank}": residual_vector(state, params)}
    if state.momenta:
        out[f"momentum_rank{rank}"] = momentum_vector(state, params)
    return out


def load_residual_vector(state: TopKState, params: list[torch.Tensor], flat: torch.Tensor, step: int) -> None:
    """Inverse of ``residual_vector``; also sets the step counter (warm-up and ramp position)."""
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(
            f"checkpointed compression residuals hold {flat.numel()} entries but the student "
            f"has {total} gradient entries: the checkpoint belongs to another model"
        )
    offset = 0
    for p in params:
        state.residuals[id(p)] = flat[offset : offset + p.numel()].to(device=p.device, dtype=torch.float32).clone()
        offset += p.numel()
    state.step = step


def gather_residuals(state: TopKState, params: list[torch.Tensor], group: Any = None) -> dict[str, torch.Tensor] | None:
    """Collective over ``group`` (default: the world): every rank's residual vector, gathered to
    its rank 0 for the checkpoint as {"rank<R>": vector, "hook_step": [step], "world": [size]};
    None on the other ranks. Ranks of a split student hold residuals of different lengths (their
    own shards and stages): vectors are padded to the longest for the gather and cut back."""
    from .distributed import peer_guard

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # Residuals, then momenta when there are any (every rank has them from the same step on).
    mine = torch.cat(list(rank_vectors(state, params, rank).values()))
    with peer_guard("the compression-residual gather"):
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([mine.numel()], dtype=torch.int64), group=group)
        longest = max(int(s[0]) for s in sizes)
        padded = torch.cat([mine, mine.new_zeros(longest - mine.numel())])
        parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
        dist.gather(padded, parts, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if parts is None:
        return None
    out: dict[str, torch.Tensor] = {}
    for r, t in enumerate(parts):
        vec = t[: int(sizes[r][0])]
        half = vec.numel() // 2 if state.momenta else vec.numel()
        out[f"rank{r}"] = vec[:half].clone()
        if state.momenta:
            out[f"momentum_rank{r}"] = vec[half:].clone()
    out["hook_step"] = torch.tensor([state.step], dtype=torch.int64)
    out["world"] = torch.tensor([world], dtype=torch.int64)
    return out


def restore_residuals(
    state: TopKState, params: list[torch.Tensor], saved: dict[str, torch.Tensor] | None, group: Any = None
) -> bool:
    """Load this rank's residuals from a checkpoint's gathered file; False (residuals start at
    zero, with a warning) when the checkpoint has none for this rank: one written without
    compression, at another world size, or by another layout (the lengths differ)."""
    key = f"rank{dist.get_rank(group)}"
    world = dist.get_world_size(group)
    if saved is None or key not in saved or "hook_step" not in saved:
        log.warning("checkpoint holds no compression residuals for %s: they start from zero", key)
        return False
    if "world" in saved and int(saved["world"][0]) != world:
        log.warning(
            "checkpoint's compression residuals are from a world of %d ranks, this one has %d: they start from zero",
            int(saved["world"][0]),
            world,
        )
        state.step = int(saved["hook_step"][0])
        return False
    if saved[key].numel() != sum(p.numel() for p in params):
        log.warning("checkpoint's compression residuals for %s belong to another layout: they start from zero", key)
        state.step = int(saved["hook_step"][0])
        return False
    load_residual_vector(state, params, saved[key], int(saved["hook_step"][0]))
    _restore_momenta(state, params, saved.get(f"momentum_{key}"))
    return True


def _restore_momenta(state: TopKState, params: list[torch.Tensor], flat: torch.Tensor | None) -> None:
    """Under momentum compression, this rank's momenta from the checkpoint; without them (a
    checkpoint of the dense warm-up, or one written with gradient compression) each matrix's
    momentum starts again from the optimizer's first moment at the next compressed step."""
    state.momenta.clear()
    if state.momentum == 0:
        return
    if flat is None:
        if state.step > state.warmup_steps:
            log.warning("checkpoint holds no compression momenta: they restart from the optimizer's first moment")
        return
    if flat.numel() != sum(p.numel() for p in params):
        raise ValueError(
            f"checkpointed compression momenta hold {flat.numel()} entries but its residuals "
            f"{sum(p.numel() for p in params)}: the file is not one the trainer wrote"
        )
    offset = 0
    for p in params:
        if sends_momentum(state, p):
            state.momenta[id(p)] = flat[offset : offset + p.numel()].to(device=p.device, dtype=torch.float32).clone()
        offset += p.numel()


def _maybe_log(state: TopKState, bucket: dist.GradBucket) -> None:
    if state.log_every and bucket.is_last() and state.step % state.log_every == 0:
        log.info("gradient compression %s", json.dumps(state.summary()))


def _flat_residual(state: TopKState, params: list[torch.Tensor], n: int) -> torch.Tensor:
    flat = torch.cat([state.residual_for(p) for p in params])
    if flat.numel() != n:
        raise RuntimeError(f"DDP bucket of {n} entries does not match its parameters ({flat.numel()})")
    return flat


def _store_residual(state: TopKState, params: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        state.residuals[id(p)] = flat[offset : offset + p.numel()].clone()
        offset += p.numel()


def _add_totals(state: TopKState, params: list[torch.Tensor], buffer: torch.Tensor) -> None:
    offset = 0
    for p in params:
        piece = buffer[offset : offset + p.numel()].detach().to(torch.float32)
        total = state.grad_totals.get(id(p))
        state.grad_totals[id(p)] = piece.clone() if total is None else total + piece
        offset += p.numel()


def rehook(state: TopKState, ddp_module: Any, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> None:
    """Install ``state``'s hook on a new DDP wrapper of the same student, whose Parameters may be
    new objects (QAT's fake-quant wrappers): the schedule's step, the residuals, momenta and byte
    counts carry on, moved by name from ``old``'s Parameters to ``new``'s. A fresh state would start
    the warm-up again, drop the unsent gradient mass and restart the byte counts."""
    state.rekey(old, new)
    ddp_module.register_comm_hook(state, topk_hook)


def register_topk(
    ddp_module: Any,
    fraction: float,
    warmup_steps: int = 0,
    process_group: Any = None,
    ramp_steps: int | None = None,
    clip_norm: float = 0.0,
    momentum: float = 0.0,
    accumulation: int = 1,
    ramp_from: float = 1.0,
) -> TopKState:
    """Install the hook on a DDP module and return its state (byte counters, residuals). With
    ``clip_norm`` the hook clips each rank's gradient locally on compressed steps; the caller then
    skips its own clipping of the reduced gradient on those steps (``last_compressed``)."""
    state = TopKState(
        fraction=fraction,
        warmup_steps=warmup_steps,
        process_group=process_group,
        ramp_steps=ramp_steps,
        ramp_from=ramp_from,
        clip_norm=clip_norm,
        momentum=momentum,
        accumulation=accumulation,
        total_numel=sum(p.numel() for p in ddp_module.parameters() if p.requires_grad),
    )
    ddp_module.register_comm_hook(state, topk_hook)
    return state
