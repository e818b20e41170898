"""The student writes completions: pure temperature sampling with a KV cache, in inference mode.

On-policy distillation trains on tokens drawn from the student's own distribution, so the
sampler draws from exactly softmax(logits / T) at every step: no top-k, top-p or repetition
penalty (a model's saved generation config may carry such defaults, which is why this loop does
not go through ``generate``). Prompts are left-padded so that every row's next token sits in
the last column; position ids count real tokens only, so padding does not shift them. Each
step feeds one token per row and reuses the cache of everything before it.

A row stops at the end-of-sequence token (kept: it is the student's choice to stop) or after
its own token limit. Draws come from torch's global generator unless one is given, so a run
seeded per step samples the same completions on a rerun.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _forward_kwargs(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The cache argument's name (transformers 5 renamed ``past_key_values`` to ``cache``), and
    ``logits_to_keep=1`` where the model takes it (only the last position's logits are drawn from)."""
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return ("cache" if "cache" in params else "past_key_values"), extra


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


@torch.inference_mode()
def sample_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The student's completion of each prompt (token ids after the prompt), at most
    ``max_new_tokens`` each (one limit, or one per prompt), ending at ``eos_id`` when drawn.

    The model runs in eval mode (no dropout) and is put back in the mode it was in.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not temperature > 0:
        raise ValueError(f"sampling temperature must be > 0, got {temperature}")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts) or any(n < 0 for n in limits):
        raise ValueError(f"max_new_tokens must be one limit >= 0 or one per prompt, got {max_new_tokens}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids, mask, positions = _left_padded(prompts, pad_id, device)
        completions: list[list[int]] = [[] for _ in prompts]
        active = torch.tensor([n > 0 for n in limits], device=device)
        limit_t = torch.tensor(limits, device=device)
        cache_arg, extra = _forward_kwargs(model)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        cache, logits = _cache_of(out), out.logits[:, -1]
        next_position = positions[:, -1:] + 1
        for step in range(max(limits)):
            if not bool(active.any()):
                break
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            for row in active.nonzero().flatten().tolist():
                completions[row].append(int(token[row]))
            stopped = (step + 1 >= limit_t) | (token == eos_id if eos_id is not None else False)
            active = active & ~stopped
            if not bool(active.any()):
                break
            # Finished rows keep decoding (a batch steps together) but their tokens are dropped.
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                input_ids=token.unsqueeze(1),
                attention_mask=mask,
                position_ids=next_position,
                use_cache=True,
                **{cache_arg: cache},
                **extra,
            )
            cache, logits = _cache_of(out), out.logits[:, -1]
            next_position = next_position + 1
        return completions
    finally:
        model.train(was_training)
