"""The final split student written as a standard Hugging Face folder, streaming.

``stream_student`` is collective: pipeline stage by stage, every rank of the stage turns its
parameters into full tensors one at a time (tensor-parallel pieces all-gathered over the tensor
group, ``student_state._full``), and the stage's first rank (data 0, tensor 0) sends each to
rank 0, which appends it to the current shard file. A shard is written once it would exceed
``shard_bytes``; at the end the files are named ``model-0000i-of-0000n.safetensors`` and
``model.safetensors.index.json`` maps every tensor to its file, as ``save_pretrained``'s
sharding does, so ``from_pretrained`` loads the folder. Rank 0 holds at most one shard's worth
of tensors plus the one in flight, never the whole student.

Names and layout are the unsplit model's (GPT2's fused ``c_attn`` re-joined per q/k/v section);
a tied head is stored once, under the embedding's name, as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .student import ParallelStudent
from .student_state import FullLayout, _canonical, _full, receive_index, send_index

INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 512 * 2**20  # bounds rank 0's buffer; save_pretrained's own default is larger


class ShardWriter:
    """Rank 0's side: buffers tensors up to ``shard_bytes`` and writes each shard as it fills."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.buffer and self.buffered + size > self.shard_bytes:
            self.flush()
        self.buffer[name] = value.detach().cpu().contiguous()
        self.buffered += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.folder / f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.buffer)))
        self.buffer, self.buffered = {}, 0

    def close(self) -> dict[str, str]:
        """Final names and the index; returns the weight map."""
        self.flush()
        count = len(self.files)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


def _owned(ps: ParallelStudent, full: FullLayout) -> list[tuple[str, str, Any]]:
    """(local name, unsplit name, parameter) of this rank, in the unsplit model's order; a tied
    copy whose partner this stage also holds is left out."""
    index = full.index()
    mine = []
    for name, p in ps.named_params.items():
        canonical = _canonical(full, ps, name)
        if canonical is not None and canonical in index:
            mine.append((name, canonical, p))
    return sorted(mine, key=lambda item: index[item[1]])


def _send_stage(ps: ParallelStudent, full: FullLayout, leader: bool) -> None:
    """A later stage's ranks: full tensors one at a time; the leader sends them to rank 0."""
    owned = _owned(ps, full)
    index = full.index()
    if leader:
        send_index([index[c] for _, c, _ in owned], ps.device)
    for name, _, p in owned:
        value = _full(ps, name, p)  # collective over the tensor group
        if leader:
            dist.send(value.contiguous().to(ps.device), 0)


def _receive_stage(src: int, full: FullLayout, device: torch.device, writer: ShardWriter, seen: set[str]) -> None:
    for i in receive_index(src, device):
        name = full.order[i]
        value = torch.empty(full.shapes[name], dtype=full.dtypes[name], device=device)
        dist.recv(value, src)
        if name not in seen:  # a tied pair crosses stages: stage 0 already wrote it
            writer.add(name, value)
            seen.add(name)


def stream_student(
    ps: ParallelStudent, full: FullLayout, folder: Path | None, config: Any, shard_bytes: int = SHARD_BYTES
) -> None:
    """Collective: every rank calls it; rank 0 (``folder`` given there only) writes the folder."""
    writer = ShardWriter(folder, shard_bytes) if ps.rank == 0 and folder is not None else None
    if ps.rank == 0 and writer is None:
        raise ValueError("rank 0 writes the student: it needs the output folder")
    seen: set[str] = set()
    coords = ps.coords
    for stage in range(ps.layout.pipeline):
        leader_rank = ps.layout.rank_of(stage, 0, 0)
        if coords["pipeline"] == stage and ps.rank == 0:
            assert writer is not None
            for name, canonical, p in _owned(ps, full):
                value = _full(ps, name, p)
                if canonical not in seen:
                    writer.add(canonical, value)
                    seen.add(canonical)
        elif coords["pipeline"] == stage:
            _send_stage(ps, full, leader=ps.rank == leader_rank)
        elif ps.rank == 0:
            assert writer is not None
            _receive_stage(leader_rank, full, ps.device, writer, seen)
    if writer is None:
        return
    missing = [n for n in full.order if n not in seen]
    if missing:
        raise RuntimeError(f"streaming the split student lost parameters: {missing[:5]}")
    writer.close()
    config.save_pretrained(str(writer.folder))
    generation = getattr(ps.model, "generation_config", None)
    if generation is not None and getattr(ps.model, "can_generate", lambda: False)():
        generation.save_pretrained(str(writer.folder))
