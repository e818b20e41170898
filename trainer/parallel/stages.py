"""Cutting a Hugging Face decoder into contiguous layer stages.

A stage is the original model with everything it does not own removed *in place*: blocks of
other stages become parameter-free pass-throughs, the embeddings leave every stage but the
first, and the final norm and LM head leave every stage but the last. Two things follow:
- the model's own ``forward`` still runs each stage (the first with ``input_ids``, later ones
  with ``inputs_embeds`` = the incoming activation), so masks and rotary embeddings are built
  by the library, not re-implemented here;
- parameter names keep their original fully-qualified names (``transformer.h.5.attn...``), so
  checkpoints written by any pipeline degree line up key for key.

Supported: GPT2 (``transformer.h``) and the Llama family (``model.layers``: Llama, Qwen2,
Mistral), with a causal-LM head (``lm_head``) or a sequence-classification head (``score``).
Anything else (BERT-style encoders among them) is a clear error.

A classifier's last stage pools as Hugging Face's ``*ForSequenceClassification`` does: the class
logits of the last token that is not ``config.pad_token_id`` (``pool_positions``). Only the first
stage sees the token ids, so the positions travel with the activation to the last stage (the
split teacher sends them along; every rank of a split student holds the ids and computes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class PassThrough(nn.Module):
    """Stands in for a block owned by another stage: returns its input activation unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


class ZeroPositions(nn.Module):
    """GPT2 adds learned position embeddings to the input; later stages must add nothing."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim = dim
        self.dtype = dtype

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*position_ids.shape, self.dim, dtype=self.dtype, device=position_ids.device)


@dataclass(frozen=True)
class DecoderParts:
    family: str  # "gpt2" | "llama"
    base: nn.Module  # the module holding embeddings, blocks and final norm
    layers: nn.ModuleList
    embedding_names: tuple[str, ...]  # attributes of base used only by the first stage
    norm_name: str  # attribute of base: the final norm
    head: nn.Module  # the output layer: lm_head, or score of a sequence classifier
    tied: bool  # head weight is the input embedding weight
    head_name: str = "lm_head"  # attribute of the top model holding ``head``

    @property
    def classifier(self) -> bool:
        return self.head_name == "score"


def head_name(model: nn.Module) -> str | None:
    """``lm_head`` for a causal LM, ``score`` for a decoder sequence classifier, else None."""
    for name in ("lm_head", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None


def is_classifier(model: nn.Module) -> bool:
    """A decoder ``*ForSequenceClassification`` (cut or whole): its output layer is ``score``."""
    return head_name(model) == "score"


def decoder_parts(model: nn.Module) -> DecoderParts:
    name = head_name(model)
    if name is None:
        raise ValueError(
            f"{type(model).__name__}: only GPT2 and Llama-family decoders (Llama, Qwen2, Mistral) with a "
            "causal-LM or sequence-classification head can be split into pipeline stages"
        )
    head = getattr(model, name)
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        base = model.transformer
        return DecoderParts("gpt2", base, base.h, ("wte", "wpe"), "ln_f", head, _tied(head, base.wte), name)
    if hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model.model, "norm"):
        base = model.model
        tied = _tied(head, base.embed_tokens)
        return DecoderParts("llama", base, base.layers, ("embed_tokens",), "norm", head, tied, name)
    raise ValueError(
        f"{type(model).__name__}: unsupported architecture for pipeline splitting; supported are GPT2 and "
        "the Llama family (Llama, Qwen2, Mistral)"
    )


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(family, blocks) of a GPT2 or Llama-family decoder, with any head (LM or classifier)."""
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        return "gpt2", model.transformer.h
    if hasattr(model, "model") and hasattr(model.model, "layers"):
        return "llama", model.model.layers
    raise ValueError(
        f"{type(model).__name__}: unsupported architecture for tensor parallelism; supported are GPT2 and the "
        "Llama family (Llama, Qwen2, Mistral)"
    )


def _tied(head: nn.Module, embedding: nn.Module | None) -> bool:
    weight = getattr(head, "weight", None)
    return weight is not None and embedding is not None and weight is getattr(embedding, "weight", None)


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class StageCosts:
    """Parameter counts: what only the first stage holds, each block, what only the last holds."""

    first: int
    layers: tuple[int, ...]
    last: int


def stage_costs(model: nn.Module) -> StageCosts:
    parts = decoder_parts(model)
    first = sum(_numel(getattr(parts.base, n)) for n in parts.embedding_names)
    # A tied head still has to live on the last stage: it is a second copy there.
    last = _numel(getattr(parts.base, parts.norm_name)) + parts.head.weight.numel()
    if getattr(parts.head, "bias", None) is not None:
        last += parts.head.bias.numel()
    return StageCosts(first, tuple(_numel(layer) for layer in parts.layers), last)


def balance_layers(costs: StageCosts, stages: int) -> list[range]:
    """Split the blocks into ``stages`` contiguous non-empty groups minimising the largest
    stage's parameter count (first stage carries the embeddings, the last the head)."""
    n = len(costs.layers)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if stages > n:
        raise ValueError(f"cannot split {n} layers into {stages} non-empty pipeline stages")
    prefix = [0]
    for c in costs.layers:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, lo: int, hi: int) -> int:
        extra = (costs.first if stage == 0 else 0) + (costs.last if stage == stages - 1 else 0)
        return prefix[hi] - prefix[lo] + extra

    inf = float("inf")
    # best[j][i]: the smallest possible max cost when stages 0..j hold blocks [0, i).
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, 0, i)
    for j in range(1, stages):
        for i in range(j + 1, n + 1):
            for k in range(j, i):
                value = max(best[j - 1][k], cost(j, k, i))
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, k
    bounds = [n]
    for j in range(stages - 1, 0, -1):
        bounds.append(cut[j][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[j], bounds[j + 1]) for j in range(stages)]


def hollow_to_stage(model: nn.Module, layers: range, *, first: bool, last: bool) -> nn.Module:
    """Remove in place everything stage ``layers`` does not own; returns the same model."""
    parts = decoder_parts(model)
    for i in range(len(parts.layers)):
        if i not in layers:
            parts.layers[i] = PassThrough()
    if not first:
        cfg = model.config
        for name in parts.embedding_names:
            if parts.family == "gpt2" and name == "wpe":
                setattr(parts.base, name, ZeroPositions(int(cfg.hidden_size), next(model.parameters()).dtype))
            else:
                setattr(parts.base, name, None)
        if parts.family == "gpt2":
            # Embedding dropout belongs to the first stage only.
            parts.base.drop = nn.Identity()
    if not last:
        setattr(parts.base, parts.norm_name, nn.Identity())
        setattr(model, parts.head_name, nn.Identity())
    model.kdistill_stage = (layers, first, last)
    return model


def pool_positions(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Per row, the position a decoder classifier scores: Hugging Face's rule, the rightmost token
    that is not ``pad_token_id`` (right or left padding alike; 0 for a row of padding only). Without
    a pad id only a single row is defined, and its last position is scored."""
    rows, length = input_ids.shape
    if pad_token_id is None:
        if rows != 1:
            raise ValueError("a sequence classifier without config.pad_token_id cannot score batches of more than 1")
        return torch.full((1,), length - 1, dtype=torch.int64, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    positions = torch.arange(length, device=input_ids.device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1).to(torch.int64)


@dataclass
class StageOutput:
    logits: torch.Tensor  # outgoing activation [b, L, H]; on the last stage [b, L, V] or [b, C]
    hidden_states: tuple[torch.Tensor, ...] | None


def run_stage_model(
    model: nn.Module,
    x: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pool: torch.Tensor | None = None,
    output_hidden_states: bool = False,
) -> StageOutput:
    """One forward of a hollowed stage (token ids into the first, activations into later ones).

    A causal LM runs its own ``forward``. A classifier runs its base model and, on the last stage,
    ``score`` at the positions ``pool`` (``pool_positions`` of the batch's token ids; the first
    stage computes them itself): the model's own ``forward`` would pool at the last position
    whenever it is given activations instead of ids."""
    _, first, last = model.kdistill_stage
    key = "input_ids" if first else "inputs_embeds"
    kwargs: dict[str, object] = {key: x, "attention_mask": attention_mask, "use_cache": False}
    if output_hidden_states:
        kwargs["output_hidden_states"] = True
    if not is_classifier(model):
        out = model(**kwargs)
        return StageOutput(out.logits, out.hidden_states)
    if last and pool is None:
        if not first:
            raise ValueError("the last stage of a split classifier needs the pooled positions of its batch")
        pool = pool_positions(x, model.config.pad_token_id)
    out = getattr(model, model.base_model_prefix)(**kwargs)
    if not last:
        return StageOutput(out.last_hidden_state, out.hidden_states)
    assert pool is not None
    scores = model.score(out.last_hidden_state)
    rows = torch.arange(scores.shape[0], device=scores.device)
    return StageOutput(scores[rows, pool.to(scores.device)], out.hidden_states)


def stage_forward(
    model: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor | None = None, pool: torch.Tensor | None = None
) -> torch.Tensor:
    """Run a hollowed stage: the outgoing activation, or the logits on the last stage (a
    classifier's [b, C] at the ``pool`` positions)."""
    return run_stage_model(model, x, attention_mask=attention_mask, pool=pool).logits


def unique_param_bytes(module: nn.Module) -> int:
    """Bytes of the distinct parameter tensors a module holds (a tied weight counts once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total
