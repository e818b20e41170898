"""A ``torch.distributed.checkpoint`` (DCP) storage pair that never unpickles: tensors in
safetensors files, DCP's metadata as JSON.

DCP's own ``FileSystemReader`` loads its ``.metadata`` file with ``pickle.load`` (and the tensors
with ``torch.load``), so reading a checkpoint would execute whatever that file holds. The
installed torch also ships a HuggingFace/safetensors storage (``HuggingFaceStorageWriter``), but
it targets consolidated Hugging Face weights: it keeps its chunk layout in safetensors headers of
its own making and has no place for the per-rank shards of a student split by tensor and
pipeline parallelism. This pair is small and keeps the whole format in view:

- ``SafetensorsStorageWriter``: each rank writes one ``shard-RRRRR.safetensors`` holding the
  chunks DCP's planner gave it (replicated values appear in one rank's plan only: DCP
  deduplicates them across ranks), fsyncs it and reports its sha256; the coordinator writes
  ``dcp.json``: every tensor's dtype, global size and chunks, each chunk with its file and key.
- ``SafetensorsStorageReader``: parses ``dcp.json`` into DCP's ``Metadata`` (validating every
  field) and reads only the slices the load plan asks for (``safe_open(...).get_slice``), so a
  rank reads its own shard of each tensor, whatever layout wrote it.

Only tensors are stored: a non-tensor value in the state dict is refused (the caller keeps those
in JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch.distributed.checkpoint import StorageReader, StorageWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .fsio import write_text_atomic

METADATA = "dcp.json"
FORMAT = "kdistill-dcp-safetensors/1"
_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}


@dataclass(frozen=True)
class StoredChunk:
    """Where one chunk lives: a safetensors file of the checkpoint and the key inside it."""

    file: str
    key: str
    sha256: str = ""  # of the whole file; set by the writer, not stored in dcp.json


def shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def _chunk_key(index: MetadataIndex) -> str:
    offsets = ",".join(str(o) for o in index.offset or ())
    return f"{index.fqn}@{offsets}"


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with storage of its own (safetensors refuses shared storage)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class SafetensorsStorageWriter(StorageWriter):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.digests: dict[str, str] = {}  # file -> sha256, on the coordinator after finish

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [replace(plan, storage_data=shard_file(i)) for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name: str = plan.storage_data
        tensors: dict[str, torch.Tensor] = {}
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise ValueError(f"sharded checkpoint: {item.index.fqn} is not a tensor (keep it in JSON)")
            tensors[_chunk_key(item.index)] = _owned(planner.resolve_data(item))
        results = []
        if tensors:
            data = safetensors_bytes(tensors)
            _write_synced(self.path / name, data)
            digest = hashlib.sha256(data).hexdigest()
            for item in plan.items:
                t = tensors[_chunk_key(item.index)]
                stored = StoredChunk(name, _chunk_key(item.index), digest)
                results.append(
                    WriteResult(index=item.index, size_in_bytes=t.numel() * t.element_size(), storage_data=stored)
                )
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        stored = {r.index: r.storage_data for rank in results for r in rank}
        self.digests = {s.file: s.sha256 for s in stored.values()}
        write_text_atomic(self.path / METADATA, json.dumps(metadata_json(metadata, stored), indent=1))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return Path(checkpoint_id).is_dir()


def metadata_json(metadata: Metadata, stored: dict[MetadataIndex, StoredChunk]) -> dict[str, Any]:
    """DCP's metadata as plain JSON: per tensor its dtype, size and chunks with their places."""
    tensors: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"sharded checkpoint: {fqn} is not a tensor")
        chunks = []
        for chunk in md.chunks:
            place = stored[MetadataIndex(fqn, chunk.offsets)]
            chunks.append(
                {"offsets": list(chunk.offsets), "sizes": list(chunk.sizes), "file": place.file, "key": place.key}
            )
        dtype = str(md.properties.dtype).removeprefix("torch.")
        tensors[fqn] = {"dtype": dtype, "size": list(md.size), "chunks": chunks}
    return {"format": FORMAT, "tensors": tensors}


def _ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ValueError(f"{what}: expected a list of non-negative integers, got {value!r}")
    return value


def _plain_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or "/" in value or value.startswith("."):
        raise ValueError(f"{what}: expected a file name inside the checkpoint, got {value!r}")
    return value


def parse_metadata(doc: Any) -> tuple[Metadata, dict[MetadataIndex, StoredChunk]]:
    """``dcp.json`` back into DCP's metadata and the chunk places; ValueError on anything odd."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("tensors"), dict):
        raise ValueError(f"{METADATA}: not a {FORMAT} document")
    state: dict[str, Any] = {}
    stored: dict[MetadataIndex, StoredChunk] = {}
    for fqn, md in doc["tensors"].items():
        what = f"{METADATA} {fqn}"
        if not isinstance(md, dict) or md.get("dtype") not in _DTYPES or not isinstance(md.get("chunks"), list):
            raise ValueError(f"{what}: expected dtype (one of {sorted(_DTYPES)}), size and chunks")
        size = _ints(md.get("size"), f"{what} size")
        chunks = []
        for c in md["chunks"]:
            if not isinstance(c, dict) or not isinstance(c.get("key"), str):
                raise ValueError(f"{what}: a chunk without offsets, sizes, file and key")
            offsets, sizes = _ints(c.get("offsets"), f"{what} offsets"), _ints(c.get("sizes"), f"{what} sizes")
            if len(offsets) != len(size) or len(sizes) != len(size):
                raise ValueError(f"{what}: chunk rank differs from the tensor's {len(size)} dimensions")
            if any(o + s > n for o, s, n in zip(offsets, sizes, size, strict=True)):
                raise ValueError(f"{what}: chunk at {offsets} of {sizes} lies outside {size}")
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            stored[MetadataIndex(fqn, offsets)] = StoredChunk(_plain_name(c.get("file"), f"{what} file"), c["key"])
        props = TensorProperties(dtype=_DTYPES[md["dtype"]])
        state[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(size), chunks=chunks)
    return Metadata(state_dict_metadata=state, storage_data=stored), stored


def read_metadata(path: Path) -> Metadata:
    """The checkpoint's DCP metadata (``dcp.json``), validated."""
    try:
        doc = json.loads((Path(path) / METADATA).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable {METADATA} in {path}: {exc}") from None
    return parse_metadata(doc)[0]


class SafetensorsStorageReader(StorageReader):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.stored: dict[MetadataIndex, StoredChunk] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return read_metadata(self.path)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.stored = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise ValueError(f"sharded checkpoint: {item.storage_index.fqn} is not a tensor")
            by_file.setdefault(self.stored[item.storage_index].file, []).append(item)
        for name, items in by_file.items():
            with safe_open(str(self.path / name), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for item in items:
                    key = self.stored[item.storage_index].key
                    if key not in keys:
                        raise ValueError(f"{name}: chunk {key} is missing")
                    piece = _read_slice(f, key, item.storage_offsets, item.lengths)
                    target = planner.resolve_tensor(item).detach()
                    if target.shape != piece.shape:
                        raise ValueError(
                            f"{name} {item.storage_index.fqn}: read {tuple(piece.shape)}, "
                            f"expected {tuple(target.shape)}"
                        )
                    target.copy_(piece)
                    planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return (Path(checkpoint_id) / METADATA).is_file()


def _read_slice(f: Any, key: str, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """Only the requested region of one stored chunk (safetensors reads just those bytes)."""
    if not lengths:
        return f.get_tensor(key)
    return f.get_slice(key)[tuple(slice(o, o + n) for o, n in zip(offsets, lengths, strict=True))]
