"""Progressive quantization: reduced precision, then INT8 fake quantization (QAT), then real INT8.

The flow follows torchao 0.18 (pinned in pyproject: its QAT API moves fast):

1. ``prepare_qat``: ``QATConfig(activation_config=int8 per-token asymmetric, weight_config=int8
   per-channel symmetric, step="prepare")`` swaps each backbone ``nn.Linear`` for torchao's
   ``FakeQuantizedLinear``. The Parameter objects are kept, so an optimizer's state survives.
2. ``convert_qat_to_int8``: ``QATConfig(step="convert")`` strips the fake quantizers, then
   ``quantize_ptq_int8`` runs ``quantize_`` with ``Int8DynamicActivationInt8WeightConfig``
   (per-channel symmetric int8 weights, dynamic per-token int8 activations) — the same numbers the
   QAT phase simulated. ``ptq-int8`` is that last step alone.

Which modules are quantized: the linear layers of the backbone (``model.base_model``). The heads
(``lm_head``, ``classifier``, ``score``, ...) stay in full precision. The output layer is the most
quantization-sensitive one, and for causal LMs it is usually tied to the input embedding; quantizing
it would either untie it (an int8 copy next to the fp32 embedding) or force int8 embeddings. Keeping
it fp32 keeps the tie, so the matrix is stored once.

GPT2 implements its projections as ``transformers.pytorch_utils.Conv1D`` (``x @ W + b`` with W
stored [in, out]), which torchao's ``nn.Linear`` filter does not see. During QAT they are wrapped in
place by ``FakeQuantizedConv1D`` (same Parameters, torchao fake quantizers on ``W.T``); at INT8
conversion they become ``nn.Linear`` first.

Which INT8 kernel runs is decided by the machine that runs the model (``select_int8_kernel``, a table
per CPU feature set), because the artifact is stored backend-neutral (int8 weights + per-channel
scales in safetensors):

- ``torchao-dynamic``: torchao's ``Int8Tensor`` with dynamic per-token int8 activations
  (``torch._int_mm``). Chosen on CUDA with compute capability >= 8.0 (int8 tensor cores). On CPUs it
  is never the table's choice: on an AVX512-VNNI CPU a BERT student's batch-1 forward took 28.2 ms
  with it against 13.7 ms with ``fbgemm-dynamic`` and 12.2 ms with ``onednn-dynamic``, and on AVX2
  without VNNI ``torch._int_mm`` falls back to a reference loop ~40x slower than an fp32 GEMM.
- ``onednn-dynamic``: torch's dynamic quantized linear (``quantized::linear_dynamic``) with the
  weights packed for oneDNN's int8 GEMM: activations quantized dynamically per tensor to 7-bit range
  (``reduce_range``, which avoids int16 saturation without VNNI). The table's choice on CPUs with
  VNNI or AMX.
- ``fbgemm-dynamic``: the same dynamic int8 linear (same activation quantization, same numbers)
  packed for fbgemm's AVX2 int8 kernels (``vpmaddubsw``). The table's choice on x86 CPUs with AVX2
  and no VNNI. Which of the two is faster depends on the shapes too (on an AVX2 EPYC oneDNN for a
  BERT student, fbgemm for a GPT2 one), so the server measures them when it loads a model
  (``serving/kernel_choice.py``) and uses this table only without a measurement.
- ``weight-only``: anything else (older GPUs, ARM without these engines): int8 weights dequantized
  in the matmul (torchao ``Int8Tensor`` without activation quantization) — 4x smaller weights, no
  int8 arithmetic.

``KDISTILL_INT8_KERNEL`` overrides the choice (for benchmarks and comparisons).
"""

from __future__ import annotations

import contextlib
import os
import platform
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, cast, get_args

import torch
from torch import nn
from torch.nn import functional as F

Int8Kernel = Literal["torchao-dynamic", "fbgemm-dynamic", "onednn-dynamic", "weight-only"]
KERNEL_ENV = "KDISTILL_INT8_KERNEL"
# Kernels run by torch's ``quantized::linear_dynamic``, and the quantized engine that packs them.
DYNAMIC_ENGINES: dict[str, str] = {"fbgemm-dynamic": "fbgemm", "onednn-dynamic": "onednn"}
INT8_WEIGHT_SCHEME = "int8 symmetric per-output-channel"


# ---- phases ------------------------------------------------------------------------------------
def qat_phase_split(qat_steps: int, reduced_precision_fraction: float) -> tuple[int, int]:
    """(reduced-precision steps, fake-quant steps) of a QAT phase of ``qat_steps`` steps."""
    if qat_steps < 0:
        raise ValueError(f"qat_steps must be >= 0, got {qat_steps}")
    if not 0.0 <= reduced_precision_fraction <= 1.0:
        raise ValueError(f"reducedPrecisionFraction must be in [0, 1], got {reduced_precision_fraction}")
    reduced = min(qat_steps, round(qat_steps * reduced_precision_fraction))
    return reduced, qat_steps - reduced


def reduced_precision_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CPU and on GPUs that support it; fp16 on older GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def reduced_precision_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast for the first, reduced-precision part of the QAT phase. Master weights stay fp32.
    (fp16 on old GPUs would need a GradScaler; bf16 has fp32's range and needs none.)"""
    return torch.autocast(device_type=device.type, dtype=reduced_precision_dtype(device))


# ---- which modules ------------------------------------------------------------------------------
def _conv1d_class() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent: only nn.Linear models
        return None
    return cast(type[nn.Module], Conv1D)


def backbone_prefix(model: nn.Module) -> str:
    """The module path of the backbone ("" when the model is its own backbone)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return f"{prefix}."
    return ""


def is_quantizable(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """Filter for torchao's ``quantize_``: linear layers of the backbone, never the heads."""
    prefix = backbone_prefix(model)

    def keep(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and fqn.startswith(prefix)

    return keep


def _named_conv1d(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    conv1d = _conv1d_class()
    if conv1d is None:
        return
    prefix = backbone_prefix(model)
    for name, module in model.named_modules():
        if type(module) is conv1d and name.startswith(prefix):
            yield name, module


def _set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ---- QAT ----------------------------------------------------------------------------------------
def qat_configs() -> tuple[Any, Any]:
    """(activation, weight) fake-quantize configs: int8 per-token asymmetric / int8 per-channel."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel")
    return act, weight


def _conv1d_base() -> type[nn.Module]:
    conv1d = _conv1d_class()
    if conv1d is None:
        raise RuntimeError("transformers is required for GPT2-style Conv1D layers")
    return conv1d


class FakeQuantizedConv1D(nn.Module):
    """GPT2's Conv1D (``y = x @ W + b``, W [in, out]) with torchao fake quantizers.

    It holds the *same* Parameter objects as the Conv1D it wraps, under the same names (``weight``,
    ``bias``), so parameter paths and optimizer state are unchanged. Weights are fake-quantized per
    output channel, i.e. on ``W.T`` [out, in], exactly like an ``nn.Linear`` of the same layer.
    """

    def __init__(self, conv: nn.Module, act_config: Any, weight_config: Any) -> None:
        from torchao.quantization.qat import IntxFakeQuantizer

        super().__init__()
        self.nf = int(conv.nf)
        self.weight = conv.weight
        self.bias = conv.bias
        self.activation_fake_quantizer = IntxFakeQuantizer(act_config)
        self.weight_fake_quantizer = IntxFakeQuantizer(weight_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation_fake_quantizer(x)
        w = self.weight_fake_quantizer(self.weight.t())
        return F.linear(x, w, self.bias)

    def to_conv1d(self) -> nn.Module:
        conv = _conv1d_base()(self.nf, self.weight.shape[0])
        conv.weight = self.weight
        conv.bias = self.bias
        return conv


def prepare_qat(model: nn.Module) -> nn.Module:
    """Insert INT8 fake quantization into the backbone's linear layers, in place.

    Parameters keep their identity and names, so the optimizer may continue."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    act, weight = qat_configs()
    for name, conv in list(_named_conv1d(model)):
        _set_module(model, name, FakeQuantizedConv1D(conv, act, weight))
    quantize_(
        model, QATConfig(activation_config=act, weight_config=weight, step="prepare"), filter_fn=is_quantizable(model)
    )
    return model


def remap_optimizer_state(
    old_optimizer: torch.optim.Optimizer,
    old_order: list[str],
    new_optimizer: torch.optim.Optimizer,
    new_order: list[str],
) -> None:
    """Carry optimizer state across ``prepare_qat`` into ``new_optimizer``, by parameter name.

    Where the fake-quant wrappers hold new Parameter objects the optimizer is rebuilt over them;
    its state (Adam moments, step counts) is indexed by position, so each entry moves from its
    name's old position (``old_order``) to its new one (``new_order``). The learning rates stay
    those the schedule had reached."""
    old_state = old_optimizer.state_dict()
    index_of = {n: i for i, n in enumerate(old_order)}
    remapped: dict[str, Any] = {"param_groups": new_optimizer.state_dict()["param_groups"], "state": {}}
    for new_i, name in enumerate(new_order):
        old_i = index_of.get(name)
        if old_i is not None and old_i in old_state["state"]:
            remapped["state"][new_i] = old_state["state"][old_i]
    for group, old_group in zip(remapped["param_groups"], old_state["param_groups"], strict=True):
        group["lr"] = old_group["lr"]
        group["initial_lr"] = old_group.get("initial_lr", group.get("initial_lr"))
    new_optimizer.load_state_dict(remapped)


def strip_fake_quant(model: nn.Module) -> nn.Module:
    """Remove the fake quantizers (torchao's convert step), leaving the original float layers."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantizedConv1D):
            _set_module(model, name, module.to_conv1d())
    if any(isinstance(m, FakeQuantizedLinear) for m in model.modules()):
        quantize_(model, QATConfig(step="convert"))
    return model


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace the backbone's Conv1D layers by equivalent ``nn.Linear`` ones (W transposed)."""
    converted = []
    for name, conv in list(_named_conv1d(model)):
        in_features, out_features = conv.weight.shape
        linear = nn.Linear(
            in_features, out_features, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        _set_module(model, name, linear)
        converted.append(name)
    return converted


# ---- INT8 kernels -------------------------------------------------------------------------------
def cpu_int8_features() -> dict[str, Any]:
    """What the CPU offers for int8 GEMMs, and what torch was built with."""
    cpu = torch.cpu

    def flag(name: str) -> bool:
        return bool(getattr(cpu, name, lambda: False)())

    return {
        "machine": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx2": flag("_is_avx2_supported"),
        "avx512": flag("_is_avx512_supported"),
        "vnni": flag("_is_vnni_supported"),
        "amx": flag("_is_amx_tile_supported"),
        "quantized_engines": list(torch.backends.quantized.supported_engines),
        "threads": torch.get_num_threads(),
    }


def select_int8_kernel(device: torch.device | None = None) -> Int8Kernel:
    """The INT8 kernel for ``device`` on this machine (see the module docstring for why)."""
    forced = os.environ.get(KERNEL_ENV, "")
    if forced:
        if forced not in get_args(Int8Kernel):
            raise ValueError(f"{KERNEL_ENV}={forced!r}: expected one of {', '.join(get_args(Int8Kernel))}")
        engine = DYNAMIC_ENGINES.get(forced)
        if engine is not None and engine not in torch.backends.quantized.supported_engines:
            raise ValueError(
                f"{KERNEL_ENV}={forced!r}: this torch build has no {engine!r} quantized engine "
                f"(it has {', '.join(torch.backends.quantized.supported_engines)})"
            )
        return cast(Int8Kernel, forced)
    device = device or torch.device("cpu")
    if device.type == "cuda":
        return "torchao-dynamic" if torch.cuda.get_device_capability(device) >= (8, 0) else "weight-only"
    feats = cpu_int8_features()
    if (feats["amx"] or feats["vnni"]) and "onednn" in feats["quantized_engines"]:
        return "onednn-dynamic"
    if feats["avx2"] and "fbgemm" in feats["quantized_engines"]:
        return "fbgemm-dynamic"
    return "weight-only"


class Int8Linear(nn.Module):
    """A linear layer with int8 per-output-channel weights, run by the kernel chosen for the host.

    The state is backend-neutral (buffers ``weight_int8`` [out, in] int8, ``weight_scale`` [out]
    fp32, ``bias``), so safetensors stores it and any machine can pick its own kernel when loading.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, kernel: Int8Kernel) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.kernel: Int8Kernel = kernel
        # Larger inputs may run another kernel: (from this many rows, kernel), ascending. Which
        # kernel is fastest depends on the row count (serving/kernel_choice.py).
        self.bands: tuple[tuple[int, Int8Kernel], ...] = ()
        self._impls: dict[str, Any] = {}
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_int8(
        cls, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernel: Int8Kernel
    ) -> Int8Linear:
        out_features, in_features = qdata.shape
        layer = cls(in_features, out_features, bias is not None, kernel)
        layer.weight_int8.copy_(qdata)
        layer.weight_scale.copy_(scale.reshape(-1).float())
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    def extra_repr(self) -> str:
        bands = "".join(f", from {rows} rows {kernel}" for rows, kernel in self.bands)
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}{bands}"

    def kernel_for(self, rows: int) -> Int8Kernel:
        """The kernel that runs an input of ``rows`` rows."""
        kernel = self.kernel
        for start, band_kernel in self.bands:
            if rows >= start:
                kernel = band_kernel
        return kernel

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def _build(self, kernel: Int8Kernel) -> Any:
        if kernel in DYNAMIC_ENGINES:
            zero = torch.zeros(self.out_features, dtype=torch.int64)
            with warnings.catch_warnings():  # torch marks its quantized tensors as moving to torchao
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight_int8.cpu(), self.weight_scale.cpu().double(), zero, 0
                )
            # The engine at prepack time decides the packed format, and with it the GEMM that runs.
            with _quantized_engine(DYNAMIC_ENGINES[kernel]):
                return torch.ops.quantized.linear_prepack(qweight, None if self.bias is None else self.bias.cpu())
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

        act = None
        if kernel == "torchao-dynamic":
            act = QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC)
        return Int8Tensor(
            self.weight_int8, self.weight_scale[:, None], [1, self.in_features], torch.float32, act_quant_kwargs=act
        )

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._impls = {}  # new weights: rebuild the kernels' packed forms on the next call

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        self._impls = {}
        return cast(Int8Linear, super()._apply(fn, recurse))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel_for(x.numel() // self.in_features) if self.bands else self.kernel
        impl = self._impls.get(kernel)
        if impl is None:
            impl = self._impls[kernel] = self._build(kernel)
        if kernel in DYNAMIC_ENGINES:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).float().contiguous()
            y = torch.ops.quantized.linear_dynamic(x2, impl, True)  # reduce_range: no VNNI
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x.float(), impl, self.bias).to(x.dtype)


@contextlib.contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def set_int8_kernel(model: nn.Module, kernel: Int8Kernel, bands: tuple[tuple[int, Int8Kernel], ...] = ()) -> nn.Module:
    """Switch every Int8Linear of ``model`` to ``kernel`` (same weights), and to each of ``bands``'
    kernels from its row count on."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.kernel = kernel
            module.bands = bands
            module._impls = {}
    return model


def int8_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]


# ---- conversion ---------------------------------------------------------------------------------
def _torchao_int8_config() -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def quantize_ptq_int8(model: nn.Module, kernel: Int8Kernel | None = None) -> nn.Module:
    """Post-training INT8: torchao ``Int8DynamicActivationInt8WeightConfig`` on the backbone's linear
    layers (GPT2 Conv1D first turned into Linear), then each becomes an ``Int8Linear`` holding
    torchao's int8 weights and scales, run by ``kernel`` (default: ``select_int8_kernel``). In place."""
    from torchao.quantization import Int8Tensor, quantize_

    model.eval()
    device = next(model.parameters()).device
    kernel = kernel or select_int8_kernel(device)
    conv1d_to_linear(model)
    keep = is_quantizable(model)
    quantize_(model, _torchao_int8_config(), filter_fn=keep)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and isinstance(module.weight, Int8Tensor):
            weight = module.weight
            int8 = Int8Linear.from_int8(weight.qdata, weight.scale, module.bias, kernel).to(device)
            _set_module(model, name, int8)
    return model


def convert_qat_to_int8(model: nn.Module, kernel: Int8Kernel | None = None) -> nn.Module:
    """End of QAT: strip the fake quantizers (torchao convert step), then real INT8 as in PTQ."""
    return quantize_ptq_int8(strip_fake_quant(model), kernel)
