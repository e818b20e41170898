"""Exact resume: kill -9 a `kdistill run` at a random step after a checkpoint, restart it, and get
the uninterrupted run's student bit for bit. Plus SIGTERM: checkpoint, exit PREEMPTED, resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from kdistill.api.failures import ExitCode

from . import helpers

EVERY = 3
STEPS = (4, 8)  # features, output


def make_job(tmp_path: Path, teacher: Path, data: tuple[Path, Path], cache: bool = False) -> Path:
    train, ev = data
    job = helpers.job_dict(
        "resume",
        "causal-lm",
        str(teacher),
        str(train),
        str(ev),
        every_steps=EVERY,
        stages=[
            {"name": "features", "steps": STEPS[0], "objectives": ["hidden", "logits"]},
            {"name": "output", "steps": STEPS[1], "objectives": ["logits"]},
        ],
        extra_distillation={"teacherCache": {"enabled": cache, "topK": 16}},
    )
    # A narrower student has real projections (aux state) and a fresh init (seeded).
    job["spec"]["student"] = {"fromTeacher": {"numLayers": 2, "hiddenSize": 16, "numAttentionHeads": 2}}
    return helpers.write_job(tmp_path / "job.yaml", job)


def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    # One thread keeps CPU reductions in one fixed order, run to run.
    e.update(OMP_NUM_THREADS="1", KDISTILL_TERMINATION_LOG=str(tmp_path / "termination-log"))
    return e


def kdistill_run(job: Path, out: Path, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kdistill.cli.main", "run", str(job), "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env(tmp_path),
    )


def records(proc: subprocess.Popen[str]):  # type: ignore[no-untyped-def]
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            yield json.loads(line)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "model.safetensors"))


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_kill_9_then_resume_is_bit_exact(tmp_path: Path, gpt2_teacher: Path, causal_data: tuple[Path, Path]) -> None:
    job = make_job(tmp_path, gpt2_teacher, causal_data, cache=True)
    total = sum(STEPS)
    ref = kdistill_run(job, tmp_path / "ref", tmp_path)
    list(records(ref))
    assert ref.wait(timeout=300) == 0

    kill_at = random.Random().randint(EVERY + 1, total - 1)  # after at least one checkpoint
    out = tmp_path / "interrupted"
    proc = kdistill_run(job, out, tmp_path)
    for rec in records(proc):
        if rec.get("event") == "step" and rec["step"] == kill_at:
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "student").exists()
    resumed = kdistill_run(job, out, tmp_path)
    events = list(records(resumed))
    assert resumed.wait(timeout=300) == 0
    resumed_at = [e for e in events if e["event"] == "resumed"]
    assert resumed_at and resumed_at[0]["step"] == (kill_at // EVERY) * EVERY, (kill_at, resumed_at)
    assert_bit_equal(final_weights(tmp_path / "ref"), final_weights(out))
    result = json.loads((out / "result.json").read_text())
    assert result["resumedFrom"] == (kill_at // EVERY) * EVERY


def test_sigterm_checkpoints_and_exits_preempted(
    tmp_path: Path, gpt2_teacher: Path, causal_data: tuple[Path, Path]
) -> None:
    job = make_job(tmp_path, gpt2_teacher, causal_data)
    out = tmp_path / "out"
    proc = kdistill_run(job, out, tmp_path)
    seen = []
    for rec in records(proc):
        seen.append(rec)
        if rec.get("event") == "step" and rec["step"] == 2:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == ExitCode.PREEMPTED
    last = max(r["step"] for r in seen if r.get("event") == "step")
    assert last < sum(STEPS)
    assert (out / "checkpoints" / f"step-{last:09d}" / "manifest.json").is_file()
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term["reason"] == "PREEMPTED" and term["retryable"] is True
    again = kdistill_run(job, out, tmp_path)
    events = list(records(again))
    assert again.wait(timeout=300) == 0
    assert [e["step"] for e in events if e["event"] == "resumed"] == [last]
