"""Shared by the parallel benchmarks: a quickstart-like causal-LM job run under torchrun.

The teacher is the quickstart's (``python -m kdistill.trainer.teacher_pretrain --pvc DIR``, a
small GPT2 trained on Python's documentation) when ``--pvc`` points at one, else that command is
run first with few steps. Data: the quickstart corpus (``trainer/corpus.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def ensure_teacher(pvc: Path, pretrain_steps: int = 150) -> Path:
    teacher = pvc / "models" / "quickstart-teacher"
    if not (teacher / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "kdistill.trainer.teacher_pretrain",
                "--pvc",
                str(pvc),
                "--steps",
                str(pretrain_steps),
            ],
            check=True,
            env=dict(os.environ, OMP_NUM_THREADS="2"),
        )
    return teacher


def write_job(
    path: Path,
    pvc: Path,
    *,
    world: int,
    steps: int,
    batch_size: int,
    top_k: float = 0.0,
    warmup: int = 0,
    max_len: int = 128,
    every: int = 1000,
    name: str = "bench",
    seed: int = 0,
    ramp: int = 0,
    freeze_variance: bool = True,
    selection: str = "update",
    compress: str | None = None,
    teacher_stages: int = 1,
    train: Path | None = None,
    eval_data: Path | None = None,
    spec_defaults: bool = False,
    spec_fields: dict[str, Any] | None = None,
) -> Path:
    """A job file; with ``spec_defaults`` the compression block names only topK and ``spec_fields``
    (spec names, e.g. ``{"selection": "magnitude"}``): the spec's defaults for everything else."""
    job: dict[str, Any] = {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": str(pvc / "models" / "quickstart-teacher"), "dtype": "float32"},
            "student": {"fromTeacher": {"numLayers": 2}},
            "data": {
                "train": str(train or pvc / "data" / "pydoc-train.jsonl"),
                "maxSeqLength": max_len,
                **({"eval": str(eval_data)} if eval_data else {}),
            },
            "distillation": {
                "stages": [{"name": "output", "steps": steps, "objectives": ["logits"]}],
                "batchSize": batch_size,
                "learningRate": 1e-3,
                "warmupSteps": 5,
                "seed": seed,
            },
            "quantization": {"mode": "none"},
            "parallelism": {
                "nodes": world,
                "gpusPerNode": 0,
                "student": {"data": world, "tensor": 1, "pipeline": 1},
                "teacherPipelineStages": teacher_stages,
                "gradientCompression": {
                    "topK": top_k,
                    "warmupSteps": warmup,
                    "rampSteps": ramp,
                    "freezeVariance": freeze_variance,
                    "selection": selection,
                    **({"compress": compress} if compress is not None else {}),
                },
            },
            "checkpoint": {"everySteps": every, "keep": 1},
            "serving": {"enabled": False},
        },
    }
    if spec_defaults:
        job["spec"]["parallelism"]["gradientCompression"] = {"topK": top_k, **(spec_fields or {})}
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run_job(job: Path, out: Path, world: int, threads_per_rank: int) -> tuple[list[dict], list[dict]]:
    """Run under torchrun (or in-process for one rank); returns (step records, compression logs)."""
    from kdistill.trainer.parallel.launch import torchrun_command

    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank), TRANSFORMERS_VERBOSITY="error")
    if world == 1:
        cmd = [sys.executable, "-m", "kdistill.trainer", "--config", str(job), "--output", str(out)]
    else:
        cmd = torchrun_command(job, out, world)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    steps, comp = [], []
    for line in (proc.stdout + proc.stderr).splitlines():
        if '{"event": "step"' in line:
            steps.append(json.loads(line[line.index("{") :]))
        elif "gradient compression {" in line:
            comp.append(json.loads(line[line.index("{") :]))
    return steps, comp
