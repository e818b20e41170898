"""Reading a checkpoint's tensors whole in a test, whichever layout wrote it: gathered
(``model.safetensors``, ``aux.safetensors``, ``optimizer.pt``) or sharded (``dcp.json`` and the
ranks' ``shard-*.safetensors``, see ``parallel/sharded_checkpoint.py``)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from kdistill.trainer.dcp_storage import read_metadata


def whole_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint under ``prefix``, assembled from its chunks."""
    md = read_metadata(path)
    out = {}
    for fqn, entry in md.state_dict_metadata.items():
        if not fqn.startswith(prefix):
            continue
        assert isinstance(entry, TensorStorageMetadata)
        whole = torch.full(tuple(entry.size), float("nan")).to(entry.properties.dtype)
        for chunk in entry.chunks:
            stored = md.storage_data[MetadataIndex(fqn, chunk.offsets)]
            with safe_open(str(path / stored.file), "pt") as f:
                piece = f.get_tensor(stored.key)
            whole[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))] = piece
        out[fqn[len(prefix) :]] = whole
    return out


def student_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    return whole_tensors(path, "student/")


def aux_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "aux.safetensors").is_file():
        return load_file(str(path / "aux.safetensors"))
    return whole_tensors(path, "aux/")


def adam_moments(path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every parameter's (exp_avg, exp_avg_sq), in no particular order."""
    if (path / "optimizer.pt").is_file():
        state = torch.load(path / "optimizer.pt", weights_only=True)["state"]
        return [(s["exp_avg"], s["exp_avg_sq"]) for s in state.values()]
    optim = whole_tensors(path, "optim/")
    names = sorted({k.rsplit("/", 1)[0] for k in optim})
    return [(optim[f"{n}/exp_avg"], optim[f"{n}/exp_avg_sq"]) for n in names]


def assert_same_moments(a: Path, b: Path, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """The two checkpoints hold the same Adam moments, parameter for parameter (matched by value:
    a gathered checkpoint numbers its parameters, a sharded one names them)."""
    left, right = adam_moments(a), adam_moments(b)
    assert len(left) == len(right), (len(left), len(right))
    for avg, avg_sq in left:
        match = next(
            (
                i
                for i, (x, y) in enumerate(right)
                if x.shape == avg.shape
                and torch.allclose(x, avg, rtol=rtol, atol=atol)
                and torch.allclose(y, avg_sq, rtol=rtol, atol=atol)
            ),
            None,
        )
        assert match is not None, f"no parameter of {b} has the moments of one of {a} (shape {tuple(avg.shape)})"
        right.pop(match)
