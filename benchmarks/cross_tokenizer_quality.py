"""Logits KD into a student with another tokenizer (crossTokenizer uld and byte-span) against
the same student trained on hard labels only, in bits per byte on held-out text.

The teacher is the quickstart's GPT2 (``PVC/models/quickstart-teacher``, trained here if absent);
the student is a fresh 2-layer Llama with its own 1024-token BPE
(``kdistill.trainer.student_build``, built here if absent), as in examples/cross-tokenizer.yaml.
Variants, each the same student, data order, steps and schedule:

- ``plain``: alpha 0, the student's cross-entropy on its own tokens only (no teacher signal);
- ``uld``: alpha 0.5, Universal Logit Distillation at the byte-aligned positions;
- ``byte-span``: alpha 0.5, forward KL over the shared vocabulary with tail buckets.

Each training-set size (the first N texts of the corpus's training split) runs every variant
once per seed (the seed orders the data), variants rotated per seed so none always runs first;
medians over the seeds. Eval: the corpus's held-out split.

    .venv/bin/python -P benchmarks/cross_tokenizer_quality.py [--pvc ./pvc] [--sizes 32,664] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import RESULTS, command_line, machine_state  # noqa: E402
from bench_common import main as bench_main  # noqa: E402

VARIANTS = {"plain": ("uld", 0.0), "uld": ("uld", 0.5), "byte-span": ("byte-span", 0.5)}


def ensure_models(pvc: Path) -> tuple[Path, Path]:
    teacher = pvc / "models" / "quickstart-teacher"
    if not (teacher / "model.safetensors").is_file():
        from kdistill.trainer.teacher_pretrain import PretrainConfig, pretrain

        pretrain(pvc, PretrainConfig(steps=300), log_every=0)
    student = pvc / "models" / "other-tokenizer-student"
    if not (student / "model.safetensors").is_file():
        from kdistill.trainer.student_build import StudentConfig, build_student

        build_student(pvc / "data" / "pydoc-train.jsonl", student, StudentConfig())
    return teacher, student


def job(name: str, teacher: Path, student: Path, train: Path, ev: Path, variant: str, args: Any, seed: int) -> dict:
    method, alpha = VARIANTS[variant]
    return {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": str(teacher), "dtype": "float32"},
            "student": {"model": str(student)},
            "data": {"train": str(train), "eval": str(ev), "maxSeqLength": 128},
            "distillation": {
                "loss": "forward-kl",
                "alpha": alpha,
                "temperature": {"schedule": "constant", "start": 1.0, "end": 1.0},
                "crossTokenizer": {"method": method},
                "stages": [{"name": "output", "steps": args.steps, "objectives": ["logits"]}],
                "batchSize": args.batch_size,
                "learningRate": 3e-3,
                "warmupSteps": 10,
                "seed": seed,
            },
            "quantization": {"mode": "none"},
            "parallelism": {"nodes": 1, "gpusPerNode": 0},
            "checkpoint": {"everySteps": 100000, "keep": 1},
            "serving": {"enabled": False},
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import yaml
    from transformers.utils import logging as hf_logging

    from kdistill.trainer.runner import main_entry

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    teacher, student = ensure_models(args.pvc)
    ev = args.pvc / "data" / "pydoc-eval.jsonl"
    lines = (args.pvc / "data" / "pydoc-train.jsonl").read_text().splitlines()
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    names = list(VARIANTS)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size in sizes:
            train = work / f"train-{size}.jsonl"
            train.write_text("\n".join(lines[:size]) + "\n")
            for k, seed in enumerate(seeds):
                for variant in names[k % len(names) :] + names[: k % len(names)]:
                    name = f"{variant}-{size}-{seed}"
                    path = work / f"{name}.yaml"
                    path.write_text(yaml.safe_dump(job(name, teacher, student, train, ev, variant, args, seed)))
                    load = list(os.getloadavg())
                    started = time.perf_counter()
                    code = main_entry(path, work / name)
                    if code != 0:
                        raise SystemExit(f"{name} exited {code}")
                    result = json.loads((work / name / "result.json").read_text())
                    runs.append(
                        {
                            "size": size,
                            "seed": seed,
                            "variant": variant,
                            "student_bpb": result["metrics"]["student"],
                            "teacher_bpb": result["metrics"]["teacher"],
                            "seconds": round(time.perf_counter() - started, 1),
                            "load_average": load,
                        }
                    )
                    print(json.dumps(runs[-1]), flush=True)
    medians = {
        str(size): {
            v: statistics.median(r["student_bpb"] for r in runs if r["size"] == size and r["variant"] == v)
            for v in names
        }
        for size in sizes
    }
    return {
        "command": command_line(),
        "machine": machine_state(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "teacher_bpb": runs[0]["teacher_bpb"],
        "median_student_bpb": medians,
        "runs": runs,
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"teacher: {report['teacher_bpb']:.3f} bits per byte")
    print(f"{'texts':>6} {'plain':>8} {'uld':>8} {'byte-span':>10}")
    for size, row in report["median_student_bpb"].items():
        print(f"{size:>6} {row['plain']:8.3f} {row['uld']:8.3f} {row['byte-span']:10.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pvc", type=Path, default=ROOT / "pvc", help="local volumes: the corpus and the models")
    p.add_argument("--sizes", default="32,664", help="training texts per variant, comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="data orders, comma-separated")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS / "cross_tokenizer_quality.json")
    bench_main(p, run, print_table)


if __name__ == "__main__":
    main()
