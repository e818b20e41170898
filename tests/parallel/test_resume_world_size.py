"""A checkpoint written by a 2-process data-parallel run resumes in a 1-process run: rank 0's
gathered copy does not depend on the world size (see docs/parallel.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from kdistill.trainer.parallel.launch import launch_env, torchrun_command

from .harness import REPO
from .jobs import make_job


def test_checkpoint_from_two_ranks_resumes_on_one(tmp_path: Path) -> None:
    job2 = make_job(tmp_path / "w", world=2, steps=8, every=4, batch_size=8)
    env = launch_env(2, base=dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error"))
    two = subprocess.run(
        torchrun_command(job2, tmp_path / "two", 2), env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]

    # The same job on one process, starting from the 2-rank run's step-4 checkpoint.
    spec = yaml.safe_load(job2.read_text())
    spec["spec"]["parallelism"] = {"nodes": 1, "gpusPerNode": 0}
    job1 = tmp_path / "w" / "one.yaml"
    job1.write_text(yaml.safe_dump(spec))
    out1 = tmp_path / "one"
    (out1 / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step-000000004", out1 / "checkpoints" / "step-000000004")
    one = subprocess.run(
        [sys.executable, "-m", "kdistill.trainer", "--config", str(job1), "--output", str(out1)],
        env=dict(env, WORLD_SIZE="1"),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads((out1 / "result.json").read_text())["resumedFrom"] == 4

    start = load_file(str(out1 / "checkpoints" / "step-000000004" / "model.safetensors"))
    a = load_file(str(tmp_path / "two" / "student" / "model.safetensors"))
    b = load_file(str(out1 / "student" / "model.safetensors"))

    # Both continued from the same weights on the same global batches; they are not bit-equal
    # (dropout draws and per-rank loss averaging differ with the world size), but the one-process
    # run went where the two-process run went: much closer to its end point than the start was.
    def dist(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
        return float(torch.sqrt(sum(((x[k] - y[k]) ** 2).sum() for k in x.keys() & y.keys())))

    assert dist(b, a) < 0.5 * dist(start, a)
    assert any(not torch.equal(b[k], start[k]) for k in b)
