"""Trainer throughput: kdistill against the KD loop a competent engineer writes by hand, on the
same models, batch, steps, corpus, optimizer, clipping and threads, on packed and on
natural-length data.

The baseline loop (``run_baseline``):
- tokenizes the whole corpus once and collates every batch before the timed loop;
- groups batches by length (a seeded shuffle cut into windows of 32 batches, each window sorted
  by length and cut into batches, the batches then shuffled), so little is padding;
- runs the teacher under ``torch.inference_mode()``;
- computes KL(T)·T² + CE over every valid position, mixed with alpha, AdamW (weight decay 0.01),
  gradient clipping at 1.0;
- runs with the same ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` as kdistill.

Variants, each in its own process (so peak RSS and compiled code are its own):
- ``baseline``: the loop above;
- ``kdistill``: ``Trainer.train()`` with the live teacher;
- ``kdistill-cache-fill``: the teacher cache enabled and empty (every batch: teacher forward,
  top-k, store);
- ``kdistill-cache-seen``: the cache filled beforehand by the same job (not timed), so every
  batch is read from it and the teacher never runs.
Every variant runs ``--warmup`` steps first (compilation happens there); tokens/s counts the
``--steps`` steps after them, wall clock from the end of the last warm-up step to the end of the
last step. The warm-up's seconds are reported beside it (``warmup_seconds``), and the compile
cache is kept in the work directory, so the first run of each variant is the cold compile and
later runs read the cache.

Rounds: every round runs every variant once, in an order rotated by one each round; the load
average (1, 5, 15 min) is recorded before each variant. Reported: per-variant medians over the
rounds and speedup = median tokens/s / median baseline tokens/s.

    .venv/bin/python -P benchmarks/trainer_throughput.py [--data packed natural] [--rounds 3]
        [--steps 30] [--warmup 5] [--batch 16] [--top-k 1024] [--threads 1]

Writes benchmarks/results/trainer_throughput.json (``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import RESULTS, machine_state, write_report  # noqa: E402

MAX_LEN = 128
TEMPERATURE = 2.0
ALPHA = 0.7
LEARNING_RATE = 5e-4
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
SEED = 0
TEACHER = {"layers": 8, "width": 128, "heads": 4}
STUDENT_LAYERS = 2  # copied from the teacher
VOCAB = 2048
WINDOW_BATCHES = 32
VARIANTS = ("baseline", "kdistill", "kdistill-cache-fill", "kdistill-cache-seen")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(work: Path, data: str) -> None:
    """Corpus, tokenizer and a GPT2 teacher (random weights: throughput does not depend on them)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdistill.trainer.corpus import build_pydoc_corpus
    from kdistill.trainer.data import read_jsonl
    from kdistill.trainer.tokenizer_build import build_tokenizer

    # packed: runs of paragraphs up to 600 characters (~128 tokens: nearly every example fills
    # max_len); natural: max_chars == min_chars puts every paragraph on its own line.
    max_chars = 600 if data == "packed" else 20
    train, _ = build_pydoc_corpus(work / "data", max_chars=max_chars, min_chars=20)
    rows = read_jsonl(train, text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.0)
    tok = build_tokenizer([r.text for r in rows], VOCAB, work / "teacher")
    torch.manual_seed(SEED)
    teacher = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=MAX_LEN,
            n_embd=TEACHER["width"],
            n_layer=TEACHER["layers"],
            n_head=TEACHER["heads"],
            pad_token_id=tok.pad_token_id,
        )
    )
    teacher.save_pretrained(str(work / "teacher"))


def job(work: Path, total_steps: int, batch: int, cache: bool, top_k: int) -> dict[str, Any]:
    return {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "bench"},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": str(work / "teacher"), "dtype": "float32"},
            "student": {"fromTeacher": {"numLayers": STUDENT_LAYERS}},
            "data": {"train": str(work / "data" / "train.jsonl"), "maxSeqLength": MAX_LEN},
            "distillation": {
                "loss": "forward-kl",
                "alpha": ALPHA,
                "temperature": {"schedule": "constant", "start": TEMPERATURE, "end": TEMPERATURE},
                "stages": [{"name": "output", "steps": total_steps, "objectives": ["logits"]}],
                "batchSize": batch,
                "learningRate": LEARNING_RATE,
                "weightDecay": WEIGHT_DECAY,
                "maxGradNorm": MAX_GRAD_NORM,
                "warmupSteps": 0,
                "seed": SEED,
                "teacherCache": {"enabled": cache, "topK": top_k},
            },
            "quantization": {"mode": "none"},
            "parallelism": {"nodes": 1, "gpusPerNode": 0},
            "checkpoint": {"everySteps": 1_000_000, "keep": 1},
            "serving": {"enabled": False},
        },
    }


# ---- kdistill ------------------------------------------------------------------------------------
def run_kdistill(work: Path, out: Path, steps: int, warmup: int, batch: int, cache: bool, top_k: int) -> dict[str, Any]:
    from kdistill.api import parse_job
    from kdistill.trainer.loop import RunOptions, Trainer
    from kdistill.trainer.outputs import OutputLayout

    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # never resume; a filled cache stays
    marks: list[tuple[float, int]] = []
    holder: list[Any] = []

    def on_step(_report: Any) -> None:
        marks.append((time.perf_counter(), holder[0].tokens_seen))

    setup_started = time.perf_counter()
    trainer = Trainer(
        parse_job(job(work, warmup + steps, batch, cache, top_k)),
        RunOptions(output=OutputLayout(out), base_dir=work, evaluate=False, on_step=on_step),
    )
    holder.append(trainer)
    started = time.perf_counter()
    trainer.train()
    (t0, n0), (t1, n1) = marks[warmup - 1], marks[-1]
    return {
        "tokens": n1 - n0,
        "seconds": t1 - t0,
        "warmup_seconds": t0 - started,
        "setup_seconds": started - setup_started,
    }


# ---- the competent hand-written loop -------------------------------------------------------------
def length_grouped_batches(lengths: list[int], batch: int, count: int, seed: int) -> list[list[int]]:
    """``count`` batches of example positions, grouped by length: each pass over the data is a
    seeded shuffle cut into windows of ``WINDOW_BATCHES`` batches; a window is sorted by length
    and cut into batches, and the batches of a window are shuffled."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(lengths)
    out: list[list[int]] = []
    while len(out) < count:
        perm = rng.permutation(len(lens))
        for w in range(0, len(perm) - batch + 1, batch * WINDOW_BATCHES):
            window = perm[w : w + batch * WINDOW_BATCHES]
            window = window[np.argsort(lens[window], kind="stable")]
            batches = [window[i : i + batch].tolist() for i in range(0, len(window) - batch + 1, batch)]
            out.extend(batches[i] for i in rng.permutation(len(batches)))
    return out[:count]


def run_baseline(work: Path, steps: int, warmup: int, batch: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.api import parse_job
    from kdistill.trainer.models import load_models

    setup_started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(work / "teacher"))
    teacher = AutoModelForCausalLM.from_pretrained(str(work / "teacher")).eval()
    # The same student kdistill starts from (the teacher's layers copied, as load_models does).
    student = load_models(parse_job(job(work, steps, batch, False, 1)).spec, work).student.train()
    texts = [json.loads(line)["text"] for line in (work / "data" / "train.jsonl").read_text().splitlines()]
    ids = tok(texts, truncation=True, max_length=MAX_LEN)["input_ids"]
    pad = tok.pad_token_id
    order = length_grouped_batches([len(x) for x in ids], batch, warmup + steps, SEED)
    batches = []
    for positions in order:
        longest = max(len(ids[p]) for p in positions)
        b_ids = torch.full((batch, longest), pad, dtype=torch.long)
        b_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, p in enumerate(positions):
            b_ids[row, : len(ids[p])] = torch.tensor(ids[p])
            b_mask[row, : len(ids[p])] = 1
        batches.append((b_ids, b_mask))
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE
    )
    tokens = slots = 0
    started = time.perf_counter()
    t0 = started
    for step, (b_ids, b_mask) in enumerate(batches):
        if step == warmup:
            t0 = time.perf_counter()
            tokens = slots = 0
        with torch.inference_mode():
            t_logits = teacher(input_ids=b_ids, attention_mask=b_mask).logits
        t_logits = t_logits.clone()  # inference tensors cannot enter the loss's graph
        s_logits = student(input_ids=b_ids, attention_mask=b_mask).logits
        s, t = s_logits[:, :-1], t_logits[:, :-1]
        valid = b_mask[:, 1:].float()
        kl = (
            F.kl_div(
                F.log_softmax(s / TEMPERATURE, -1),
                F.log_softmax(t / TEMPERATURE, -1),
                log_target=True,
                reduction="none",
            ).sum(-1)
            * TEMPERATURE**2
        )
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), b_ids[:, 1:].reshape(-1), reduction="none").view_as(kl)
        loss = ((ALPHA * kl + (1 - ALPHA) * ce) * valid).sum() / valid.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b_mask.sum())
        slots += b_mask.numel()
    end = time.perf_counter()
    return {
        "tokens": tokens,
        "seconds": end - t0,
        "warmup_seconds": t0 - started,
        "setup_seconds": started - setup_started,
        "padding_fraction": 1 - tokens / slots,
    }


# ---- one variant, in its own process -------------------------------------------------------------
def variant_main(args: argparse.Namespace) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    work = Path(args.work)
    if args.variant == "baseline":
        r = run_baseline(work, args.steps, args.warmup, args.batch)
    else:
        cache = args.variant != "kdistill"
        out = work / ("kd-seen" if args.variant in ("kdistill-cache-seen", "prefill") else "kd-out")
        if args.variant in ("kdistill", "kdistill-cache-fill"):
            shutil.rmtree(out, ignore_errors=True)
        r = run_kdistill(work, out, args.steps, args.warmup, args.batch, cache, args.top_k)
    r["tokens_per_second"] = r["tokens"] / r["seconds"]
    r["peak_rss_mib"] = peak_rss_mib()
    r["torch_threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(r), flush=True)


def run_variant(variant: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-P",
        __file__,
        "--variant",
        variant,
        "--work",
        str(work),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--top-k",
        str(args.top_k),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-cache"))
    load = os.getloadavg()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.stderr.write(out.stdout[-2000:] + out.stderr[-4000:])
        raise SystemExit(f"variant {variant} failed ({out.returncode})")
    result = json.loads(line[0][len("RESULT ") :])
    result["load_average_before"] = [round(x, 2) for x in load]
    result["finished_utc"] = time.strftime("%H:%M:%S", time.gmtime())
    return result


def measure(args: argparse.Namespace, data: str) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-") as tmp:
        work = Path(tmp)
        prepare(work, data)
        # The cache for "seen": the same job run once, untimed (its warm-up is the cold compile).
        prefill = run_variant("prefill", work, args)
        rounds: list[dict[str, dict[str, Any]]] = []
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            results = {v: run_variant(v, work, args) for v in order}
            base = results["baseline"]["tokens_per_second"]
            for res in results.values():
                res["speedup_in_round"] = res["tokens_per_second"] / base
            rounds.append({"order": list(order), "results": results})  # type: ignore[dict-item]
            print(
                f"{data} round {r + 1}: "
                + ", ".join(
                    f"{v} {results[v]['tokens_per_second']:.0f} tok/s ({results[v]['speedup_in_round']:.2f}x, "
                    f"load {results[v]['load_average_before'][0]})"
                    for v in order
                ),
                flush=True,
            )
    median = {}
    for v in VARIANTS:
        runs = [rd["results"][v] for rd in rounds]  # type: ignore[index]
        median[v] = {
            "tokens_per_second": statistics.median(x["tokens_per_second"] for x in runs),
            "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in runs),
            "warmup_seconds_first_run": runs[0]["warmup_seconds"],
            "warmup_seconds_median": statistics.median(x["warmup_seconds"] for x in runs),
            "speedup_per_round": [round(x["speedup_in_round"], 3) for x in runs],
            "load_average_1min_per_round": [x["load_average_before"][0] for x in runs],
        }
        if "padding_fraction" in runs[0]:
            median[v]["padding_fraction"] = statistics.median(x["padding_fraction"] for x in runs)
    base = median["baseline"]["tokens_per_second"]
    for v in VARIANTS:
        median[v]["speedup"] = median[v]["tokens_per_second"] / base
    return {
        "data": data,
        "started_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prefill": prefill,
        "median": median,
        "rounds": rounds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", choices=("packed", "natural"), default=["packed", "natural"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--top-k", type=int, default=1024, help="teacherCache.topK of the cache variants")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and torch threads of every variant")
    p.add_argument("--out", type=Path, default=RESULTS / "trainer_throughput.json")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        variant_main(args)
        return
    targets = {"kdistill": 1.3, "kdistill-cache-seen": 2.5}
    command = "python -P benchmarks/trainer_throughput.py " + shlex.join(sys.argv[1:])
    before = machine_state()
    rows = [measure(args, data) for data in args.data]
    for row in rows:
        row["meets_targets"] = {v: row["median"][v]["speedup"] >= t for v, t in targets.items()}
    report = {
        "benchmark": "trainer_throughput",
        "command": command.strip(),
        "config": {
            "max_len": MAX_LEN,
            "vocab": VOCAB,
            "teacher": TEACHER,
            "student_layers_copied": STUDENT_LAYERS,
            "batch": args.batch,
            "steps_timed": args.steps,
            "warmup_steps": args.warmup,
            "rounds": args.rounds,
            "threads": args.threads,
            "temperature": TEMPERATURE,
            "alpha": ALPHA,
            "cache_top_k": args.top_k,
        },
        "machine_before": before,
        "machine_after": machine_state(),
        "targets": targets,
        "rows": rows,
    }
    write_report(report, args.out)
    print(f"{'data':<9}{'variant':<22}{'tokens/s':>10}{'speedup':>9}{'per round':>24}{'load 1m':>20}{'warmup s':>10}")
    for row in rows:
        for v, m in row["median"].items():
            print(
                f"{row['data']:<9}{v:<22}{m['tokens_per_second']:>10.0f}{m['speedup']:>8.2f}x"
                f"{m['speedup_per_round']!s:>24}{m['load_average_1min_per_round']!s:>20}"
                f"{m['warmup_seconds_first_run']:>10.1f}"
            )
        print(f"{row['data']}: meets {row['meets_targets']}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
