"""Trainer throughput: kdistill's loop against a plain PyTorch KD loop on the same models, batch and
steps, with and without the teacher cache (on data already seen), plus peak RSS of each.

The baseline is what one writes by hand: random batches padded to their longest example, teacher
forward under no_grad, student forward and backward, KL(T) + CE over every position, AdamW.
Each variant runs in its own process so peak RSS is its own. Tokens are real (non-padding) tokens;
``padding_fraction`` is the share of computed positions that are padding. Both sides run with the
same OMP_NUM_THREADS (default 1) and torch thread count. Each run executes every variant side by
side; the table reports medians over ``--runs`` runs. The primary configuration is a student with a
quarter of its teacher's layers (8 -> 2); ``--teacher-layers 8 4`` adds the 4 -> 2 row.

    .venv/bin/python benchmarks/trainer_throughput.py [--steps 30] [--batch 16] [--runs 3] [--teacher-layers 8 4]

Writes benchmarks/results/trainer_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "trainer_throughput.json"
MAX_LEN = 128
TEMPERATURE = 2.0
ALPHA = 0.7


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(work: Path, teacher_layers: int, width: int) -> None:
    """Corpus, tokenizer and a GPT2 teacher (random weights: throughput does not depend on them)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdistill.trainer.corpus import build_pydoc_corpus
    from kdistill.trainer.data import read_jsonl
    from kdistill.trainer.tokenizer_build import build_tokenizer

    train, _ = build_pydoc_corpus(work / "data")
    rows = read_jsonl(train, text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.0)
    tok = build_tokenizer([r.text for r in rows], 2048, work / "teacher")
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=MAX_LEN, n_embd=width,
                                         n_layer=teacher_layers, n_head=4, pad_token_id=tok.pad_token_id))
    teacher.save_pretrained(str(work / "teacher"))


def job(work: Path, steps: int, batch: int, cache: bool) -> dict[str, Any]:
    return {
        "apiVersion": "kdistill.io/v1alpha1", "kind": "DistillationJob", "metadata": {"name": "bench"},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": str(work / "teacher"), "dtype": "float32"},
            "student": {"fromTeacher": {"numLayers": 2}},
            "data": {"train": str(work / "data" / "train.jsonl"), "maxSeqLength": MAX_LEN},
            "distillation": {
                "loss": "forward-kl", "alpha": ALPHA,
                "temperature": {"schedule": "constant", "start": TEMPERATURE, "end": TEMPERATURE},
                "stages": [{"name": "output", "steps": steps, "objectives": ["logits"]}],
                "batchSize": batch, "learningRate": 5e-4, "warmupSteps": 0,
                "teacherCache": {"enabled": cache, "topK": 64},
            },
            "quantization": {"mode": "none"},
            "parallelism": {"nodes": 1, "gpusPerNode": 0},
            "checkpoint": {"everySteps": 1_000_000, "keep": 1},
            "serving": {"enabled": False},
        },
    }


def run_kdistill(work: Path, steps: int, batch: int, cache: str) -> dict[str, Any]:
    from kdistill.api import parse_job
    from kdistill.trainer.loop import RunOptions, Trainer
    from kdistill.trainer.outputs import OutputLayout

    out = work / "kd-out"
    if cache != "seen":
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # never resume; keep the cache when "seen"
    trainer = Trainer(parse_job(job(work, steps, batch, cache != "off")),
                      RunOptions(output=OutputLayout(out), base_dir=work, evaluate=False))
    slots = [0]
    collate = trainer._collate

    def counting_collate(*a: Any, **kw: Any) -> dict[str, Any]:
        batch_ = collate(*a, **kw)
        slots[0] += batch_["attention_mask"].numel()
        return batch_

    trainer._collate = counting_collate  # measurement only: counts the positions computed
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"tokens": trainer.tokens_seen, "seconds": seconds, "padding_fraction": 1 - trainer.tokens_seen / slots[0]}


def run_baseline(work: Path, steps: int, batch: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.api import parse_job
    from kdistill.trainer.models import load_models

    tok = AutoTokenizer.from_pretrained(str(work / "teacher"))
    teacher = AutoModelForCausalLM.from_pretrained(str(work / "teacher")).eval()
    # The same student kdistill starts from (layers copied from the teacher).
    student = load_models(parse_job(job(work, steps, batch, False)).spec, work).student.train()
    texts = [json.loads(line)["text"] for line in (work / "data" / "train.jsonl").read_text().splitlines()]
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    tokens = slots = 0
    started = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(texts), (batch,), generator=g).tolist()
        enc = tok([texts[i] for i in idx], truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits
        s_logits = student(input_ids=ids, attention_mask=mask).logits
        s, t = s_logits[:, :-1], t_logits[:, :-1]
        valid = mask[:, 1:].float()
        kl = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1), log_target=True,
                      reduction="none").sum(-1) * TEMPERATURE**2
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view_as(kl)
        loss = ((ALPHA * kl + (1 - ALPHA) * ce) * valid).sum() / valid.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        slots += mask.numel()
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "padding_fraction": 1 - tokens / slots}


def variant_main(args: argparse.Namespace) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    work = Path(args.work)
    if args.variant == "baseline":
        r = run_baseline(work, args.steps, args.batch)
    else:
        cache = {"kdistill": "off", "kdistill-cache-fill": "fill", "kdistill-cache-seen": "seen"}[args.variant]
        r = run_kdistill(work, args.steps, args.batch, cache)
    r["tokens_per_second"] = r["tokens"] / r["seconds"]
    r["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(r), flush=True)


VARIANTS = ("baseline", "kdistill", "kdistill-cache-fill", "kdistill-cache-seen")


def one_run(work: Path, steps: int, batch: int) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        cmd = [sys.executable, "-P", __file__, "--variant", variant, "--work", str(work),
               "--steps", str(steps), "--batch", str(batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(f"variant {variant} failed ({out.returncode})")
        results[variant] = json.loads(line[0][len("RESULT "):])
    base = results["baseline"]["tokens_per_second"]
    for r in results.values():
        r["speedup_vs_baseline"] = r["tokens_per_second"] / base
    return results


def config_rows(args: argparse.Namespace, teacher_layers: int) -> dict[str, Any]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-") as tmp:
        work = Path(tmp)
        prepare(work, teacher_layers, args.width)
        for i in range(args.runs):
            runs.append(one_run(work, args.steps, args.batch))
            print(f"teacher {teacher_layers} run {i + 1}: " + ", ".join(
                f"{v} {r['speedup_vs_baseline']:.2f}x" for v, r in runs[-1].items()), flush=True)
    median = {v: {key: statistics.median(r[v][key] for r in runs) for key in runs[0][v]} for v in VARIANTS}
    return {"teacher_layers": teacher_layers, "student_layers": 2, "median": median, "runs": runs,
            "load_average_after": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--teacher-layers", type=int, nargs="+", default=[8],
                   help="one row per value; the first is the primary configuration")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        variant_main(args)
        return
    threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()
    rows = [config_rows(args, n) for n in args.teacher_layers]
    body = {
        "benchmark": "trainer_throughput",
        "config": {"steps": args.steps, "batch": args.batch, "runs": args.runs, "max_len": MAX_LEN,
                   "student_layers": 2, "width": args.width, "vocab": 2048, "omp_threads": threads,
                   "torch_threads": threads, "load_average_before": load_before},
        "rows": rows,
        "targets": {"kdistill_vs_baseline": 1.3, "cache_seen_vs_baseline": 2.5},
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(body, indent=2) + "\n")
    print(f"{'teacher->student':<18}{'variant':<22}{'tokens/s':>10}{'speedup':>9}{'padding':>9}{'peak RSS MiB':>14}")
    for row in rows:
        for name, r in row["median"].items():
            print(f"{row['teacher_layers']:>2} -> 2{'':<11}{name:<22}{r['tokens_per_second']:>10.0f}"
                  f"{r['speedup_vs_baseline']:>8.2f}x{r['padding_fraction']:>8.1%}{r['peak_rss_mib']:>14.0f}")
    print(f"(medians of {args.runs} runs; load average before {load_before}, after "
          f"{[row['load_average_after'] for row in rows]}; OMP_NUM_THREADS={threads})")


if __name__ == "__main__":
    main()
