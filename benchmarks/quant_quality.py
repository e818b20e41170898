"""INT8 quality: retention of the QAT INT8 student against the FP32 student, and how far PTQ alone
falls short, on the quickstart's causal LM (eval perplexity on Python's own docs).

Both quantized students come from the same FP32 student S, through the real ``kdistill run``:

1. ``kdistill run`` (mode ptq-int8): distill the teacher into a 2-layer S; its artifact is PTQ(S).
2. ``kdistill run`` (mode qat-int8) with ``student.model: S``: a one-step output stage, then the QAT
   phase (reduced precision, then INT8 fake quantization, teacher targets), then real INT8.

Every model is then evaluated here with one evaluator (token perplexity over the eval split), and
every INT8 artifact with both dynamic-activation kernels: the one this CPU serves with, and
torchao's per-token kernel (what AMX/VNNI CPUs and GPUs serve with). Retention = ppl(S) / ppl(X).

    python benchmarks/quant_quality.py --teacher PVC/models/quickstart-teacher --data PVC/data

Without --teacher, the quickstart teacher is trained first (trainer.teacher_pretrain).
Target: QAT retention >= 99%. Writes benchmarks/results/quant_quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.bench_common
from benchmarks.bench_common import command_line

RESULTS = Path(__file__).parent / "results"
KDISTILL = [sys.executable, "-P", "-m", "kdistill.cli.main"]


def job(
    name: str,
    student: dict[str, Any],
    stages: list[dict[str, Any]],
    quantization: dict[str, Any],
    lr: float,
    batch: int,
) -> dict[str, Any]:
    return {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": "pvc://models/teacher", "dtype": "float32"},
            "student": student,
            "data": {
                "train": "pvc://data/pydoc-train.jsonl",
                "eval": "pvc://data/pydoc-eval.jsonl",
                "maxSeqLength": 128,
            },
            "distillation": {
                "loss": "forward-kl",
                "alpha": 0.7,
                "temperature": {"schedule": "linear", "start": 4.0, "end": 1.0},
                "stages": stages,
                "batchSize": batch,
                "learningRate": lr,
                "warmupSteps": min(20, stages[0]["steps"] // 5),
            },
            "quantization": quantization,
            "parallelism": {"nodes": 1, "gpusPerNode": 0},
            "checkpoint": {"everySteps": 100000, "keep": 1},
            "serving": {"enabled": False},
        },
    }


def kdistill_run(spec: dict[str, Any], work: Path, out: Path, env: dict[str, str]) -> dict[str, Any]:
    path = work / f"{spec['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    with (work / f"{spec['metadata']['name']}.log").open("w") as log:
        subprocess.run(
            [*KDISTILL, "run", str(path), "--output", str(out)],
            check=True,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    result = json.loads((out / "result.json").read_text())
    result["benchSeconds"] = time.time() - start
    return result


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], max_length: int = 128, batch: int = 16
) -> float:
    model.eval()
    nll, count = 0.0, 0
    encoded = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    encoded = [e for e in encoded if len(e) >= 2]
    pad = tokenizer.pad_token_id or 0
    for i in range(0, len(encoded), batch):
        rows = encoded[i : i + batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        count += int((target != -100).sum())
    return math.exp(nll / count)


def evaluate_all(work: Path, texts: list[str]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.trainer.artifact import load_artifact
    from kdistill.trainer.quantization import select_int8_kernel, set_int8_kernel

    tok = AutoTokenizer.from_pretrained(str(work / "pvc/models/teacher"))
    fp = lambda d: AutoModelForCausalLM.from_pretrained(str(d), use_safetensors=True)  # noqa: E731
    ppl: dict[str, float] = {
        "teacher": perplexity(fp(work / "pvc/models/teacher"), tok, texts),
        "student_fp32": perplexity(fp(work / "ptq/student"), tok, texts),
        "qat_student_fp32_weights": perplexity(fp(work / "qat/student"), tok, texts),
    }
    served = select_int8_kernel()
    for label, art in (("ptq_int8", work / "ptq/student-int8"), ("qat_int8", work / "qat/student-int8")):
        model = load_artifact(art).model
        for kernel in dict.fromkeys([served, "torchao-dynamic"]):
            ppl[f"{label}[{kernel}]"] = perplexity(set_int8_kernel(model, kernel), tok, texts)  # type: ignore[arg-type]
    base = ppl["student_fp32"]
    return {
        "perplexity": ppl,
        "retention_vs_fp32_student": {k: base / v for k, v in ppl.items()},
        "served_kernel": served,
    }


def prepare(work: Path, teacher: Path | None, data: Path | None, env: dict[str, str]) -> None:
    pvc = work / "pvc"
    if teacher is None:
        subprocess.run(
            [sys.executable, "-P", "-m", "kdistill.trainer.teacher_pretrain", "--pvc", str(pvc)], check=True, env=env
        )
        shutil.copytree(pvc / "models/quickstart-teacher", pvc / "models/teacher", dirs_exist_ok=True)
        return
    shutil.copytree(teacher, pvc / "models/teacher", dirs_exist_ok=True)
    shutil.copytree(data or teacher.parent.parent / "data", pvc / "data", dirs_exist_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", type=Path, default=None)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/kdistill-quant-quality"))
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--qat-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS / "quant_quality.json")
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "KDISTILL_PVC_ROOT": str(work / "pvc"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    prepare(work, args.teacher, args.data, env)
    ptq = kdistill_run(
        job(
            "qq-ptq",
            {"fromTeacher": {"numLayers": 2}},
            [{"name": "output", "steps": args.distill_steps, "objectives": ["logits"]}],
            {"mode": "ptq-int8"},
            1e-3,
            args.batch_size,
        ),
        work,
        work / "ptq",
        env,
    )
    shutil.copytree(work / "ptq/student", work / "pvc/models/student-fp32", dirs_exist_ok=True)
    qat = kdistill_run(
        job(
            "qq-qat",
            {"model": "pvc://models/student-fp32"},
            [{"name": "output", "steps": 1, "objectives": ["logits"]}],
            {"mode": "qat-int8", "qatSteps": args.qat_steps, "reducedPrecisionFraction": 0.25},
            2e-4,
            args.batch_size,
        ),
        work,
        work / "qat",
        env,
    )
    texts = [
        json.loads(line)["text"]
        for line in (work / "pvc/data/pydoc-eval.jsonl").read_text().splitlines()
        if line.strip()
    ]
    report: dict[str, Any] = {
        "command": command_line(),
        "distill_steps": args.distill_steps,
        "qat_steps": args.qat_steps,
        "eval_texts": len(texts),
        **evaluate_all(work, texts),
        "runner_results": {
            "ptq": {k: ptq.get(k) for k in ("fullPrecision", "int8", "steps", "benchSeconds")},
            "qat": {k: qat.get(k) for k in ("fullPrecision", "int8", "steps", "benchSeconds")},
        },
        "target": {"qat_retention": 0.99},
    }
    served = report["served_kernel"]
    report["met"] = {"qat_retention": report["retention_vs_fp32_student"][f"qat_int8[{served}]"] >= 0.99}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'model':40} {'eval ppl':>9} {'retention vs fp32 student':>26}")
    for name, value in report["perplexity"].items():
        print(f"{name:40} {value:9.2f} {report['retention_vs_fp32_student'][name]:26.4f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
