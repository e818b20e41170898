"""Training state as a sharded DCP checkpoint: each process writes and reads only what it holds.

A process describes its tensors as ``Held`` entries: a key in the checkpoint (``student/NAME``
with the unsplit student's parameter name, ``aux/NAME``), the live tensor, the whole tensor's
shape and how the live one covers it (``Shard``: a tensor-parallel slice of each of its
concatenated sections, ``shard_piece``'s layout; None: the whole tensor). Each entry travels to
DCP as a plain local tensor carrying DCP's ``CheckpointableTensor`` fields (global shape, and a
global and a local offset per section), so DCP's planner knows which chunk of which tensor every
rank holds, deduplicates replicated chunks (data-parallel copies, aux modules) to one writer, and
on load computes which saved chunks overlap each rank's piece: any layout reads any other.

The optimizer state of a parameter goes under ``optim/KEY/STATE`` (AdamW's ``exp_avg`` and
``exp_avg_sq`` sharded like the parameter, ``step`` whole). Hyperparameters of the param groups
are not tensors: ``param_groups`` / ``apply_param_groups`` keep them as JSON (``optimizer.json``).
The files are written by ``dcp_storage``, which never unpickles on load.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from .dcp_storage import SafetensorsStorageReader, SafetensorsStorageWriter, read_metadata

OPTIM = "optim/"


@dataclass(frozen=True)
class Shard:
    """The live tensor holds slice ``rank`` of ``size`` (``torch.chunk``) of each of the
    ``sections`` equal sections of the whole tensor along ``dim``, concatenated."""

    dim: int
    sections: int
    size: int
    rank: int


@dataclass(frozen=True)
class Held:
    key: str
    tensor: torch.Tensor  # the live parameter or buffer (a DTensor's local shard is used)
    shape: tuple[int, ...]  # the whole tensor's
    shard: Shard | None = None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    # DCP warns whenever no process group exists, even when asked for no_dist.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextlib.contextmanager
def _unwrapped() -> Iterator[None]:
    """DCP reports any rank's failure as a ``CheckpointException`` (a BaseException, which no
    ``except Exception`` sees): raise the first rank's own exception instead, so that a lost peer
    is classified as one (``peer_guard``) and a checkpoint that does not fit as that."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        causes = [failure[0] for _, failure in sorted(exc.failures.items())]
        cause = next((c for c in causes if isinstance(c, Exception)), None)
        if cause is None:
            raise RuntimeError(str(exc)) from None
        raise cause from None


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach()


def checkpointable(local: torch.Tensor, shape: tuple[int, ...], shard: Shard | None) -> torch.Tensor:
    """A new tensor object sharing ``local``'s storage, annotated with where it lies in the
    whole tensor of ``shape`` (DCP's ``CheckpointableTensor`` fields)."""
    t = local.detach()
    if shard is None or shard.size == 1:
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor of shape {tuple(t.shape)} held whole, but the checkpoint's is {tuple(shape)}")
        return t
    section = shape[shard.dim] // shard.sections
    pieces = torch.arange(section).chunk(shard.size)
    start, n = (int(pieces[shard.rank][0]), len(pieces[shard.rank])) if shard.rank < len(pieces) else (section, 0)
    if t.shape[shard.dim] != n * shard.sections:
        raise ValueError(f"shard of shape {tuple(t.shape)} does not match {shard} of {tuple(shape)}")
    sizes = tuple(n if d == shard.dim else s for d, s in enumerate(t.shape))
    starts = [s * section + start for s in range(shard.sections)]
    t.global_shape = tuple(shape)
    t.global_offsets = tuple(_at(len(shape), shard.dim, g) for g in starts)
    t.local_offsets = tuple(_at(len(shape), shard.dim, s * n) for s in range(shard.sections))
    t.local_sizes = (sizes,) * shard.sections
    return t


def _at(ndim: int, dim: int, offset: int) -> tuple[int, ...]:
    return tuple(offset if d == dim else 0 for d in range(ndim))


# ---- save ------------------------------------------------------------------------------------
def state_dict(held: Iterable[Held], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The DCP state dict of ``held`` and their optimizer state."""
    out: dict[str, torch.Tensor] = {}
    for h in held:
        local = _local(h.tensor)
        out[h.key] = checkpointable(local, h.shape, h.shard)
        for name, value in optimizer.state.get(h.tensor, {}).items():
            key = f"{OPTIM}{h.key}/{name}"
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"optimizer state {key} is a {type(value).__name__}, not a tensor")
            moment = _local(value)
            out[key] = checkpointable(moment, h.shape, h.shard) if moment.shape == local.shape else moment
    return out


def save(path: Path, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Collective (every rank of the default group, or this process alone without one): write
    ``state`` into ``path`` (which exists). Returns the data files' sha256 on the coordinator
    (rank 0), {} elsewhere."""
    writer = SafetensorsStorageWriter(path)
    with _one_process_is_intended(), _unwrapped():
        dcp.save(state, storage_writer=writer, planner=DefaultSavePlanner(), no_dist=not _distributed())
    return writer.digests


def param_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The param groups' hyperparameters (everything but the parameters), JSON-ready."""
    groups = []
    for group in optimizer.param_groups:
        hyper = {}
        for key, value in group.items():
            if key == "params":
                continue
            if not isinstance(value, int | float | bool | str | tuple | list | type(None)):
                raise ValueError(f"optimizer setting {key}={value!r} cannot be kept in JSON")
            hyper[key] = list(value) if isinstance(value, tuple) else value
        groups.append(hyper)
    return groups


# ---- load ------------------------------------------------------------------------------------
def check_keys(md: Metadata, prefix: str, expected: set[str]) -> None:
    """The checkpoint holds exactly the ``expected`` names under ``prefix``, else ValueError."""
    saved = {k[len(prefix) :] for k in md.state_dict_metadata if k.startswith(prefix)}
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise ValueError(f"{prefix}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _size(md: Metadata, key: str) -> tuple[int, ...]:
    entry = md.state_dict_metadata[key]
    assert isinstance(entry, TensorStorageMetadata)
    return tuple(entry.size)


def _moment_targets(md: Metadata, h: Held) -> dict[str, torch.Tensor]:
    """Empty tensors for the optimizer state the checkpoint holds for ``h``."""
    prefix = f"{OPTIM}{h.key}/"
    out = {}
    for key in md.state_dict_metadata:
        if not key.startswith(prefix) or "/" in key[len(prefix) :]:
            continue
        size, local = _size(md, key), _local(h.tensor)
        if size == tuple(h.shape) and size:
            out[key] = checkpointable(torch.zeros_like(local), h.shape, h.shard)
        elif not size:
            out[key] = torch.zeros((), dtype=md.state_dict_metadata[key].properties.dtype)
        else:
            raise ValueError(f"{key} has shape {size}, its parameter {tuple(h.shape)}")
    return out


def _as_state(like: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An optimizer-state tensor in the form of the parameter: a DTensor for a DTensor."""
    from torch.distributed.tensor import DTensor

    if value.dim() == 0:
        return value.float()
    value = value.to(device=_local(like).device)
    if isinstance(like, DTensor):
        return DTensor.from_local(value, like.device_mesh, like.placements, run_check=False)
    return value


def load(
    path: Path, held: list[Held], optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor] | None = None
) -> Metadata:
    """Collective: read this process's part of every ``held`` tensor into it (in place), their
    optimizer state into ``optimizer``, and ``extra`` (key -> target of the saved size). The
    caller checked which keys the checkpoint must hold (``check_keys``); shapes are checked here."""
    md = read_metadata(path)
    targets: dict[str, torch.Tensor] = dict(extra or {})
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for i, h in enumerate(held):
        if h.key not in md.state_dict_metadata:
            raise ValueError(f"checkpoint has no {h.key}")
        if _size(md, h.key) != tuple(h.shape):
            raise ValueError(f"{h.key} has shape {_size(md, h.key)} in the checkpoint, {tuple(h.shape)} here")
        targets[h.key] = checkpointable(_local(h.tensor), h.shape, h.shard)
        moments[i] = _moment_targets(md, h)
        targets.update(moments[i])
    with torch.no_grad():
        reader = SafetensorsStorageReader(path)
        with _one_process_is_intended(), _unwrapped():
            dcp.load(targets, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=not _distributed())
    for i, found in moments.items():
        if found:
            h = held[i]
            prefix = f"{OPTIM}{h.key}/"
            optimizer.state[h.tensor] = {k[len(prefix) :]: _as_state(h.tensor, v) for k, v in found.items()}
    return md


def apply_param_groups(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Set the saved hyperparameters (``param_groups``) on the optimizer's groups."""
    if not isinstance(saved, list) or len(saved) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's param groups {saved!r:.200} do not fit {len(optimizer.param_groups)} groups"
        )
    for group, hyper in zip(optimizer.param_groups, saved, strict=True):
        if not isinstance(hyper, dict):
            raise ValueError(f"optimizer param group settings: expected an object, got {hyper!r}")
        for key, value in hyper.items():
            group[key] = tuple(value) if isinstance(value, list) else value


def module_held(prefix: str, module: nn.Module) -> list[Held]:
    """A replicated module's parameters and buffers, whole (the aux modules)."""
    return [Held(f"{prefix}{n}", t, tuple(t.shape)) for n, t in module.state_dict(keep_vars=True).items()]
