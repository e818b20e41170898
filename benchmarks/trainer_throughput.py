"""Trainer throughput: kdistill's loop against a plain PyTorch KD loop on the same models, batch and
steps, with and without the teacher cache (on data already seen), plus peak RSS of each.

The baseline is what one writes by hand: random batches padded to their longest example, teacher
forward under no_grad, student forward and backward, KL(T) + CE over every valid position, AdamW.
Each variant runs in its own process so peak RSS is its own. Tokens are real (non-padding) tokens;
``padding_fraction`` is the share of computed positions that are padding. Both sides run with the
same OMP_NUM_THREADS (default 1) and torch thread count. Each run executes every variant side by
side; the table reports medians over ``--runs`` runs.

Rows (``--rows``; declared in docs/trainer.md before they were measured):
- ``primary``: pydoc text packed into runs of paragraphs up to 600 characters (~128 tokens, so
  nearly every example is cut to max_len and batches barely need padding); GPT2 teacher 8 layers
  x 128, student 2 of its layers copied (the previous sessions' row);
- ``natural``: the same text split at paragraph boundaries, one paragraph an example (capped at
  max_len), so lengths vary as in real corpora; same models as ``primary``;
- ``wide``: packed data as ``primary``; teacher 8 layers x 256, student 2 layers x 128 freshly
  initialised (``fromTeacher.hiddenSize``), as in DistilBERT/TinyBERT-style setups where the
  teacher is wider than its student;
- ``natural-wide``: natural data and the wide pair;
- ``packed-4``: packed data, teacher 4 layers x 128, student 2 copied (the old 4 -> 2 row).

    .venv/bin/python benchmarks/trainer_throughput.py [--steps 30] [--batch 16] [--runs 3] [--rows primary natural ...]

Writes benchmarks/results/trainer_throughput.json (rows measured earlier under other names stay
in the file; a row measured again replaces its old entry) and prints a table of every row.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "trainer_throughput.json"
MAX_LEN = 128
TEMPERATURE = 2.0
ALPHA = 0.7


@dataclass(frozen=True)
class Row:
    data: str  # "packed" | "natural"
    teacher_layers: int
    teacher_width: int
    student_layers: int
    student_width: int  # == teacher_width: layers copied; smaller: fresh init
    # teacherCache.topK. 64 is the API default; on the flat benchmark teacher only k >= 1024 keeps the
    # cached student ahead of hard labels (trainer_quality.json), so the -k1024 rows time that k.
    top_k: int = 64

    @property
    def student_init(self) -> str:
        return "copied" if self.student_width == self.teacher_width else "fresh"


ROWS = {
    "primary": Row("packed", 8, 128, 2, 128),
    "natural": Row("natural", 8, 128, 2, 128),
    "wide": Row("packed", 8, 256, 2, 128),
    "natural-wide": Row("natural", 8, 256, 2, 128),
    "packed-4": Row("packed", 4, 128, 2, 128),
    "natural-k1024": Row("natural", 8, 128, 2, 128, top_k=1024),
    "wide-k1024": Row("packed", 8, 256, 2, 128, top_k=1024),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(work: Path, row: Row) -> None:
    """Corpus, tokenizer and a GPT2 teacher (random weights: throughput does not depend on them)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdistill.trainer.corpus import build_pydoc_corpus
    from kdistill.trainer.data import read_jsonl
    from kdistill.trainer.tokenizer_build import build_tokenizer

    # packed: runs of paragraphs up to 600 characters; natural: max_chars == min_chars puts every
    # paragraph (>= 20 characters) on its own line, whatever its length.
    max_chars = 600 if row.data == "packed" else 20
    train, _ = build_pydoc_corpus(work / "data", max_chars=max_chars, min_chars=20)
    rows = read_jsonl(train, text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.0)
    tok = build_tokenizer([r.text for r in rows], 2048, work / "teacher")
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=MAX_LEN,
            n_embd=row.teacher_width,
            n_layer=row.teacher_layers,
            n_head=4,
            pad_token_id=tok.pad_token_id,
        )
    )
    teacher.save_pretrained(str(work / "teacher"))


def job(work: Path, steps: int, batch: int, cache: bool, student_width: int | None, top_k: int = 64) -> dict[str, Any]:
    from_teacher: dict[str, Any] = {"numLayers": 2}
    if student_width is not None:
        from_teacher["hiddenSize"] = student_width
    return {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "bench"},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": str(work / "teacher"), "dtype": "float32"},
            "student": {"fromTeacher": from_teacher},
            "data": {"train": str(work / "data" / "train.jsonl"), "maxSeqLength": MAX_LEN},
            "distillation": {
                "loss": "forward-kl",
                "alpha": ALPHA,
                "temperature": {"schedule": "constant", "start": TEMPERATURE, "end": TEMPERATURE},
                "stages": [{"name": "output", "steps": steps, "objectives": ["logits"]}],
                "batchSize": batch,
                "learningRate": 5e-4,
                "warmupSteps": 0,
                "teacherCache": {"enabled": cache, "topK": top_k},
            },
            "quantization": {"mode": "none"},
            "parallelism": {"nodes": 1, "gpusPerNode": 0},
            "checkpoint": {"everySteps": 1_000_000, "keep": 1},
            "serving": {"enabled": False},
        },
    }


def run_kdistill(
    work: Path, steps: int, batch: int, cache: str, student_width: int | None, top_k: int = 64
) -> dict[str, Any]:
    from kdistill.api import parse_job
    from kdistill.trainer.loop import RunOptions, Trainer
    from kdistill.trainer.outputs import OutputLayout

    out = work / "kd-out"
    if cache != "seen":
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # never resume; keep the cache when "seen"
    trainer = Trainer(
        parse_job(job(work, steps, batch, cache != "off", student_width, top_k)),
        RunOptions(output=OutputLayout(out), base_dir=work, evaluate=False),
    )
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


def run_baseline(work: Path, steps: int, batch: int, student_width: int | None) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.api import parse_job
    from kdistill.trainer.models import load_models

    tok = AutoTokenizer.from_pretrained(str(work / "teacher"))
    teacher = AutoModelForCausalLM.from_pretrained(str(work / "teacher")).eval()
    # The same student kdistill starts from (layers copied from the teacher, or the same seeded
    # fresh init when it is narrower).
    student = load_models(parse_job(job(work, steps, batch, False, student_width)).spec, work).student.train()
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
        kl = (
            F.kl_div(
                F.log_softmax(s / TEMPERATURE, -1),
                F.log_softmax(t / TEMPERATURE, -1),
                log_target=True,
                reduction="none",
            ).sum(-1)
            * TEMPERATURE**2
        )
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
    width = args.student_width or None
    if args.variant == "baseline":
        r = run_baseline(work, args.steps, args.batch, width)
    else:
        cache = {"kdistill": "off", "kdistill-cache-fill": "fill", "kdistill-cache-seen": "seen"}[args.variant]
        r = run_kdistill(work, args.steps, args.batch, cache, width, args.top_k)
    r["tokens_per_second"] = r["tokens"] / r["seconds"]
    r["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(r), flush=True)


VARIANTS = ("baseline", "kdistill", "kdistill-cache-fill", "kdistill-cache-seen")


def one_run(work: Path, steps: int, batch: int, row: Row) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    width = row.student_width if row.student_init == "fresh" else 0
    for variant in VARIANTS:
        cmd = [
            sys.executable,
            "-P",
            __file__,
            "--variant",
            variant,
            "--work",
            str(work),
            "--steps",
            str(steps),
            "--batch",
            str(batch),
            "--student-width",
            str(width),
            "--top-k",
            str(row.top_k),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(f"variant {variant} failed ({out.returncode})")
        results[variant] = json.loads(line[0][len("RESULT ") :])
    base = results["baseline"]["tokens_per_second"]
    for r in results.values():
        r["speedup_vs_baseline"] = r["tokens_per_second"] / base
    return results


def measure_row(args: argparse.Namespace, name: str) -> dict[str, Any]:
    row = ROWS[name]
    runs, loads = [], []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-") as tmp:
        work = Path(tmp)
        prepare(work, row)
        for i in range(args.runs):
            loads.append(os.getloadavg())
            runs.append(one_run(work, args.steps, args.batch, row))
            print(
                f"{name} run {i + 1}: "
                + ", ".join(f"{v} {r['speedup_vs_baseline']:.2f}x" for v, r in runs[-1].items()),
                flush=True,
            )
    median = {v: {key: statistics.median(r[v][key] for r in runs) for key in runs[0][v]} for v in VARIANTS}
    return {
        "name": name,
        **asdict(row),
        "student_init": row.student_init,
        "steps": args.steps,
        "batch": args.batch,
        "runs_count": args.runs,
        "started_utc": started,
        "median": median,
        "runs": runs,
        "load_average_before_each_run": loads,
        "load_average_after": os.getloadavg(),
    }


def meets(row: dict[str, Any], targets: dict[str, float]) -> dict[str, bool]:
    m = row["median"]
    return {
        "kdistill_vs_baseline": m["kdistill"]["speedup_vs_baseline"] >= targets["kdistill_vs_baseline"],
        "cache_seen_vs_baseline": m["kdistill-cache-seen"]["speedup_vs_baseline"] >= targets["cache_seen_vs_baseline"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--rows",
        nargs="+",
        choices=sorted(ROWS),
        default=["primary"],
        help="rows to measure; other rows already in the result file are kept",
    )
    p.add_argument("--student-width", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--top-k", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        variant_main(args)
        return
    threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    targets = {"kdistill_vs_baseline": 1.3, "cache_seen_vs_baseline": 2.5}
    measured = []
    for name in args.rows:
        measured.append(measure_row(args, name))
        measured[-1]["meets_targets"] = meets(measured[-1], targets)
    # Rows measured earlier (in this format) stay; a row measured again replaces its entry.
    previous: list[dict[str, Any]] = []
    if RESULT.exists():
        old = json.loads(RESULT.read_text())
        previous = [r for r in old.get("rows", []) if "name" in r]
    names = {r["name"] for r in measured}
    rows = [r for r in previous if r["name"] not in names] + measured
    rows.sort(key=lambda r: list(ROWS).index(r["name"]))
    body = {
        "benchmark": "trainer_throughput",
        "config": {
            "max_len": MAX_LEN,
            "vocab": 2048,
            "omp_threads": threads,
            "torch_threads": threads,
            "temperature": TEMPERATURE,
            "alpha": ALPHA,
            "top_k": "per row (row.top_k)",
        },
        "rows": rows,
        "targets": targets,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(body, indent=2) + "\n")
    print(
        f"{'row':<14}{'teacher->student':<22}{'variant':<22}{'tokens/s':>10}{'speedup':>9}{'padding':>9}"
        f"{'peak RSS MiB':>14}"
    )
    for row in rows:
        pair = f"{row['teacher_layers']}x{row['teacher_width']} -> {row['student_layers']}x{row['student_width']}"
        for name, r in row["median"].items():
            print(
                f"{row['name']:<14}{pair:<22}{name:<22}{r['tokens_per_second']:>10.0f}"
                f"{r['speedup_vs_baseline']:>8.2f}x{r['padding_fraction']:>8.1%}{r['peak_rss_mib']:>14.0f}"
            )
    for row in rows:
        print(
            f"{row['name']}: {row['data']} data, medians of {row['runs_count']} runs from {row['started_utc']}, "
            f"load before runs {[round(x[0], 2) for x in row['load_average_before_each_run']]}, "
            f"meets {row['meets_targets']}"
        )


if __name__ == "__main__":
    main()
