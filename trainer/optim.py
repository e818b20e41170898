"""The optimizer and learning-rate schedule of a run, built from named parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.adam import adam
from torch.optim.lr_scheduler import LambdaLR

from kdistill.api.spec import Distillation

from .schedules import lr_multiplier

NamedParams = list[tuple[str, nn.Parameter]]

# Frozen second moments are floored at this share of their tensor's mean: an entry whose gradient
# was (nearly) zero through the dense warm-up would otherwise divide its later updates by eps.
FROZEN_VARIANCE_FLOOR = 1e-4
ADAM_BETA1, ADAM_BETA2 = 0.9, 0.999
# Torch's single-tensor AdamW forms two temporaries the size of the parameter it updates (sqrt(v)
# and its quotient): 500 MiB for a 32000 x 2048 head, on top of that head's weights, gradient and
# moments. SlicedAdamW runs the same update over flat slices of at most this many elements, so the
# temporaries stay within two slices (32 MiB in fp32) whatever the largest parameter.
UPDATE_SLICE_ELEMENTS = 1 << 22


class SlicedAdamW(AdamW):
    """torch's AdamW whose CPU single-tensor update runs slice by slice over parameters larger than
    ``slice_elements``: the same elementwise arithmetic on the same values, so the result equals
    ``AdamW``'s bit for bit, with a bounded working buffer instead of two parameter-sized ones.

    The slices are flat views of the parameter, its gradient and its moments (a DTensor's local
    shard), each updated by torch's own functional ``adam`` with a copy of the step count; the
    state keeps AdamW's layout (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints and resumes
    are unchanged. Where AdamW would not take its single-tensor path (foreach or fused kernels,
    accelerators, amsgrad, capturable or differentiable steps) this is AdamW."""

    def __init__(self, params: Any, *, slice_elements: int = UPDATE_SLICE_ELEMENTS, **kwargs: Any) -> None:
        if slice_elements < 1:
            raise ValueError(f"slice_elements must be >= 1, got {slice_elements}")
        super().__init__(params, **kwargs)
        self.slice_elements = slice_elements

    def step(self, closure: Any = None) -> Any:
        if not all(self._sliceable(group) for group in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                self._sliced_group_step(group)
        return loss

    @staticmethod
    def _sliceable(group: dict[str, Any]) -> bool:
        if group["foreach"] or group["fused"] or group["capturable"] or group["differentiable"] or group["amsgrad"]:
            return False
        return all(p.device.type == "cpu" and not torch.is_complex(p) for p in group["params"])

    def _sliced_group_step(self, group: dict[str, Any]) -> None:
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        exp_avgs: list[torch.Tensor] = []
        exp_avg_sqs: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []
        self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, [], steps)
        locals_ = [[local_shard(t[i]) for t in (params, grads, exp_avgs, exp_avg_sqs)] for i in range(len(params))]
        sliced = [local[0].numel() > self.slice_elements and all(t.is_contiguous() for t in local) for local in locals_]
        whole = [i for i, s in enumerate(sliced) if not s]
        # Parameters within one slice take torch's own loop in one call, as AdamW would.
        self._update(group, *([t[i] for i in whole] for t in (params, grads, exp_avgs, exp_avg_sqs, steps)))
        for i in (i for i, s in enumerate(sliced) if s):
            flat = [t.view(-1) for t in locals_[i]]
            for start in range(0, flat[0].numel(), self.slice_elements):
                part = [t[start : start + self.slice_elements] for t in flat]
                # The functional advances the step it is given: each slice gets a copy, the state
                # advances once below.
                self._update(group, [part[0]], [part[1]], [part[2]], [part[3]], [steps[i].clone()])
            steps[i] += 1

    @staticmethod
    def _update(
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        steps: list[torch.Tensor],
    ) -> None:
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=False,
            fused=False,
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (an alias under no_grad), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class FrozenVarianceAdamW(SlicedAdamW):
    """AdamW whose second moment stops moving after ``freeze_at`` optimizer steps (1-bit Adam's
    recipe), for matrices only; 1-D tensors (biases, norms) keep plain AdamW.

    Why: under top-k compression with error feedback an entry's gradient arrives as a spike, the
    sum of about 1/p steps at once. Adam's variance then sees squared spikes (p * (g/p)^2 = g^2/p
    per step) and divides the whole update by ~sqrt(1/p): 10x too small at p = 0.01. With the
    variance frozen after a dense warm-up the update is linear in the applied gradients, so error
    feedback delays gradient mass but no longer shrinks it. The compression hook sends 1-D tensors
    whole every step, so their variance stays exact and keeps adapting.

    Before ``freeze_at`` it is AdamW. At and after it, for a matrix: ``m = b1 m + (1-b1) g`` and
    ``p -= lr (m / (1-b1^t)) / (sqrt(max(v / (1-b2^freeze_at), floor)) + eps)`` with the weight
    decay applied as AdamW does; ``v`` is the state's ``exp_avg_sq``, left as it was at the
    freeze, so checkpoints keep AdamW's layout and any resume continues exactly.

    With ``grad_is_momentum`` (momentum compression, ``parallel/compression.py``): after the freeze
    a matrix for which it answers True holds in ``grad`` the mean of the momenta the ranks sent,
    already a first moment; it replaces ``m`` (``m = grad``, not blended in) and the step is as above.
    """

    def __init__(
        self,
        params: Any,
        *,
        freeze_at: int,
        grad_is_momentum: Callable[[torch.Tensor], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        if freeze_at < 1:
            raise ValueError(f"freeze_at must be >= 1 (a dense step estimates the variance), got {freeze_at}")
        super().__init__(params, **kwargs)
        self.freeze_at = freeze_at
        self.grad_is_momentum = grad_is_momentum

    def step(self, closure: Any = None) -> Any:
        with torch.no_grad():
            return self._step(closure)

    def _step(self, closure: Any) -> Any:
        first = next((self.state[p] for g in self.param_groups for p in g["params"] if p.grad is not None), None)
        if first is None or "step" not in first or int(first["step"]) < self.freeze_at:
            return super().step(closure)
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, st = p.grad, self.state[p]
                st["step"] += 1
                t = float(st["step"])
                p.mul_(1 - lr * wd)
                exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
                if p.ndim >= 2 and self.grad_is_momentum is not None and self.grad_is_momentum(p):
                    exp_avg.copy_(grad)
                else:
                    exp_avg.lerp_(grad, 1 - beta1)
                step_size = lr / (1 - beta1**t)
                if p.ndim < 2:
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    p.addcdiv_(exp_avg, (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(eps), value=-step_size)
                else:
                    self._frozen_matrix_update(p, exp_avg, exp_avg_sq, 1 - beta2**self.freeze_at, step_size, eps)
        return loss

    def _frozen_matrix_update(
        self, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, correction: float, step_size: float, eps: float
    ) -> None:
        """``p -= step_size · m / (sqrt(max(v / correction, floor)) + eps)``, over flat slices of at
        most ``slice_elements`` (a DTensor's local shard): the temporaries stay within one slice, as
        in ``SlicedAdamW``, instead of three the size of the parameter. The floor is a share of the
        whole tensor's mean (a DTensor's mean is global)."""
        floor = float(v.mean()) / correction * FROZEN_VARIANCE_FLOOR
        local = [local_shard(x) for x in (p, m, v)]
        if all(x.is_contiguous() for x in local):
            flat = [x.view(-1) for x in local]
            step = self.slice_elements
            pieces = [[x[i : i + step] for x in flat] for i in range(0, flat[0].numel(), step)]
        else:  # no flat views: the whole tensor at once
            pieces = [local]
        for w, m_part, v_part in pieces:
            w.addcdiv_(m_part, (v_part / correction).clamp_min_(floor).sqrt_().add_(eps), value=-step_size)


def update_scale(optimizer: Optimizer) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """For the compression hook's selection: per entry of a parameter, how far one unit of its
    gradient moves it under the optimizer's second moment, ``1 / sqrt(v)`` (``v`` floored as the
    frozen variance is); None before the parameter's first step. Entries rank by this times their
    gradient plus residual: the step each would take, which AdamW equalises across entries."""

    def scale(param: torch.Tensor) -> torch.Tensor | None:
        state = optimizer.state.get(param)
        if not state or "exp_avg_sq" not in state:
            return None
        v = state["exp_avg_sq"].detach()
        v = local_shard(v).reshape(-1).to(torch.float32)  # a TP shard's own
        mean = float(v.mean())
        if not mean > 0:
            return None
        return v.clamp_min(mean * FROZEN_VARIANCE_FLOOR).rsqrt_()

    return scale


def first_moment(optimizer: Optimizer) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """For momentum compression: a parameter's first moment (AdamW's ``exp_avg``, a TP shard's own
    part), where each rank's momentum starts when compression starts; None before its first step."""

    def moment(param: torch.Tensor) -> torch.Tensor | None:
        state = optimizer.state.get(param)
        if not state or "exp_avg" not in state:
            return None
        m = state["exp_avg"].detach()
        return local_shard(m).reshape(-1).to(torch.float32)

    return moment


def in_group_order(named: NamedParams) -> NamedParams:
    """``named`` in the optimizer's parameter order: the decayed group (matrices) first, then the
    undecayed one (biases and norms, 1-D). Optimizer state is indexed by this order."""
    return [(n, p) for n, p in named if p.ndim >= 2] + [(n, p) for n, p in named if p.ndim < 2]


def build_optimizer(
    named: NamedParams,
    distillation: Distillation,
    total_steps: int,
    *,
    foreach: bool | None = None,
    freeze_variance_at: int | None = None,
    grad_is_momentum: Callable[[torch.Tensor], bool] | None = None,
) -> tuple[Optimizer, LambdaLR]:
    """AdamW with no weight decay on biases and norms (as usual for transformers), and the
    warm-up/decay schedule over ``total_steps``. With ``freeze_variance_at`` (top-k gradient
    compression), a FrozenVarianceAdamW that freezes the matrices' variance after that many steps."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": distillation.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    settings: dict[str, Any] = {"lr": distillation.learning_rate, "betas": (ADAM_BETA1, ADAM_BETA2), "eps": 1e-8}
    optimizer: Optimizer
    if freeze_variance_at is not None:
        optimizer = FrozenVarianceAdamW(
            groups, freeze_at=freeze_variance_at, grad_is_momentum=grad_is_momentum, foreach=False, **settings
        )
    else:
        optimizer = SlicedAdamW(groups, foreach=foreach, **settings)
    warmup = distillation.warmup_steps
    scheduler = LambdaLR(optimizer, lambda s: lr_multiplier(s, warmup, total_steps))
    return optimizer, scheduler


def freeze_variance_step(hook_warmup_steps: int, accumulation: int) -> int:
    """How many optimizer steps see only dense gradients (the hook counts micro-batches); the
    variance is frozen from the next one. At least 1: the variance needs one step to exist."""
    return max(1, hook_warmup_steps // accumulation)
