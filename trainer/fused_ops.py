"""Swap Python-composed activations for the fused kernels that compute the same function.

GPT-2 style models (``activation_function: gelu_new``) evaluate the tanh approximation of GELU as
six separate tensor ops (pow, mul, add, mul, tanh, mul) and autograd saves intermediates for each.
On CPU that is ~15% of a small model's step. ``F.gelu(x, approximate="tanh")`` is one fused
kernel for the same formula; results differ only by float rounding (~1e-7 relative), which
transformers itself documents (``GELUTanh``: "equivalent to NewGELU and FastGELU but much
faster"). The swap holds no parameters, so checkpoints, ``save_pretrained`` and the model's
config are unchanged: a saved student still loads with its original activation class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# transformers' Python-composed tanh-GELUs: NewGELUActivation (gelu_new) and
# FastGELUActivation (gelu_fast) are both 0.5·x·(1 + tanh(sqrt(2/pi)·(x + 0.044715·x³))).
_TANH_GELU_CLASSES = ("NewGELUActivation", "FastGELUActivation")


class FusedTanhGELU(nn.Module):
    """GELU, tanh approximation, as one fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def _is_composed_tanh_gelu(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ in _TANH_GELU_CLASSES and cls.__module__.startswith("transformers.")


def fuse_activations(model: nn.Module) -> int:
    """Replace every composed tanh-GELU submodule of ``model`` in place; returns how many."""
    targets = [(name, child) for name, child in model.named_modules() if _is_composed_tanh_gelu(child)]
    for name, _ in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FusedTanhGELU())
    return len(targets)
