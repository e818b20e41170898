"""The sharded checkpoint format in one process: a round trip of weights and Adam moments, the
JSON metadata validated field by field (nothing unpickled), and clear errors for a checkpoint
that does not fit. Multi-rank saves and loads: tests/parallel/test_sharded_checkpoint.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kdistill.trainer import dcp_storage, sharded_state
from kdistill.trainer.sharded_state import Held, Shard
from tests.parallel.models import tiny_model


def _trained(seed: int = 0, width: int = 32) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = tiny_model("gpt2", layers=2, seed=seed)
    if width != 32:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=width, n_layer=2, n_head=4, n_positions=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


def _held(model: torch.nn.Module) -> list[Held]:
    return [Held(f"student/{n}", p, tuple(p.shape)) for n, p in model.named_parameters()]


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer = _trained()
    digests = sharded_state.save(tmp_path, sharded_state.state_dict(_held(model), optimizer))
    assert set(digests) == {"shard-00000.safetensors"}
    return tmp_path, model, optimizer


def test_round_trip_of_weights_and_moments(tmp_path: Path) -> None:
    path, model, optimizer = _saved(tmp_path)
    other = _trained(seed=1)[0]
    fresh = torch.optim.AdamW(other.parameters(), lr=1e-2)
    sharded_state.load(path, _held(other), fresh)
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b), name
        for key, value in optimizer.state[a].items():
            assert torch.equal(fresh.state[b][key], value), (name, key)
    assert sorted(p.name for p in path.iterdir()) == ["dcp.json", "shard-00000.safetensors"]
    doc = json.loads((path / "dcp.json").read_text())
    assert doc["format"] == dcp_storage.FORMAT and "student/transformer.wte.weight" in doc["tensors"]


def test_param_groups_travel_as_json() -> None:
    _, optimizer = _trained()
    saved = json.loads(json.dumps(sharded_state.param_groups(optimizer)))
    other = torch.optim.AdamW(_trained(seed=1)[0].parameters(), lr=5.0, betas=(0.5, 0.5))
    sharded_state.apply_param_groups(other, saved)
    assert other.param_groups[0]["lr"] == 1e-2 and other.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match="param groups"):
        sharded_state.apply_param_groups(other, saved * 2)


def test_sections_of_a_tensor_parallel_shard_are_placed_in_the_whole_tensor() -> None:
    # A [4, 12] tensor of three sections (GPT2's q|k|v) cut in two: rank 1 holds columns 2-3, 6-7, 10-11.
    local = torch.zeros(4, 6)
    t = sharded_state.checkpointable(local, (4, 12), Shard(dim=1, sections=3, size=2, rank=1))
    assert t.global_offsets == ((0, 2), (0, 6), (0, 10))  # type: ignore[attr-defined]
    assert t.local_offsets == ((0, 0), (0, 2), (0, 4)) and t.local_sizes == ((4, 2),) * 3  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="does not match"):
        sharded_state.checkpointable(torch.zeros(4, 5), (4, 12), Shard(dim=1, sections=3, size=2, rank=1))


def test_a_checkpoint_of_another_shape_is_refused(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    wider, optimizer = _trained(width=64)
    with pytest.raises(ValueError, match=r"student/transformer.wte.weight has shape \(64, 32\)"):
        sharded_state.load(path, _held(wider), optimizer)
    md = dcp_storage.read_metadata(path)
    with pytest.raises(ValueError, match=r"missing \['extra'\]"):
        sharded_state.check_keys(md, "student/", {n for n, _ in wider.named_parameters()} | {"extra"})


def test_non_tensor_state_is_refused(tmp_path: Path) -> None:
    model, optimizer = _trained()
    p = next(model.parameters())
    optimizer.state[p]["note"] = "text"  # type: ignore[index]
    with pytest.raises(ValueError, match="note is a str, not a tensor"):
        sharded_state.state_dict(_held(model), optimizer)


def _tampered(path: Path, change: Any) -> None:
    doc = json.loads((path / "dcp.json").read_text())
    change(doc["tensors"]["student/transformer.wte.weight"])
    (path / "dcp.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update(dtype="object"), "expected dtype"),
        (lambda t: t["chunks"][0].update(file="../elsewhere.safetensors"), "a file name inside the checkpoint"),
        (lambda t: t["chunks"][0].update(offsets=[1, 0]), "lies outside"),
        (lambda t: t["chunks"][0].update(sizes=[64]), "dimensions"),
        (lambda t: t.update(size=[-1, 32]), "non-negative integers"),
    ],
    ids=["dtype", "path", "bounds", "rank", "size"],
)
def test_tampered_metadata_is_refused(tmp_path: Path, change: Any, message: str) -> None:
    path, _, _ = _saved(tmp_path)
    _tampered(path, change)
    with pytest.raises(ValueError, match=message):
        dcp_storage.read_metadata(path)


def test_missing_or_pickled_metadata_is_refused(tmp_path: Path) -> None:
    path, model, optimizer = _saved(tmp_path)
    (path / "dcp.json").write_bytes(b"\x80\x04\x95 a pickle, never loaded")
    with pytest.raises(ValueError, match=r"unreadable dcp\.json"):
        sharded_state.load(path, _held(model), optimizer)
    (path / "dcp.json").unlink()
    with pytest.raises(ValueError, match=r"unreadable dcp\.json"):
        dcp_storage.read_metadata(path)


def test_a_chunk_missing_from_its_file_is_refused(tmp_path: Path) -> None:
    path, model, optimizer = _saved(tmp_path)
    _tampered(path, lambda t: t["chunks"][0].update(key="student/nothing@0,0"))
    with pytest.raises(ValueError, match="chunk student/nothing@0,0 is missing"):
        sharded_state.load(path, _held(model), optimizer)
