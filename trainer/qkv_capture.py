"""Capture the outputs of the attention's query/key/value projections with forward hooks.

``with QKVCapture(model, layers) as cap: model(**batch)`` leaves ``cap.qkv[layer] = (q, k, v)``,
each [B, L, width] straight from the projection (before the split into heads, before RoPE for
Llama-family models). Hooks are removed on exit, so the model is unchanged afterwards.

Architectures are recognised by structure, not by name, so relatives that share a layout work:
- GPT-2: ``transformer.h[i].attn.c_attn`` (one fused projection, split into thirds);
- Llama, Qwen2, Mistral and others: ``model.layers[i].self_attn.{q,k,v}_proj``
  (with grouped-query attention k and v are narrower than q);
- BERT, RoBERTa: ``{bert,roberta}.encoder.layer[i].attention.self.{query,key,value}``;
- DistilBERT: ``distilbert.transformer.layer[i].attention.{q,k,v}_lin``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

# Candidate paths of the list of transformer blocks, from the model root.
_LAYER_LISTS = (
    "transformer.h",
    "h",
    "model.layers",
    "layers",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "encoder.layer",
    "distilbert.transformer.layer",
    "transformer.layer",
)
# Separate q/k/v projections inside one block.
_SEPARATE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("attention.self.query", "attention.self.key", "attention.self.value"),
    ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
)
# A fused projection whose output is [q | k | v] along the last dim.
_FUSED = ("attn.c_attn",)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks; ValueError naming the class if none is known."""
    # A DistributedDataParallel (or similar) wrapper keeps the model under ``module``.
    for path in (*_LAYER_LISTS, *(f"module.{p}" for p in _LAYER_LISTS)):
        found = _get(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    raise ValueError(
        f"QKVCapture does not know the architecture {type(model).__name__}: supported are GPT-2, "
        "Llama-family (q_proj/k_proj/v_proj), BERT/RoBERTa and DistilBERT"
    )


class QKVCapture:
    """Context manager that records q/k/v projection outputs of the given layers."""

    def __init__(self, model: nn.Module, layers: list[int]) -> None:
        self.model = model
        self.layers = [int(i) for i in layers]
        self.qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._handles: list[RemovableHandle] = []
        blocks = find_layers(model) if self.layers else None
        self._targets: list[tuple[int, nn.Module | tuple[nn.Module, nn.Module, nn.Module]]] = []
        for layer in self.layers:
            assert blocks is not None
            if not 0 <= layer < len(blocks):
                raise ValueError(
                    f"layer {layer} is out of range: {type(model).__name__} has {len(blocks)} transformer layers"
                )
            self._targets.append((layer, self._projections(blocks[layer])))

    def _projections(self, block: nn.Module) -> nn.Module | tuple[nn.Module, nn.Module, nn.Module]:
        for q, k, v in _SEPARATE:
            mods = (_get(block, q), _get(block, k), _get(block, v))
            if all(m is not None for m in mods):
                return mods
        for path in _FUSED:
            fused = _get(block, path)
            if fused is not None:
                return fused
        raise ValueError(
            f"QKVCapture found no q/k/v projections in {type(block).__name__} of {type(self.model).__name__}"
        )

    def _separate_hook(self, layer: int, slot: int) -> Callable[..., None]:
        def hook(_mod: nn.Module, _inp: Any, out: Tensor) -> None:
            parts = list(self.qkv.get(layer, (out, out, out)))
            parts[slot] = out
            self.qkv[layer] = (parts[0], parts[1], parts[2])

        return hook

    def _fused_hook(self, layer: int) -> Callable[..., None]:
        def hook(_mod: nn.Module, _inp: Any, out: Tensor) -> None:
            width = out.shape[-1]
            if width % 3:
                raise ValueError(f"fused qkv projection of layer {layer} has width {width}, not divisible by 3")
            q, k, v = out.split(width // 3, dim=-1)
            self.qkv[layer] = (q, k, v)

        return hook

    def __enter__(self) -> QKVCapture:
        self.qkv = {}
        for layer, target in self._targets:
            if isinstance(target, tuple):
                for slot, mod in enumerate(target):
                    self._handles.append(mod.register_forward_hook(self._separate_hook(layer, slot)))
            else:
                self._handles.append(target.register_forward_hook(self._fused_hook(layer)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
