"""A split student built without any rank holding it whole.

The student is created from its config with every parameter on the meta device (shapes only;
buffers such as rotary ``inv_freq`` or position ids are computed for real when the modules are
built, since they depend on the config alone), cut into its pipeline stage and sharded over the
tensor group there, and only then materialized: each remaining parameter is allocated at its
local shape and filled with exactly its slice of the model's safetensors files
(``safe_open(...).get_slice``). A rank never reads, let alone allocates, a tensor of a block it
does not own, nor the whole of a tensor-parallel parameter.

``WeightSource`` says where each of the student's tensors lives on disk: the student's own
folder (``student.model``), or the teacher's folder with student block ``i`` read from teacher
block ``kept[i]`` (``student.fromTeacher`` that copies layers).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.api.failures import ExitCode

from ..errors import TrainerError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# How a local parameter is cut from its full tensor: (dimension, sections, group size, rank), or
# None for a replicated parameter (read whole). ``sections`` > 1 is GPT2's fused q/k/v.
Cut = tuple[int, int, int, int] | None


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers stay real.

    The parameter's first (CPU) tensor comes from ``torch.empty`` and is dropped untouched;
    initialisers that run afterwards (``reset_parameters``, the library's ``_init_weights``)
    see meta tensors and cost nothing."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        value = module._parameters.get(name)
        if value is not None and not value.is_meta:
            module._parameters[name] = type(value)(value.to("meta"), requires_grad=value.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def is_meta_model(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _file_keys(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file."""
    from safetensors import safe_open

    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"{index} is not a safetensors index: {exc}") from None
        return {str(k): folder / str(v) for k, v in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"{folder} holds no safetensors weights ({SINGLE_FILE})")
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


@dataclass(frozen=True)
class WeightSource:
    """Where the student's tensors are: file per tensor name, and the student-name -> file-name
    map (identity for the student's own folder; block renumbering for teacher layers)."""

    folder: Path
    files: dict[str, Path]
    layer_map: tuple[int, ...] = ()  # student block i reads teacher block layer_map[i]
    prefix: str = ""  # the model's base prefix, which older checkpoints leave out of their keys

    @classmethod
    def of(cls, folder: Path, *, layer_map: list[int] | None = None, prefix: str = "") -> WeightSource:
        return cls(folder, _file_keys(folder), tuple(layer_map or ()), prefix)

    def key(self, name: str) -> str | None:
        """The file's name for the student's tensor ``name`` (None: not in the files)."""
        if self.layer_map:
            from ..models import LAYER_KEY

            m = LAYER_KEY.match(name)
            if m:
                name = f"{m['prefix']}.{self.layer_map[int(m['index'])]}.{m['rest']}"
        if name in self.files:
            return name
        bare = name.removeprefix(self.prefix + ".") if self.prefix else name
        return bare if bare in self.files else None


def _span(length: int, size: int, rank: int) -> tuple[int, int]:
    """``torch.chunk``'s piece ``rank`` of ``length`` elements in ``size`` chunks."""
    step = -(-length // size)
    start = min(rank * step, length)
    return start, min(start + step, length)


@dataclass
class SliceReader:
    """Reads pieces of tensors from a ``WeightSource``; ``reads`` records (file key, shape read)
    of every read, which the tests use to show that no rank reads a whole sharded tensor."""

    source: WeightSource
    reads: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    _stack: ExitStack = field(default_factory=ExitStack)
    _open: dict[Path, Any] = field(default_factory=dict)

    def _handle(self, path: Path) -> Any:
        from safetensors import safe_open

        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def read(self, key: str, cut: Cut) -> torch.Tensor:
        """Tensor ``key`` whole (``cut`` None) or this rank's piece of each of its sections."""
        part = self._handle(self.source.files[key]).get_slice(key)
        shape = list(part.get_shape())
        if cut is None:
            value = part[tuple(slice(None) for _ in shape)] if shape else part[...]
        else:
            dim, sections, size, rank = cut
            if shape[dim] % sections:
                raise TrainerError(
                    ExitCode.BAD_SPEC, f"{key}: dimension {dim} ({shape[dim]}) does not split into {sections} sections"
                )
            width = shape[dim] // sections
            start, stop = _span(width, size, rank)
            pieces = []
            for s in range(sections):
                index = [slice(None)] * len(shape)
                index[dim] = slice(s * width + start, s * width + stop)
                pieces.append(part[tuple(index)])
            value = torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]
        self.reads.append((key, tuple(value.shape)))
        return value

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


def _dtensor_cut(p: Any) -> Cut:
    from torch.distributed.tensor import Shard

    dims = [pl.dim for pl in p.placements if isinstance(pl, Shard)]
    if not dims:
        return None
    mesh = p.device_mesh
    return dims[0], 1, mesh.size(), mesh.get_local_rank()


def materialize(
    model: nn.Module,
    reader: SliceReader,
    *,
    device: torch.device,
    plain_cut: Callable[[str], Cut],
    aliases: dict[str, str],
) -> None:
    """Give every meta parameter of ``model`` (cut and sharded already) its own slice of the
    weights, on ``device``, and move the buffers there. ``plain_cut`` says how a plain (not
    DTensor) parameter is sharded; ``aliases`` maps a tied copy's name to its partner's (a
    tied checkpoint stores one of the two)."""
    from torch.distributed.tensor import DTensor

    made: dict[int, nn.Parameter] = {}  # tied parameters stay one object
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) in made:
                module._parameters[attr] = made[id(p)]
                continue
            local = p.to_local() if isinstance(p, DTensor) else p
            if not local.is_meta:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            key = reader.source.key(name) or reader.source.key(aliases.get(name, name))
            if key is None:
                raise TrainerError(
                    ExitCode.MODEL_NOT_FOUND, f"{reader.source.folder} holds no weights for the student's {name}"
                )
            cut = _dtensor_cut(p) if isinstance(p, DTensor) else plain_cut(name)
            value = reader.read(key, cut)
            if tuple(value.shape) != tuple(local.shape):
                raise TrainerError(
                    ExitCode.MODEL_NOT_FOUND,
                    f"{key} in {reader.source.folder}: read {tuple(value.shape)}, the student's piece is "
                    f"{tuple(local.shape)}",
                )
            value = value.to(device=device, dtype=local.dtype).contiguous()
            if isinstance(p, DTensor):
                value = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False)
            new = nn.Parameter(value, requires_grad=p.requires_grad)
            made[id(p)] = new
            module._parameters[attr] = new
    for module in model.modules():
        for attr, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                module._buffers[attr] = b.to(device)


def build_on_meta(config: Any, task: str, trust_remote_code: bool = False, cls: Any = None) -> nn.Module:
    """The student's architecture from ``config`` (as ``cls`` when given), parameters on the meta
    device, float32."""
    from ..models import auto_model_class

    with params_on_meta():
        if cls is not None:
            return cls._from_config(config, dtype=torch.float32)
        return auto_model_class(task).from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)


def empty_params(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Uninitialised real parameters in place of meta ones (tied ones stay tied), for a caller
    that fills every one of them (the gathered checkpoint's template)."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad)
            module._parameters[attr] = made[id(p)]
    return model


def meta_qkv_dims(model: nn.Module) -> tuple[int, int, int]:
    """The q/k/v widths of block 0 of a meta-device student: its projections run on a meta
    input (shapes only), where a whole forward cannot (masks read values)."""
    from ..qkv_capture import QKVCapture

    cap = QKVCapture(model, [0])
    target = cap._targets[0][1]
    x = torch.empty(1, 1, int(model.config.hidden_size), device="meta")
    with cap:
        for module in target if isinstance(target, tuple) else (target,):
            module(x)
    q, k, v = cap.qkv[0]
    return int(q.shape[-1]), int(k.shape[-1]), int(v.shape[-1])


class StudentMaterializer:
    """``parallelize_student``'s ``materialize`` for one rank: reads its slices of ``source`` into
    the cut, sharded meta-device student; ``reads`` keeps what it read."""

    def __init__(
        self, source: WeightSource, *, device: torch.device, tensor: int, tensor_rank: int, aliases: dict[str, str]
    ) -> None:
        self.source, self.device = source, device
        self.tensor, self.tensor_rank = tensor, tensor_rank
        self.aliases = aliases
        self.reads: list[tuple[str, tuple[int, ...]]] = []

    def plain_cut(self, name: str) -> Cut:
        """GPT2's Conv1D shards are plain tensors: cut as ``student.tp_shard_of`` says."""
        from .student import tp_shard_of

        shard = tp_shard_of(name) if self.tensor > 1 else None
        return None if shard is None else (shard[0], shard[1], self.tensor, self.tensor_rank)

    def __call__(self, model: nn.Module) -> None:
        reader = SliceReader(self.source)
        try:
            materialize(model, reader, device=self.device, plain_cut=self.plain_cut, aliases=self.aliases)
        finally:
            reader.close()
        self.reads = reader.reads
