"""Sharded checkpoints of a split student on real gloo ranks: each rank writes only its part
(replicas once), nothing on load is unpickled, any layout (and one process) resumes another's
checkpoint with the weights and Adam moments of an uninterrupted run, and a rank killed mid-save
never leaves a checkpoint that loads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kdistill.api.failures import ExitCode
from kdistill.trainer.checkpoint import MANIFEST, CheckpointManager
from kdistill.trainer.dcp_storage import METADATA
from kdistill.trainer.parallel import sharded_checkpoint
from kdistill.trainer.parallel.distributed import peer_guard

from .checkpoint_workers import LENGTH, ROWS, aux_backward, aux_modules, checkpoint_state, optimizer_step
from .harness import run_ranks, start_ranks, wait_ranks
from .models import tiny_model
from .workers import student_batch, token_loss

STEP1 = "step-000000001"
STEP_LR = 1e-2  # checkpoint_workers' learning rate


def single_process(family: str, root: Path, steps: int) -> tuple[torch.nn.Module, object]:
    """The uninterrupted run in this process: ``steps`` AdamW steps of the unsplit student."""
    model = tiny_model(family, layers=4)
    aux = aux_modules()
    named = [(f"student.{n}", p) for n, p in model.named_parameters()]
    named += [(f"aux.{n}", p) for n, p in aux.named_parameters()]
    state = checkpoint_state(root, aux, named)
    for step in range(1, steps + 1):
        ids, mask, labels, teacher = student_batch(ROWS, LENGTH)
        logits = model(input_ids=ids, attention_mask=mask).logits
        per_token = token_loss(logits, teacher, labels).masked_fill(labels == -100, 0.0)
        (per_token.sum() / (labels != -100).sum()).backward()
        aux_backward(aux, step)
        optimizer_step(state)
    return model, state


def expected(model: torch.nn.Module, state: object) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.detach()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}:{key}"] = state.optimizer.state[p][key]  # type: ignore[attr-defined]
    return out


def _reference_name(key: str, want: dict[str, torch.Tensor]) -> str:
    # GPT2's last stage holds a copy of the tied embedding as its head.
    return key if key in want else key.replace("lm_head.weight", "transformer.wte.weight")


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    for key, value in got.items():
        torch.testing.assert_close(value, want[_reference_name(key, want)], rtol=1e-5, atol=1e-5, msg=f"{what} {key}")


def assert_stepped_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """After a step taken by a split student: its cut matmuls sum in another order than one
    process's, and on some CPUs the last bits differ; AdamW turns such a difference in a near-zero
    gradient into a different step for that entry, up to the learning rate (checkpoint_workers'
    1e-2). So every entry is within a learning-rate step, and all but 0.5% of each tensor's
    entries within 1e-5 (a restore that mixed up shards would miss both)."""
    for key, value in got.items():
        name = _reference_name(key, want)
        diff = (value - want[name]).abs()
        assert float(diff.max()) <= STEP_LR, f"{what} {key}: {float(diff.max())}"
        off = int((diff > 1e-5 + 1e-5 * want[name].abs()).sum())
        assert off <= max(1, diff.numel() // 200), f"{what} {key}: {off} of {diff.numel()} entries off"


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama student split tensor 2 x pipeline 2 (world 4), one step, a sharded checkpoint."""
    work = tmp_path_factory.mktemp("tp2pp2")
    args = {"family": "llama", "pipeline": 2, "data": 1, "tensor": 2}
    run_ranks(4, "tests.parallel.checkpoint_workers:save_split", work, args)
    return work


def test_each_rank_writes_its_own_part_as_safetensors_and_json(tp2pp2: Path) -> None:
    path = tp2pp2 / "checkpoints" / STEP1
    assert CheckpointManager.verify(path) is None
    names = sorted(p.name for p in path.iterdir())
    shards = [n for n in names if n.startswith("shard-")]
    assert shards == [f"shard-{r:05d}.safetensors" for r in range(4)], names
    # Nothing pickled: JSON, safetensors, and the small weights_only-loadable .pt files.
    assert {n for n in names if not n.endswith((".safetensors", ".json"))} == {"rng.pt", "sampler.pt", "scheduler.pt"}
    doc = json.loads((path / METADATA).read_text())["tensors"]
    q = doc["student/model.layers.0.self_attn.q_proj.weight"]
    # Stage 0 holds layer 0; its two tensor ranks wrote one half each, in their own files.
    assert [c["offsets"] for c in q["chunks"]] == [[0, 0], [16, 0]] and q["size"] == [32, 32]
    assert {c["file"] for c in q["chunks"]} == {"shard-00000.safetensors", "shard-00001.safetensors"}
    last = doc["student/model.layers.3.mlp.down_proj.weight"]  # row-parallel, on stage 1
    assert {c["file"] for c in last["chunks"]} == {"shard-00002.safetensors", "shard-00003.safetensors"}
    assert "optim/student/model.layers.3.mlp.down_proj.weight/exp_avg" in doc
    assert doc["optim/student/model.norm.weight/step"]["size"] == []
    groups = json.loads((path / "optimizer.json").read_text())["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and groups[0]["betas"] == [0.9, 0.999]


@pytest.mark.parametrize(
    ("layout", "world"),
    [({"pipeline": 1, "data": 2, "tensor": 1}, 2), ({"pipeline": 2, "data": 1, "tensor": 1}, 2)],
    ids=["data2", "pipeline2"],
)
def test_tp2pp2_checkpoint_resumes_under_another_layout(
    tp2pp2: Path, tmp_path: Path, layout: dict[str, int], world: int
) -> None:
    shutil.copytree(tp2pp2 / "checkpoints", tmp_path / "checkpoints")
    run_ranks(world, "tests.parallel.checkpoint_workers:resume_split", tmp_path, {"family": "llama", **layout})
    model1, state1 = single_process("llama", tmp_path / "ref1", 1)
    model2, state2 = single_process("llama", tmp_path / "ref2", 2)
    for rank in range(world):
        assert_matches(load_file(str(tmp_path / f"loaded{rank}.safetensors")), expected(model1, state1), f"rank {rank}")
        assert_matches(
            load_file(str(tmp_path / f"stepped{rank}.safetensors")), expected(model2, state2), f"rank {rank}"
        )


def test_tp2pp2_checkpoint_resumes_in_one_process(tp2pp2: Path, tmp_path: Path) -> None:
    model, state = single_process("llama", tmp_path / "ref", 1)
    other = tiny_model("llama", layers=4, seed=1)
    aux = aux_modules()
    torch.nn.init.zeros_(aux["proj"].weight)
    named = [(f"student.{n}", p) for n, p in other.named_parameters()] + [
        (f"aux.{n}", p) for n, p in aux.named_parameters()
    ]
    mine = checkpoint_state(tmp_path / "mine", aux, named)
    held = sharded_checkpoint.whole_held(other)
    path = tp2pp2 / "checkpoints" / STEP1
    sharded_checkpoint.restore(path, mine, held, {h.key[len("student/") :] for h in held}, guard=peer_guard)
    assert_matches(expected(other, mine), expected(model, state), "one process")
    torch.testing.assert_close(aux["proj"].weight, state.aux["proj"].weight)  # type: ignore[attr-defined]
    assert mine.scheduler.last_epoch == 1


def test_gpt2_sections_and_tied_head_reshard(tmp_path: Path) -> None:
    """GPT2 at tensor 2 x pipeline 2: the fused q|k|v c_attn is stored as one tensor from two
    chunks per rank, the tied head once; it resumes on one rank of pipeline 2 (world 2)."""
    run_ranks(
        4,
        "tests.parallel.checkpoint_workers:save_split",
        tmp_path,
        {"family": "gpt2", "pipeline": 2, "data": 1, "tensor": 2},
    )
    doc = json.loads((tmp_path / "checkpoints" / STEP1 / METADATA).read_text())["tensors"]
    attn = doc["student/transformer.h.0.attn.c_attn.weight"]
    assert attn["size"] == [32, 96] and sorted(c["offsets"][1] for c in attn["chunks"]) == [0, 16, 32, 48, 64, 80]
    assert "student/lm_head.weight" not in doc and "student/transformer.wte.weight" in doc
    run_ranks(
        2,
        "tests.parallel.checkpoint_workers:resume_split",
        tmp_path,
        {"family": "gpt2", "pipeline": 2, "data": 1, "tensor": 1},
    )
    model1, state1 = single_process("gpt2", tmp_path / "ref1", 1)
    model2, state2 = single_process("gpt2", tmp_path / "ref2", 2)
    for rank in range(2):
        # The checkpoint's step too was taken at tensor 2 x pipeline 2.
        assert_stepped_matches(
            load_file(str(tmp_path / f"loaded{rank}.safetensors")), expected(model1, state1), f"rank {rank}"
        )
        assert_stepped_matches(
            load_file(str(tmp_path / f"stepped{rank}.safetensors")), expected(model2, state2), f"rank {rank}"
        )


def test_data_replicas_write_each_chunk_once(tmp_path: Path) -> None:
    args = {"family": "llama", "pipeline": 1, "data": 2, "tensor": 2}
    run_ranks(4, "tests.parallel.checkpoint_workers:save_split", tmp_path, args)
    path = tmp_path / "checkpoints" / STEP1
    doc = json.loads((path / METADATA).read_text())["tensors"]
    stored = 0
    for name in sorted(p.name for p in path.glob("shard-*.safetensors")):
        with safe_open(str(path / name), "pt") as f:
            stored += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    whole = sum(_numel(t["size"]) for t in doc.values())
    # Four ranks, two of them replicas of the other two: every element is on disk exactly once.
    assert stored == whole
    for t in doc.values():
        assert sum(_numel(c["sizes"]) for c in t["chunks"]) == _numel(t["size"])


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_rank_killed_mid_save_leaves_no_checkpoint_that_loads(tmp_path: Path) -> None:
    args = {"family": "llama", "pipeline": 1, "data": 1, "tensor": 2}
    procs = start_ranks(2, "tests.parallel.checkpoint_workers:save_and_hang", tmp_path, args)
    marker = tmp_path / "rank1-wrote"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert time.monotonic() < deadline and procs[1].poll() is None, "rank 1 never reached its write"
        time.sleep(0.1)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    results = wait_ranks(procs)
    assert results[1].returncode == -signal.SIGKILL
    # Rank 0 lost its peer inside the save and says so (the operator reads the exit code).
    assert results[0].returncode == ExitCode.PEER_LOST, results[0].stderr[-3000:]
    root = tmp_path / "checkpoints"
    partial = root / ".tmp-step-000000002-attempt0"
    assert (partial / "shard-00001.safetensors").is_file() and not (partial / MANIFEST).exists()
    manager = CheckpointManager(root, keep=3)
    assert [p.name for p in manager.candidates()] == [STEP1]
    info = manager.latest()
    assert info is not None and info.step == 1
    # Even moved into place by hand, the partial directory is refused by the manifest check.
    assert manager.verify(partial) is not None
    shutil.copytree(partial, root / "step-000000002")
    info = manager.latest()
    assert info is not None and info.step == 1
    # The next save's commit prunes what the killed save left.
    shutil.rmtree(root / "step-000000002")
    run_ranks(2, "tests.parallel.checkpoint_workers:resume_and_save", tmp_path, args)
    assert not partial.exists()
    assert [p.name for p in manager.candidates()] == ["step-000000003", STEP1]
