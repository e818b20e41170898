"""Checkpoints: complete state round trip, atomic writes, corrupt ones skipped, pruning."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.trainer.checkpoint import CheckpointManager, capture_rng


def make_state(seed: int) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    aux = nn.ModuleDict({"proj": nn.Linear(3, 5)})
    params = list(model.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, aux, opt, sched


def train_a_bit(model: nn.Module, aux: nn.Module, opt: torch.optim.Optimizer, sched: object, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(2, 4)
        loss = aux["proj"](model(x)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]
        opt.zero_grad()


def save(
    mgr: CheckpointManager, step: int, model: nn.Module, aux: nn.Module, opt: torch.optim.Optimizer, sched: object
) -> Path:
    return mgr.save(
        step=step,
        stage="output",
        temperature=2.5,
        model=model,
        aux=aux,
        optimizer=opt,
        scheduler=sched,
        sampler={"epoch": 3, "cursor": step, "order": torch.arange(5)},
        meta={"tokens_seen": 100 * step},
    )


def test_round_trip_restores_everything(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    model, aux, opt, sched = make_state(0)
    train_a_bit(model, aux, opt, sched, 3)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    path = save(mgr, 3, model, aux, opt, sched)
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    torch.manual_seed(13)  # back to the state the checkpoint captured
    train_a_bit(model, aux, opt, sched, 2)
    after_two = [p.detach().clone() for p in model.parameters()]

    model2, aux2, opt2, sched2 = make_state(99)  # different init: everything must come from disk
    info = mgr.latest()
    assert info is not None and info.path == path and info.step == 3 and info.stage == "output"
    assert info.temperature == 2.5 and info.sampler["cursor"] == 3 and info.meta["tokens_seen"] == 300
    assert torch.equal(info.sampler["order"], torch.arange(5))
    mgr.restore(info, model=model2, aux=aux2, optimizer=opt2, scheduler=sched2)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    assert sched2.last_epoch == 3
    # From the checkpoint, the next two steps equal the first run's exactly.
    mgr.restore(info, model=model2, aux=aux2, optimizer=opt2, scheduler=sched2)
    train_a_bit(model2, aux2, opt2, sched2, 2)
    for a, b in zip(after_two, model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_files_load_without_pickle_code(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=1)
    model, aux, opt, sched = make_state(0)
    train_a_bit(model, aux, opt, sched, 1)
    path = save(mgr, 1, model, aux, opt, sched)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "sampler.pt"):
        torch.load(path / name, weights_only=True)
    assert (path / "model.safetensors").is_file() and (path / "aux.safetensors").is_file()
    assert set(capture_rng()) >= {"python", "numpy", "torch"}


def test_keeps_newest_and_skips_corrupt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    model, aux, opt, sched = make_state(0)
    for step in (2, 4, 6):
        train_a_bit(model, aux, opt, sched, 1)
        save(mgr, step, model, aux, opt, sched)
    assert [p.name for p in mgr.candidates()] == ["step-000000006", "step-000000004"]
    # Truncate the newest one's weights: it must be skipped with a warning, the older one used.
    weights = tmp_path / "step-000000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with caplog.at_level(logging.WARNING):
        info = mgr.latest()
    assert info is not None and info.step == 4
    assert "step-000000006" in caplog.text and "checksum" in caplog.text
    # A missing manifest (a writer that died before finishing) is skipped too.
    (tmp_path / "step-000000004" / "manifest.json").unlink()
    assert mgr.latest() is None


def test_partial_write_is_never_visible(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    model, aux, opt, sched = make_state(0)
    save(mgr, 1, model, aux, opt, sched)
    # A writer killed mid-save leaves only a temporary directory, which is never a candidate
    # and is cleaned up by the next save.
    stale = tmp_path / ".tmp-step-000000002-12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in mgr.candidates()] == ["step-000000001"]
    assert mgr.latest() is not None and mgr.latest().step == 1  # type: ignore[union-attr]
    save(mgr, 2, model, aux, opt, sched)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001", "step-000000002"]


def test_tied_weights_survive(tmp_path: Path, gpt2_teacher: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gpt2_teacher))
    model2 = AutoModelForCausalLM.from_pretrained(str(gpt2_teacher))
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    aux = nn.ModuleDict()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    mgr = CheckpointManager(tmp_path, keep=1)
    save(mgr, 1, model, aux, opt, sched)
    opt2 = torch.optim.AdamW(model2.parameters())
    mgr.restore(
        mgr.latest(),
        model=model2,
        aux=nn.ModuleDict(),
        optimizer=opt2,  # type: ignore[arg-type]
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0),
    )
    assert torch.equal(model2.transformer.wte.weight, model.transformer.wte.weight)
    assert model2.lm_head.weight.data_ptr() == model2.transformer.wte.weight.data_ptr()


def test_a_save_of_a_superseded_attempt_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    from kdistill.api.failures import ExitCode
    from kdistill.trainer.errors import TrainerError
    from kdistill.trainer.fence import Fence

    old = Fence(tmp_path, 1)
    old.raise_to_mine()
    old_mgr = CheckpointManager(tmp_path, keep=3, fence=old)
    model, aux, opt, sched = make_state(0)
    save(old_mgr, 2, model, aux, opt, sched)
    new = Fence(tmp_path, 2)
    new.raise_to_mine()
    new_mgr = CheckpointManager(tmp_path, keep=3, fence=new)
    with pytest.raises(TrainerError) as refused:
        save(old_mgr, 4, model, aux, opt, sched)
    assert refused.value.code == ExitCode.FENCED
    assert "attempt 1 was superseded by attempt 2" in refused.value.message
    # Neither the refused checkpoint nor its temporary directory exists; the newest is still step 2.
    assert [p.name for p in old_mgr.candidates()] == ["step-000000002"]
    assert not list(tmp_path.glob(".tmp-*"))
    info = new_mgr.latest()
    assert info is not None and info.step == 2
    path = save(new_mgr, 4, model, aux, opt, sched)
    assert new_mgr.latest() is not None and new_mgr.latest().path == path  # type: ignore[union-attr]
    # The fence never goes down, and an older attempt that starts late is refused at once.
    with pytest.raises(TrainerError) as late:
        old.raise_to_mine()
    assert late.value.code == ExitCode.FENCED and Fence(tmp_path, None).current() == 2
    # Without an attempt (a local run) there is no fence.
    save(CheckpointManager(tmp_path, keep=3), 6, model, aux, opt, sched)


def test_a_fence_lock_held_too_long_fails_retryable_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process of another attempt frozen while holding the fence lock must not hang the gang."""
    import subprocess
    import sys

    from kdistill.api.failures import ExitCode
    from kdistill.trainer.errors import TrainerError
    from kdistill.trainer.fence import LOCK_FILE, LOCK_TIMEOUT_ENV, Fence

    fence = Fence(tmp_path, 3)
    fence.raise_to_mine()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-c",
            "import fcntl, sys, time\n"
            f"fh = open({str(tmp_path / LOCK_FILE)!r}, 'a+')\n"
            "fcntl.flock(fh.fileno(), fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        monkeypatch.setenv(LOCK_TIMEOUT_ENV, "0.3")
        mgr = CheckpointManager(tmp_path, keep=3, fence=fence)
        model, aux, opt, sched = make_state(0)
        with pytest.raises(TrainerError) as held:
            save(mgr, 2, model, aux, opt, sched)
        assert held.value.code == ExitCode.RETRYABLE
        assert LOCK_FILE in held.value.message and LOCK_TIMEOUT_ENV in held.value.message
        assert mgr.candidates() == [] and not list(tmp_path.glob(".tmp-*"))
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    # Once the holder is gone the same save commits.
    assert save(mgr, 2, model, aux, opt, sched).name == "step-000000002"
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(TrainerError) as bad:
        save(mgr, 4, model, aux, opt, sched)
    assert bad.value.code == ExitCode.BAD_SPEC and "expected a number of seconds" in bad.value.message
