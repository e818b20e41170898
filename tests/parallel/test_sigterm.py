"""SIGTERM reaching one rank only (real processes, gloo, world size 2).

Checkpoint saves are collective (rank 0 gathers every rank's compression residuals), so a rank
that stopped alone would wait in the gather until the collective timeout while its peer trained
on. The loop all-reduces its stop flag each step: both ranks checkpoint at the same step and exit
PREEMPTED well inside the collective timeout, leaving exactly one checkpoint behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from kdistill.api.failures import ExitCode
from kdistill.trainer.checkpoint import CheckpointManager
from kdistill.trainer.parallel.launch import launch_env

from .harness import REPO, child_env, free_port
from .jobs import make_job
from .test_fault_tolerance import _records

WORLD = 2
STEPS = 400  # far more than the run reaches: it must end by the signal, not by finishing
COLLECTIVE_TIMEOUT_S = 120


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path: Path) -> None:
    # Compression on, so the save includes the residual gather, and no periodic checkpoints:
    # the only checkpoint is the one written on the way out.
    job = make_job(tmp_path / "job", world=WORLD, steps=STEPS, every=10_000, top_k=0.1, batch_size=8)
    out = tmp_path / "out"
    port = free_port()
    ours = {
        k: v
        for k, v in launch_env(WORLD, collective_timeout_s=COLLECTIVE_TIMEOUT_S, rendezvous_timeout_s=120).items()
        if k.startswith("KDISTILL")
    }
    ours["KDISTILL_TERMINATION_LOG"] = str(tmp_path / "termination.log")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kdistill.trainer", "--config", str(job), "--output", str(out)],
            cwd=REPO,
            env=child_env(r, WORLD, port, ours),
            stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if r == 0 else subprocess.PIPE,
            text=True,
        )
        for r in range(WORLD)
    ]
    try:
        records = _records(procs[0])
        for rec in records:
            if rec.get("event") == "step" and rec["step"] >= 3:
                break
        procs[1].send_signal(signal.SIGTERM)  # rank 1 only; rank 0 never sees a signal
        signalled = time.monotonic()
        rest = list(records)  # rank 0's remaining log, to its exit
        _, err1 = procs[1].communicate(timeout=COLLECTIVE_TIMEOUT_S + 60)
        code0 = procs[0].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - signalled
    assert procs[1].returncode == ExitCode.PREEMPTED, (procs[1].returncode, (err1 or "")[-3000:])
    assert code0 == ExitCode.PREEMPTED, (code0, rest[-5:])
    # Neither rank sat in a collective until the timeout.
    assert elapsed < COLLECTIVE_TIMEOUT_S, elapsed
    saved = [r for r in rest if r.get("event") == "checkpoint"]
    last_step = max(r["step"] for r in rest if r.get("event") == "step")
    assert len(saved) == 1 and saved[0]["step"] == last_step < STEPS, (saved, last_step)
    manager = CheckpointManager(out / "checkpoints", keep=1)
    dirs = manager.candidates()
    assert len(dirs) == 1, dirs
    info = manager.latest()
    assert info is not None and info.step == last_step
    # Both ranks' residuals made it into the one checkpoint: the gather completed.
    residuals = CheckpointManager.load_extra(info, "compression.safetensors")
    assert residuals is not None and {"rank0", "rank1", "hook_step"} <= residuals.keys()
    assert int(residuals["hook_step"][0]) == last_step
    message = json.loads((tmp_path / "termination.log").read_text())
    assert message["reason"] == "PREEMPTED" and message["retryable"] is True
