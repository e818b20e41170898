"""Distillation quality on a real corpus (Python's documentation text, pydoc_data): the distilled
student against the same student trained on hard labels only, at equal steps.

Variants (same 2-layer GPT2 student shape, same data order, batch, steps, LR schedule):
- ``scratch-hard``: random init, hard-label CE only (alpha 0);
- ``copied-hard``: layers copied from the teacher (DistilBERT-style init), hard labels only;
- ``distilled``: the same copied init, kdistill's stages: hidden+attention transfer (1/5 of the
  steps), then logits KD (forward KL, T 4 → 1) mixed with CE (alpha 0.7);
- ``distilled-logits``: the same, logits KD on every step.
The teacher is the quickstart teacher (trained by ``make quickstart``); it is trained here if
absent. Eval perplexity on the held-out split, retention = teacher ppl / student ppl.

    .venv/bin/python benchmarks/trainer_quality.py [--steps 200] [--pvc ./pvc]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "trainer_quality.json"


def job(name: str, teacher: Path, data: Path, student: dict[str, Any], steps: int, alpha: float,
        distill: bool) -> dict[str, Any]:
    if distill:
        features = max(1, steps // 5)
        stages = [{"name": "features", "steps": features, "objectives": ["hidden", "attention"], "attentionRank": 8},
                  {"name": "output", "steps": steps - features, "objectives": ["logits"]}]
    else:
        stages = [{"name": "output", "steps": steps, "objectives": ["logits"]}]
    return {
        "apiVersion": "kdistill.io/v1alpha1", "kind": "DistillationJob", "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": str(teacher), "dtype": "float32"},
            "student": student,
            "data": {"train": str(data / "pydoc-train.jsonl"), "eval": str(data / "pydoc-eval.jsonl"),
                     "maxSeqLength": 128},
            "distillation": {
                "loss": "forward-kl", "alpha": alpha,
                "temperature": {"schedule": "linear", "start": 4.0, "end": 1.0},
                "stages": stages, "batchSize": 16, "learningRate": 1e-3, "warmupSteps": 20, "seed": 0,
            },
            "quantization": {"mode": "none"},
            "parallelism": {"nodes": 1, "gpusPerNode": 0},
            "checkpoint": {"everySteps": 1_000_000, "keep": 1},
            "serving": {"enabled": True},
        },
    }


def train_and_eval(spec: dict[str, Any], work: Path) -> tuple[float, float, float]:
    """(student ppl, teacher ppl, seconds)."""
    from kdistill.api import parse_job
    from kdistill.trainer.loop import RunOptions, Trainer
    from kdistill.trainer.outputs import OutputLayout

    out = work / spec["metadata"]["name"]
    trainer = Trainer(parse_job(spec), RunOptions(output=OutputLayout(out), base_dir=work, evaluate=True))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    student = trainer.evaluate_model(trainer.student)
    teacher = trainer.evaluate_model(trainer.teacher)
    assert student is not None and teacher is not None
    return student.value, teacher.value, seconds


def scratch_student(teacher: Path, out: Path) -> Path:
    """A random-init student of the distilled student's shape, with the teacher's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(teacher))
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(teacher)).save_pretrained(str(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--pvc", type=Path, default=ROOT / "pvc")
    p.add_argument("--variants", default="scratch-hard,copied-hard,distilled,distilled-logits")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    teacher = args.pvc / "models" / "quickstart-teacher"
    data = args.pvc / "data"
    if not (teacher / "model.safetensors").is_file() or not (data / "pydoc-eval.jsonl").is_file():
        from kdistill.trainer.teacher_pretrain import PretrainConfig, pretrain

        pretrain(args.pvc, PretrainConfig(steps=300))
    pre = json.loads((teacher / "pretrain-report.json").read_text())
    copied = {"fromTeacher": {"numLayers": 2}}
    results: dict[str, Any] = {}
    teacher_ppl = None
    with tempfile.TemporaryDirectory(prefix="kdistill-quality-") as tmp:
        work = Path(tmp)
        variants = {
            "scratch-hard": lambda: job("scratch-hard", teacher, data,
                                        {"model": str(scratch_student(teacher, work / "scratch-init"))},
                                        args.steps, 0.0, False),
            "copied-hard": lambda: job("copied-hard", teacher, data, copied, args.steps, 0.0, False),
            "distilled": lambda: job("distilled", teacher, data, copied, args.steps, 0.7, True),
            # Logits KD only: every step on the output distribution (no feature stage).
            "distilled-logits": lambda: job("distilled-logits", teacher, data, copied, args.steps, 0.7, False),
        }
        for name in args.variants.split(","):
            ppl, teacher_ppl, seconds = train_and_eval(variants[name](), work)
            results[name] = {"eval_perplexity": ppl, "retention": teacher_ppl / ppl, "train_seconds": round(seconds, 1)}
            print(json.dumps({"variant": name, **results[name]}), flush=True)
    best_hard = min(r["eval_perplexity"] for n, r in results.items() if n.endswith("-hard"))
    body = {
        "benchmark": "trainer_quality",
        "config": {"steps": args.steps, "batch": 16, "max_len": 128, "student_layers": 2,
                   "omp_threads": os.environ["OMP_NUM_THREADS"], "load_average": os.getloadavg()},
        "teacher": {"eval_perplexity": teacher_ppl, "unigram_perplexity": pre["unigram_perplexity"]},
        "results": results,
        "distilled_wins": min(r["eval_perplexity"] for n, r in results.items() if n.startswith("distilled"))
        < best_hard,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(body, indent=2) + "\n")
    print(f"{'model':<16}{'eval ppl':>10}{'retention':>11}")
    print(f"{'teacher':<16}{teacher_ppl:>10.1f}{1.0:>11.3f}")
    print(f"{'unigram':<16}{pre['unigram_perplexity']:>10.1f}{'-':>11}")
    for name, r in results.items():
        print(f"{name:<16}{r['eval_perplexity']:>10.1f}{r['retention']:>11.3f}")
    print(f"distilled wins: {body['distilled_wins']}")


if __name__ == "__main__":
    main()
