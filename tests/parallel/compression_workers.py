"""Rank functions for the compression tests: a small MLP under real DDP (no transformers import,
so the processes start fast)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kdistill.trainer.parallel.compression import TopKState, register_topk, rehook
from kdistill.trainer.parallel.compression_budget import plan_ramp_from, shapes_of
from kdistill.trainer.parallel.distributed import DistEnv


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 8))


def topk_run(env: DistEnv, workdir: Path, args: dict) -> None:
    model = mlp()
    start = [p.detach().clone() for p in model.parameters()]
    ddp = DDP(model, bucket_cap_mb=0.02)  # several buckets, so the per-parameter residuals are exercised
    accumulation = args.get("accumulation", 1)
    schedule = {
        "warmup_steps": args["warmup"],
        "ramp_steps": args.get("ramp"),
        "momentum": args.get("momentum", 0.0),
        "accumulation": accumulation,
    }
    plan = None
    if "budget" in args:  # the ramp's start from a byte budget, as the runtime plans it
        shapes = shapes_of((p.numel() for p in model.parameters()), (p.dim() <= 1 for p in model.parameters()))
        plan = plan_ramp_from(
            TopKState(args["fraction"], **schedule), shapes, args["steps"] * accumulation, args["budget"]
        )
    state = register_topk(ddp, args["fraction"], ramp_from=plan.ramp_from if plan else 1.0, **schedule)
    state.error_feedback = args.get("error_feedback", True)
    state.clip_norm = args.get("clip", 0.0)
    state.track_totals = True
    if args.get("selection_scale"):
        # A fixed per-entry weight (the same on both ranks), far from uniform: top-k then ranks by
        # |gradient + residual| * weight, which must not disturb the error-feedback identity.
        weights = {
            id(p): torch.rand(p.numel(), generator=torch.Generator().manual_seed(i)) ** 4
            for i, p in enumerate(model.parameters())
        }
        state.selection_scale = lambda p: weights[id(p)]
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    # Per-step learning rates (``lrs``, one more than steps: the last is the next step's); with
    # ``follow_lr`` the residuals follow each change, as the trainer's loop makes them.
    lrs = args.get("lrs") or [1.0] * (args["steps"] + 1)
    gen = torch.Generator().manual_seed(100 + env.rank)
    step_ratios, update_norms, compressed = [], [], []
    # Under momentum compression, this rank's momentum recomputed here from its own gradients
    # (differences of the hook's running gradient sums), and the running sum of what a matrix
    # should have contributed: its mean gradient on dense steps, its momentum on compressed ones.
    mine = {id(p): torch.zeros(p.numel()) for p in model.parameters()}
    due = {id(p): torch.zeros(p.numel()) for p in model.parameters()}
    seen = {id(p): torch.zeros(p.numel()) for p in model.parameters()}
    for step in range(args["steps"]):
        if step == args.get("rewrap_at"):
            ddp, opt = _rewrap(model, ddp, state, (mine, due, seen))
        before = (state.bytes_sent, state.bytes_dense)
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        x = torch.randn(16, 64, generator=gen)
        y = torch.randn(16, 8, generator=gen)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(accumulation), y.chunk(accumulation), strict=True):
            loss = ((ddp(xs) - ys) ** 2).mean() * 0.01 / accumulation  # small steps keep SGD(lr=1) stable
            loss.backward()
        before_step = [p.detach().clone() for p in model.parameters()]
        opt.step()
        update_norms.append(
            float(
                torch.cat(
                    [(b - p.detach()).flatten() for b, p in zip(before_step, model.parameters(), strict=True)]
                ).norm()
            )
        )
        if args.get("follow_lr"):
            state.follow_learning_rate(lrs[step], lrs[step + 1])
        compressed.append(state.last_compressed)
        for p in model.parameters():
            grad = state.grad_totals[id(p)] - seen[id(p)]
            seen[id(p)] = state.grad_totals[id(p)].clone()
            if state.last_compressed and p.dim() >= 2 and state.momentum > 0:
                mine[id(p)] = state.momentum * mine[id(p)] + (1 - state.momentum) * grad
                due[id(p)] += lrs[step] * mine[id(p)]
            else:
                due[id(p)] += lrs[step] * grad
        step_ratios.append((state.bytes_dense - before[1]) / (state.bytes_sent - before[0]))
    # Identity under error feedback: applied updates + mean residual == sum of true mean grads
    # (each times its step's learning rate; the residual at the next step's).
    applied = [s - p.detach() for s, p in zip(start, model.parameters(), strict=True)]
    true_sum = [due[id(p)].clone() for p in model.parameters()]
    resid = [lrs[args["steps"]] * state.residual_for(p).clone() for p in model.parameters()]
    for t in (*true_sum, *resid):
        dist.all_reduce(t)
        t.div_(env.world_size)
    gap = max(float((a.flatten() + r - t).abs().max()) for a, r, t in zip(applied, resid, true_sum, strict=True))
    gap_without_residual = max(float((a.flatten() - t).abs().max()) for a, t in zip(applied, true_sum, strict=True))
    scale = max(float(t.abs().max()) for t in true_sum)
    (workdir / f"rank{env.rank}.json").write_text(
        json.dumps(
            {
                "step_ratios": step_ratios,
                "update_norms": update_norms,
                "compressed": compressed,
                "ratio": state.ratio,
                "gap": gap,
                "gap_without_residual": gap_without_residual,
                "scale": scale,
                "momentum_gap": max(
                    (float((m - mine[key]).abs().max()) for key, m in state.momenta.items()), default=0.0
                ),
                "momenta": len(state.momenta),
                "params": [p.detach().flatten().tolist()[:50] for p in model.parameters()],
                "bytes": [state.bytes_sent, state.bytes_dense],
                "plan": None if plan is None else [plan.ramp_from, plan.sent, plan.dense, plan.within_budget],
            }
        )
    )


def _rewrap(
    model: nn.Module, ddp: DDP, state: TopKState, tables: tuple[dict[int, torch.Tensor], ...]
) -> tuple[DDP, torch.optim.Optimizer]:
    """What QAT's fake-quant wrappers may do: every Parameter becomes a new object (same values),
    DDP wraps the model again and the hook's state moves over (``rehook``); the worker's own
    bookkeeping, keyed by identity too, moves the same way."""
    old = dict(model.named_parameters())
    for module in model.modules():
        for attr, p in list(module.named_parameters(recurse=False)):
            setattr(module, attr, nn.Parameter(p.detach().clone()))
    new = dict(model.named_parameters())
    for table in tables:
        moved = {id(new[name]): table[id(p)] for name, p in old.items()}
        table.clear()
        table.update(moved)
    wrapped = DDP(model, bucket_cap_mb=0.02)
    rehook(state, wrapped, old, new)
    return wrapped, torch.optim.SGD(wrapped.parameters(), lr=1.0)


def reduce_accumulation_run(env: DistEnv, workdir: Path, args: dict) -> None:
    """``reduce_gradients`` (the pipelined student's path) called once per micro-batch, as
    ParallelStudent does, with two micro-batches per step, beside one call per step on the whole
    batch: under momentum compression both must apply the same updates and send the same bytes."""
    from kdistill.trainer.parallel.compression import reduce_gradients

    models = {"two": mlp(), "one": mlp()}
    states = {
        "two": TopKState(fraction=0.05, warmup_steps=4, ramp_steps=0, momentum=0.9, accumulation=2),
        "one": TopKState(fraction=0.05, warmup_steps=2, ramp_steps=0, momentum=0.9),
    }
    for state in states.values():
        # float32 values: a bfloat16 rounding near a boundary can flip with the summation order.
        state.half_values = False
    gen = torch.Generator().manual_seed(200 + env.rank)
    for _ in range(args["steps"]):
        x, y = torch.randn(16, 64, generator=gen), torch.randn(16, 8, generator=gen)
        for name, model in models.items():
            params = list(model.parameters())
            for p in params:
                p.grad = None
            micro = 2 if name == "two" else 1
            for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
                (((model(xs) - ys) ** 2).mean() / micro).backward()
                reduce_gradients(states[name], params)
            with torch.no_grad():
                for p in params:
                    p -= 0.5 * p.grad
    (workdir / f"rank{env.rank}.json").write_text(
        json.dumps(
            {
                name: {
                    "params": [p.detach().flatten().tolist() for p in model.parameters()],
                    "bytes_sent": states[name].bytes_sent,
                    "compressed": states[name].last_compressed,
                    "momenta": len(states[name].momenta),
                }
                for name, model in models.items()
            }
        )
    )


def runtime_rewrap_run(env: DistEnv, workdir: Path, args: dict) -> None:
    """``ParallelRuntime.wrap_student`` called a second time on the same student, as the single-process
    flow does when QAT starts: the second wrap must keep the first one's hook state."""
    from kdistill.trainer.parallel.mesh import MeshLayout
    from kdistill.trainer.parallel.runtime import ParallelRuntime

    layout = MeshLayout(world_size=2, pipeline=1, data=2, tensor=1, teacher_stages=1)
    runtime = ParallelRuntime(env, layout, torch.device("cpu"), top_k=0.01, compression_warmup=1, compression_ramp=0)
    model = mlp()
    gen = torch.Generator().manual_seed(300 + env.rank)

    def steps(wrapped: nn.Module, n: int) -> None:
        for _ in range(n):
            x, y = torch.randn(16, 64, generator=gen), torch.randn(16, 8, generator=gen)
            ((wrapped(x) - y) ** 2).mean().backward()
            for p in model.parameters():
                p.grad = None

    steps(runtime.wrap_student(model), 3)
    first = runtime.compression
    sent, residuals = first.bytes_sent, {n: first.residual_for(p).clone() for n, p in model.named_parameters()}
    for module in model.modules():
        for attr, p in list(module.named_parameters(recurse=False)):
            setattr(module, attr, nn.Parameter(p.detach().clone()))
    wrapped = runtime.wrap_student(model)
    state = runtime.compression
    carried = all(torch.equal(state.residuals[id(p)], residuals[n]) for n, p in model.named_parameters())
    steps(wrapped, 2)
    (workdir / f"rank{env.rank}.json").write_text(
        json.dumps(
            {
                "same_state": state is first,
                "step": state.step,
                "residuals_carried": carried,
                "residual_keys_are_the_new_parameters": set(state.residuals) == {id(p) for p in model.parameters()},
                "bytes_grew": state.bytes_sent > sent > 0,
            }
        )
    )
