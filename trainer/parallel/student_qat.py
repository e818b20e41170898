"""INT8 fake quantization (QAT) of a student split by tensor and/or pipeline parallelism.

The unsplit student runs torchao's ``FakeQuantizedLinear`` (``quantization.prepare_qat``): the
input of each backbone Linear is fake-quantized per token (int8, asymmetric), its weight per
output channel (int8, symmetric). Both quantizers read only the minimum and maximum of each
token's features / each output channel's row, so a shard computes exactly the unsplit numbers
once it knows those extrema:

- **column-parallel** (q/k/v, gate/up: weight ``Shard(0)``): each rank holds whole rows of the
  weight and the whole (replicated) input, so both quantizers run locally, unchanged;
- **row-parallel** (o, down: weight ``Shard(1)``): each rank holds a slice of every row and of
  every token's features, so the per-token and per-row minimum and maximum are all-reduced over
  the tensor group (MIN/MAX: exact) before the scales are chosen; each rank then fake-quantizes
  its own slice with the whole layer's scales and zero points;
- **pipeline only**: a stage holds whole layers; the quantizers run locally (GPT2's Conv1D
  layers too, on ``W.T`` as ``quantization.FakeQuantizedConv1D`` does);
- **GPT2 under tensor parallelism** (``student.ShardedConv1D``, weight [in, out]): the same two
  cases on ``W.T``. A column shard (``c_attn`` cut per q/k/v, ``c_fc``) holds whole output
  channels and the whole input; a row shard (both ``c_proj``) holds a slice of every token's
  features and of every output channel, whose extrema are all-reduced.

Scales and zero points come from torchao's own functions (``choose_qparams_affine`` through
the same entry points ``IntxFakeQuantizer`` uses) applied to a ``[..., 2]`` tensor of the
extrema, and the fake quantization from torchao's ``_fake_quantize_per_token`` /
``_fake_quantize_per_channel_group`` (the same straight-through gradient), so every element is
quantized to the value the unsplit run gives it.

The layers keep their class's state (``weight``, ``bias``: the same Parameter objects), so the
optimizer, DDP and checkpoint keys are untouched; ``prepare_split_qat`` only switches their
``forward``. The tensor-parallel hooks ``parallelize_module`` installed stay in place: the
column-parallel forward returns its ``Shard(-1)`` output, the row-parallel one a ``Partial``
sum that the output hook all-reduces, as the stock layers do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ..quantization import is_quantizable, qat_configs
from .student import LLAMA_TP_PLAN, ShardedConv1D, from_tensor_region, to_tensor_region


def _extrema(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``[..., 2]``: the minimum and maximum over the last dimension, across ``group`` when the
    last dimension is sharded over it."""
    x = x.detach()
    low, high = x.amin(dim=-1), x.amax(dim=-1)
    if group is not None:
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    return torch.stack([low, high], dim=-1)


def fake_quant_activation(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """INT8 per-token asymmetric fake quantization of ``x`` (as torchao's activation quantizer),
    its features possibly sharded over ``group``."""
    from torchao.quantization.qat.fake_quantizer import _DTYPE_TO_QVALUE_BOUNDS
    from torchao.quantization.qat.utils import _fake_quantize_per_token
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine
    from torchao.quantization.utils import _get_per_token_block_size

    config, _ = qat_configs()
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[config.dtype]
    summary = _extrema(x, group)
    scale, zero_point = choose_qparams_affine(
        summary,
        mapping_type=MappingType.ASYMMETRIC,
        block_size=_get_per_token_block_size(summary),
        target_dtype=config.dtype,
        quant_min=qmin,
        quant_max=qmax,
        eps=config.eps,
        scale_dtype=config.scale_precision,
        zero_point_dtype=config.zero_point_precision,
    )
    return _fake_quantize_per_token(x, scale, zero_point, qmin, qmax)


def fake_quant_weight(w: torch.Tensor, group: Any = None) -> torch.Tensor:
    """INT8 per-output-channel symmetric fake quantization of ``w`` [out, in] (as torchao's weight
    quantizer), its input columns possibly sharded over ``group``."""
    from torchao.quantization.qat.fake_quantizer import _DTYPE_TO_BIT_WIDTH, _DTYPE_TO_QVALUE_BOUNDS
    from torchao.quantization.qat.utils import _fake_quantize_per_channel_group
    from torchao.quantization.utils import get_group_qparams_symmetric

    _, config = qat_configs()
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[config.dtype]
    scale, zero_point = get_group_qparams_symmetric(
        _extrema(w, group), _DTYPE_TO_BIT_WIDTH[config.dtype], 2, config.scale_precision, eps=config.eps
    )
    zero_point = zero_point.to(config.zero_point_precision)
    return _fake_quantize_per_channel_group(w, scale, zero_point, qmin, qmax, w.shape[-1], config.zero_point_domain)


class SplitFakeQuantLinear(nn.Linear):
    """A backbone Linear of the split student with INT8 fake quantization. ``tp_style`` is
    "colwise", "rowwise" (tensor-parallel shards) or None (a whole layer)."""

    tp_style: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_style is None:
            return F.linear(fake_quant_activation(x), fake_quant_weight(self.weight), self.bias)
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        weight = self.weight
        assert isinstance(weight, DTensor), "a tensor-parallel layer holds a DTensor weight"
        mesh = weight.device_mesh
        bias = self.bias
        if self.tp_style == "colwise":
            # The replicated input's gradient from this rank is one shard's share: Partial, which
            # the input hook's from_local all-reduces into the whole gradient.
            x_local = x.to_local(grad_placements=[Partial()]) if isinstance(x, DTensor) else x
            local_bias = bias.to_local() if isinstance(bias, DTensor) else bias
            y = F.linear(fake_quant_activation(x_local), fake_quant_weight(weight.to_local()), local_bias)
            return DTensor.from_local(y, mesh, [Shard(-1)], run_check=False)
        group = mesh.get_group()
        x_local = x.to_local() if isinstance(x, DTensor) else x
        y_local = F.linear(fake_quant_activation(x_local, group), fake_quant_weight(weight.to_local(), group))
        out = DTensor.from_local(y_local, mesh, [Partial()], run_check=False)
        if bias is not None:
            out = out.redistribute(mesh, [Replicate()]) + bias
        return out


_CONV1D_CLASS: dict[str, type[nn.Module]] = {}


def _fake_quant_conv1d_class() -> type[nn.Module]:
    """GPT2's Conv1D (``x @ W + b``, W [in, out]) with the fake quantizers of
    ``quantization.FakeQuantizedConv1D``: weights per output channel, on ``W.T``."""
    if "class" not in _CONV1D_CLASS:
        from transformers.pytorch_utils import Conv1D

        class SplitFakeQuantConv1D(Conv1D):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return F.linear(fake_quant_activation(x), fake_quant_weight(self.weight.t()), self.bias)

        _CONV1D_CLASS["class"] = SplitFakeQuantConv1D
    return _CONV1D_CLASS["class"]


class SplitFakeQuantShardedConv1D(ShardedConv1D):
    """A tensor-parallel shard of GPT2's Conv1D with INT8 fake quantization, weights per output
    channel on ``W.T`` as ``quantization.FakeQuantizedConv1D`` does for the whole layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.weight.shape[1])
        if self.kind == "column":
            x = to_tensor_region(x, self.group)
            rows = fake_quant_activation(x.reshape(-1, x.shape[-1]))
            return F.linear(rows, fake_quant_weight(self.weight.t()), self.bias).view(shape)
        rows = fake_quant_activation(x.reshape(-1, x.shape[-1]), self.group)
        partial = F.linear(rows, fake_quant_weight(self.weight.t(), self.group))
        return (from_tensor_region(partial, self.group) + self.bias).view(shape)


def prepare_split_qat(model: nn.Module, tensor_parallel: bool) -> list[str]:
    """Switch the (hollowed, possibly TP-sharded) student's backbone Linear layers (and GPT2's
    Conv1D ones, whole or sharded) to their fake-quantized forms in place: the layers torchao's QAT swaps in the
    unsplit student (``quantization.prepare_qat``). Returns their names."""
    from ..quantization import _named_conv1d

    names = []
    for name, _ in list(_named_conv1d(model)):
        if tensor_parallel:
            raise ValueError(f"{name}: a whole Conv1D layer in a tensor-parallel student (it should be sharded)")
        module = model.get_submodule(name)
        module.__class__ = _fake_quant_conv1d_class()
        names.append(name)
    keep = is_quantizable(model)
    for name, module in model.named_modules():
        if type(module) is ShardedConv1D:  # only in GPT2 blocks under tensor parallelism
            module.__class__ = SplitFakeQuantShardedConv1D
            names.append(name)
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not keep(module, name):
            continue
        style = None
        if tensor_parallel:
            style = next((s for suffix, s in LLAMA_TP_PLAN.items() if name.endswith(f".{suffix}")), None)
            if style is None:
                raise ValueError(f"{name}: a Linear layer outside the tensor-parallel plan cannot be fake-quantized")
        module.__class__ = SplitFakeQuantLinear
        module.tp_style = style
        names.append(name)
    return names
