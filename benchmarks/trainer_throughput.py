"""Trainer throughput: kdistill against the KD loop a competent engineer writes by hand, on the
same models, batch, steps, corpus, optimizer, clipping and threads, on packed and on
natural-length data.

The baseline loop (``run_baseline``):
- tokenizes the whole corpus once and collates every batch before the timed loop;
- groups batches by length (a seeded shuffle cut into windows of 32 batches, each window sorted
  by length and cut into batches, the batches then shuffled), so little is padding; it takes
  them from kdistill's own sampler with the same seed, so both sides train on exactly the same
  examples at every step (same tokens a step);
- runs the teacher under ``torch.inference_mode()``;
- computes KL(T)·T² + CE over every valid position, mixed with alpha, AdamW (weight decay 0.01),
  gradient clipping at 1.0;
- runs with the same ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` as kdistill.

Variants, each in its own process (so peak RSS and compiled code are its own):
- ``baseline``: the loop above;
- ``baseline-compiled``: the same loop with ``torch.compile`` of the teacher, the student and the
  loss function (default settings), the comparison for kdistill's compiled models;
- ``kdistill``: ``Trainer.train()`` with the live teacher;
- ``kdistill-compiled``: the same with ``KDISTILL_COMPILE=1`` whatever ``--compile`` says;
- ``kdistill-cache-fill``: the teacher cache enabled and empty (every batch: teacher forward,
  top-k, store);
- ``kdistill-cache-seen``: the cache filled beforehand by the same job (not timed), so every
  batch is read from it and the teacher never runs.
The kdistill variants run with the trainer's default, eager (``--compile 1`` sets
``KDISTILL_COMPILE=1`` for all of them); ``kdistill-compiled`` compiles the fused loss's chunk
function and the teacher's and student's backbones (trainer/compile.py). One inductor cache serves
the whole invocation and is empty at its start, so the first run that compiles a graph pays the
cold compile (in its ``warmup_seconds``).
``step_ms`` times each part of a step (teacher, student forward, head + loss, backward, clip,
optimizer, data; ``other``: the rest of the loop) with timers around the calls.

Every variant runs ``--warmup`` steps first (compilation happens there); tokens/s counts the
``--steps`` steps after them, wall clock from the end of the last warm-up step to the end of the
last step. The warm-up's seconds are reported beside it (``warmup_seconds``).

Rounds: every round runs every variant once, in an order rotated by one each round; the load
average (1, 5, 15 min) is recorded before each variant. Reported: per-variant medians over the
rounds and speedup = median tokens/s / median tokens/s of the stronger baseline (eager or
compiled, whichever is faster; ``reference_baseline``), with the speedup against each in
``speedup_vs``.

    .venv/bin/python -P benchmarks/trainer_throughput.py [--data packed natural] [--rounds 3]
        [--steps 30] [--warmup 5] [--batch 16] [--top-k 1024] [--threads 1]

Writes benchmarks/results/trainer_throughput.json (``--out``) and prints the table.
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
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import RESULTS, command_line, machine_state, write_report  # noqa: E402

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
VARIANTS = (
    "baseline",
    "baseline-compiled",
    "kdistill",
    "kdistill-compiled",
    "kdistill-cache-fill",
    "kdistill-cache-seen",
)
BASELINES = ("baseline", "baseline-compiled")


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


class Sections:
    """Wall time of a step's parts (ms, summed over the timed steps): where a step's time goes."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[name] += (time.perf_counter() - started) * 1000

        return timed

    def per_step(self, steps: int, seconds: float) -> dict[str, float]:
        out = {k: round(v / steps, 1) for k, v in self.ms.items()}
        out["total"] = round(seconds * 1000 / steps, 1)
        out["other"] = round(out["total"] - sum(v for k, v in out.items() if k != "total"), 1)
        return out


def time_kdistill_sections(trainer: Any, sections: Sections) -> None:
    """Timers around the kdistill step's parts (none of them nests in another)."""
    import torch

    from kdistill.trainer import packed_step

    trainer._next_batch = sections.wrap("data", trainer._next_batch)
    step = getattr(trainer.flow, "packed", None)
    if step is not None:
        step._teacher = sections.wrap("teacher", step._teacher)
        step.student_forward = sections.wrap("student forward", step.student_forward)
        packed_step.fused_head_kd_loss = sections.wrap("head + loss", packed_step.fused_head_kd_loss)
    torch.Tensor.backward = sections.wrap("backward", torch.Tensor.backward)  # type: ignore[method-assign]
    trainer.flow.clip_grad_norm = sections.wrap("clip", trainer.flow.clip_grad_norm)
    trainer.optimizer.step = sections.wrap("optimizer", trainer.optimizer.step)


# ---- kdistill ------------------------------------------------------------------------------------
def run_kdistill(work: Path, out: Path, steps: int, warmup: int, batch: int, cache: bool, top_k: int) -> dict[str, Any]:
    from kdistill.api import parse_job
    from kdistill.trainer.loop import RunOptions, Trainer
    from kdistill.trainer.outputs import OutputLayout

    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # never resume; a filled cache stays
    marks: list[tuple[float, int]] = []
    holder: list[Any] = []

    sections = Sections()

    def on_step(_report: Any) -> None:
        marks.append((time.perf_counter(), holder[0].tokens_seen))
        sections.on = len(marks) >= warmup

    setup_started = time.perf_counter()
    trainer = Trainer(
        parse_job(job(work, warmup + steps, batch, cache, top_k)),
        RunOptions(output=OutputLayout(out), base_dir=work, evaluate=False, on_step=on_step),
    )
    holder.append(trainer)
    time_kdistill_sections(trainer, sections)
    started = time.perf_counter()
    trainer.train()
    (t0, n0), (t1, n1) = marks[warmup - 1], marks[-1]
    return {
        "tokens": n1 - n0,
        "seconds": t1 - t0,
        "warmup_seconds": t0 - started,
        "setup_seconds": started - setup_started,
        "packed": getattr(trainer.flow, "packed", None) is not None,
        "step_ms": sections.per_step(steps, t1 - t0),
    }


# ---- the competent hand-written loop -------------------------------------------------------------
def baseline_loss(s_logits: Any, t_logits: Any, b_ids: Any, b_mask: Any) -> Any:
    """KL(T)·T² + CE over every valid position, mixed with alpha."""
    import torch.nn.functional as F

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
    return ((ALPHA * kl + (1 - ALPHA) * ce) * valid).sum() / valid.sum()


def run_baseline(work: Path, steps: int, warmup: int, batch: int, compiled: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.api import parse_job
    from kdistill.trainer.models import load_models
    from kdistill.trainer.training_data import load_training_data

    setup_started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(work / "teacher"))
    teacher = AutoModelForCausalLM.from_pretrained(str(work / "teacher")).eval()
    # The same student kdistill starts from (the teacher's layers copied, as load_models does).
    student = load_models(parse_job(job(work, steps, batch, False, 1)).spec, work).student.train()
    # Tokenized once, before the timed loop. The batches are grouped by length with kdistill's own
    # sampler and seed, so both sides train on exactly the same examples at every step.
    spec = parse_job(job(work, warmup + steps, batch, False, 1)).spec
    data = load_training_data(spec, teacher, tok, work, 0)
    pad = tok.pad_token_id
    batches = []
    for _ in range(warmup + steps):
        examples = [data.train[p] for p in next(data.sampler)]
        longest = max(len(ex.input_ids) for ex in examples)
        b_ids = torch.full((batch, longest), pad, dtype=torch.long)
        b_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, ex in enumerate(examples):
            b_ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
            b_mask[row, : len(ex.input_ids)] = 1
        batches.append((b_ids, b_mask))
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE
    )
    # "baseline-compiled": what the engineer writes to compile it, torch.compile of both models
    # and of the loss (default settings: static shapes first, dynamic from the first recompile).
    t_model = torch.compile(teacher) if compiled else teacher
    s_model = torch.compile(student) if compiled else student
    loss_fn = torch.compile(baseline_loss) if compiled else baseline_loss
    tokens = slots = 0
    ms: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    t0 = started

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        ms[name] += (now - since) * 1000
        return now

    for step, (b_ids, b_mask) in enumerate(batches):
        if step == warmup:
            t0 = time.perf_counter()
            tokens = slots = 0
            ms.clear()
        mark = time.perf_counter()
        with torch.inference_mode():
            t_logits = t_model(input_ids=b_ids, attention_mask=b_mask).logits
        t_logits = t_logits.clone()  # inference tensors cannot enter the loss's graph
        mark = lap("teacher", mark)
        s_logits = s_model(input_ids=b_ids, attention_mask=b_mask).logits
        mark = lap("student forward (with head)", mark)
        loss = loss_fn(s_logits, t_logits, b_ids, b_mask)
        mark = lap("loss", mark)
        loss.backward()
        mark = lap("backward", mark)
        torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
        mark = lap("clip", mark)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lap("optimizer", mark)
        tokens += int(b_mask.sum())
        slots += b_mask.numel()
    end = time.perf_counter()
    return {
        "tokens": tokens,
        "seconds": end - t0,
        "warmup_seconds": t0 - started,
        "setup_seconds": started - setup_started,
        "padding_fraction": 1 - tokens / slots,
        "step_ms": {
            **{k: round(v / steps, 1) for k, v in ms.items()},
            "total": round((end - t0) * 1000 / steps, 1),
        },
    }


# ---- one variant, in its own process -------------------------------------------------------------
def variant_main(args: argparse.Namespace) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    work = Path(args.work)
    if args.variant in BASELINES:
        r = run_baseline(work, args.steps, args.warmup, args.batch, compiled=args.variant == "baseline-compiled")
    else:
        cache = args.variant not in ("kdistill", "kdistill-compiled")
        out = work / ("kd-seen" if args.variant in ("kdistill-cache-seen", "prefill") else "kd-out")
        if args.variant in ("kdistill", "kdistill-compiled", "kdistill-cache-fill"):
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
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        KDISTILL_COMPILE="1" if args.compile or variant == "kdistill-compiled" else "0",
        TORCHINDUCTOR_CACHE_DIR=str(args.inductor_cache),
    )
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
        variants = tuple(v for v in VARIANTS if v in args.variants)
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            results = {v: run_variant(v, work, args) for v in order}
            # Against the stronger baseline of the round (eager or compiled).
            base = max(results[b]["tokens_per_second"] for b in BASELINES)
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
    for v in variants:
        runs = [rd["results"][v] for rd in rounds]  # type: ignore[index]
        median[v] = {
            "tokens_per_second": statistics.median(x["tokens_per_second"] for x in runs),
            "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in runs),
            "warmup_seconds_first_run": runs[0]["warmup_seconds"],
            "warmup_seconds_median": statistics.median(x["warmup_seconds"] for x in runs),
            "speedup_per_round": [round(x["speedup_in_round"], 3) for x in runs],
            "load_average_1min_per_round": [x["load_average_before"][0] for x in runs],
        }
        median[v]["step_ms"] = {
            k: statistics.median(x["step_ms"].get(k, 0.0) for x in runs) for k in runs[0]["step_ms"]
        }
        if "padding_fraction" in runs[0]:
            median[v]["padding_fraction"] = statistics.median(x["padding_fraction"] for x in runs)
    # Speedups are against the stronger of the two baselines (higher median tokens/s).
    reference = max(BASELINES, key=lambda b: median[b]["tokens_per_second"])
    base = median[reference]["tokens_per_second"]
    for v in variants:
        median[v]["speedup"] = median[v]["tokens_per_second"] / base
        median[v]["speedup_vs"] = {
            b: median[v]["tokens_per_second"] / median[b]["tokens_per_second"] for b in BASELINES
        }
    return {
        "reference_baseline": reference,
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
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="which variants the rounds run (both baselines always run)",
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--top-k", type=int, default=1024, help="teacherCache.topK of the cache variants")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and torch threads of every variant")
    p.add_argument(
        "--compile",
        type=int,
        choices=(0, 1),
        default=0,
        help="KDISTILL_COMPILE of every kdistill variant (default 0, the trainer's default)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "trainer_throughput.json")
    p.add_argument("--inductor-cache", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        variant_main(args)
        return
    args.variants = sorted(set(args.variants) | set(BASELINES), key=VARIANTS.index)
    targets = {v: t for v, t in {"kdistill": 1.3, "kdistill-cache-seen": 2.5}.items() if v in args.variants}
    # One inductor cache for the whole invocation, empty at its start: the first compile is cold.
    cache_dir = Path(tempfile.mkdtemp(prefix="kdistill-inductor-"))
    args.inductor_cache = cache_dir
    before = machine_state()
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for data in args.data:
        row = measure(args, data)
        row["meets_targets"] = {v: row["median"][v]["speedup"] >= t for v, t in targets.items()}
        rows.append(row)
        report = {
            "benchmark": "trainer_throughput",
            "command": command_line(),
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
                "kdistill_compile": bool(args.compile),
                "variants": list(args.variants),
                "batches": "the same examples at every step on both sides (kdistill's length-grouped sampler, seed 0)",
            },
            "machine_before": before,
            "machine_after": machine_state(),
            "targets": targets,
            "data_measured": [r["data"] for r in rows],
            "rows": rows,
        }
        write_report(report, args.out)  # after each data set: a long run keeps what it measured
    shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"{'data':<9}{'variant':<22}{'tokens/s':>10}{'speedup':>9}{'per round':>24}{'load 1m':>20}{'warmup s':>10}")
    for row in rows:
        for v, m in row["median"].items():
            print(
                f"{row['data']:<9}{v:<22}{m['tokens_per_second']:>10.0f}{m['speedup']:>8.2f}x"
                f"{m['speedup_per_round']!s:>24}{m['load_average_1min_per_round']!s:>20}"
                f"{m['warmup_seconds_first_run']:>10.1f}"
            )
        print(f"{row['data']}: speedups against {row['reference_baseline']}; meets {row['meets_targets']}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
