"""Error-feedback residuals and each rank's momentum (compress: momentum, the default) travel
with the checkpoint: a 2-rank top-k run resumed from its step-4 checkpoint ends with the
uninterrupted run's weights; without the residuals, or without the momenta, it does not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from kdistill.trainer.checkpoint import MANIFEST
from kdistill.trainer.fsio import sha256_file
from kdistill.trainer.parallel.launch import launch_env, torchrun_command

from .jobs import make_job

STEPS, EVERY = 8, 4


def _run(job: Path, out: Path, tmp: Path) -> None:
    env = launch_env(2, base=dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error"))
    proc = subprocess.run(torchrun_command(job, out, 2), env=env, capture_output=True, text=True, cwd=tmp, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _resume_from_step4(ref: Path, out: Path, *, drop_residuals: bool = False, drop_momenta: bool = False) -> None:
    src = ref / "checkpoints" / f"step-{EVERY:09d}"
    dst = out / "checkpoints" / src.name
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    if drop_residuals:
        # A checkpoint as written before residuals were saved: no file, and a manifest without it.
        (dst / "compression.safetensors").unlink()
        del manifest["files"]["compression.safetensors"]
    if drop_momenta:
        # The residuals alone, as a gradient-compression run writes them (a valid manifest).
        saved = load_file(str(dst / "compression.safetensors"))
        save_file(
            {k: v for k, v in saved.items() if not k.startswith("momentum_")}, str(dst / "compression.safetensors")
        )
        manifest["files"]["compression.safetensors"] = sha256_file(dst / "compression.safetensors")
    (dst / MANIFEST).write_text(json.dumps(manifest))


def test_resumed_compressed_run_equals_uninterrupted(tmp_path: Path) -> None:
    job = make_job(tmp_path / "w", world=2, steps=STEPS, every=EVERY, batch_size=8, top_k=0.01)
    spec = yaml.safe_load(job.read_text())
    # Warm-up 2 and ramp 2: the resumed hook must also know where it is in that schedule, and the
    # optimizer's variance (frozen from step 2 on) must come back as it was.
    spec["spec"]["parallelism"]["gradientCompression"].update({"warmupSteps": 2, "rampSteps": 2})
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    ref = tmp_path / "ref"
    _run(job, ref, tmp_path)
    saved = load_file(str(ref / "checkpoints" / f"step-{EVERY:09d}" / "compression.safetensors"))
    assert sorted(saved) == ["hook_step", "momentum_rank0", "momentum_rank1", "rank0", "rank1", "world"]
    assert int(saved["hook_step"][0]) == EVERY
    # Each rank kept its own, non-trivial residual (99% of its accumulated momentum is unsent) and
    # its own momentum.
    for key in ("rank", "momentum_rank"):
        assert float(saved[f"{key}0"].abs().sum()) > 0 and not torch.equal(saved[f"{key}0"], saved[f"{key}1"])

    resumed = tmp_path / "resumed"
    _resume_from_step4(ref, resumed)
    _run(job, resumed, tmp_path)
    assert json.loads((resumed / "result.json").read_text())["resumedFrom"] == EVERY
    a = load_file(str(ref / "student" / "model.safetensors"))
    b = load_file(str(resumed / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)

    # Control: the same resume with the residuals dropped follows another trajectory.
    lost = tmp_path / "lost"
    _resume_from_step4(ref, lost, drop_residuals=True)
    _run(job, lost, tmp_path)
    c = load_file(str(lost / "student" / "model.safetensors"))
    assert max(float((c[k] - a[k]).abs().max()) for k in a) > 1e-4

    # Control: with the residuals but without the momenta (each restarts from the optimizer's
    # first moment, the mean momentum last applied) the trajectory differs too.
    restarted = tmp_path / "restarted"
    _resume_from_step4(ref, restarted, drop_momenta=True)
    _run(job, restarted, tmp_path)
    m = load_file(str(restarted / "student" / "model.safetensors"))
    assert max(float((m[k] - a[k]).abs().max()) for k in a) > 1e-4
