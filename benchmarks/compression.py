"""Top-k gradient compression in the real trainer: loss, held-out perplexity and bytes over the run.

Two data-parallel ranks (gloo) run a quickstart-like job (the quickstart teacher, a 2-layer
student cut from it, AdamW, ``distillation.warmupSteps`` 5, global batch 8 of at most 32 tokens:
tiny, so that medians of 3 fit on two shared cores) for ``--steps`` steps on two corpora
that ship with Python: the pydoc topics (``pvc/data/pydoc-{train,eval}.jsonl``) and the standard
library's docstrings (``trainer/corpus.build_docstring_corpus``, its own held-out 5%). Each
configuration runs once per seed (the seed sets the student's init, data order and dropout); seeds,
corpora and configurations are interleaved, so load drifts hit every configuration alike.

A configuration is ``LABEL:P:WARMUP:RAMP:FREEZE[:SELECTION[:COMPRESS[:FROM[:BUDGET]]]]``: top-k fraction P
(0: plain all-reduce), WARMUP dense steps, a RAMP of steps (or ``N%`` of the run's) from FROM down to P, FREEZE (1/0)
AdamW's variance of matrices when compression starts, SELECTION (``update`` or ``magnitude``, what
top-k ranks entries by), COMPRESS (``momentum`` or ``gradient``, what top-k sends), FROM (the
fraction sent at the ramp's start, 1 for dense) and BUDGET (``byteBudget``: the share of plain
all-reduce's bytes the run may send, which sets the ramp's start when FROM is left to the
default); the spec's default where left out or ``-``.
``default`` rows use the spec's defaults (``topK`` only). Reported per corpus and configuration
(medians over seeds), against the same seed's uncompressed run:
- loss gap: mean training loss over the last 20 steps;
- held-out perplexity gap: the student's perplexity on the corpus's eval split at the end;
- bytes the hook sent against plain all-reduce, counted by the hook over the whole run (warm-up
  and ramp included).
The load average (1 min) is recorded beside every run.

    python benchmarks/compression.py [--pvc DIR] [--steps N] [--seeds S] [--configs ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import command_line
from parallel_common import ROOT, ensure_teacher, run_job, write_job

WORLD = 2
OUT = ROOT / "benchmarks" / "results" / "compression.json"
LAST = 20  # training-loss window at the end of a run
METHOD = (
    "per-tensor top-k with error feedback of each rank's momentum (compress: momentum) or gradient; "
    "1-D tensors sent whole; bfloat16 values; dense warm-up then a density ramp (25% of the steps by "
    "default) whose start is the densest that keeps the run within byteBudget (1/20 of plain "
    "all-reduce's bytes by default); AdamW's variance of matrices frozen when compression starts "
    "(freezeVariance)"
)
DEFAULT_CONFIGS = [
    "dense:0:0:0:0",
    "default-p0.01:0.01:-:-:-",
    # Tuned for quality over bytes: twice the default byte budget (10x fewer bytes), spent on the ramp.
    "budget0.1-p0.01:0.01:-:-:-:-:-:-:0.1",
    "default-p0.1:0.1:-:-:-",
]


def corpora(pvc: Path, work: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (train, eval) JSON lines."""
    from kdistill.trainer.corpus import build_docstring_corpus

    pydoc = (pvc / "data" / "pydoc-train.jsonl", pvc / "data" / "pydoc-eval.jsonl")
    held_out = [json.loads(line)["text"] for line in pydoc[1].read_text().splitlines() if line.strip()]
    everything, _ = build_docstring_corpus(work / "docstrings-all.jsonl", held_out)
    lines = [line for line in everything.read_text().splitlines() if line.strip()]
    n_eval = max(50, len(lines) // 20)
    train, evaluation = work / "docstrings-train.jsonl", work / "docstrings-eval.jsonl"
    # Every 20th line is held out: the eval split spans the whole library, not its last modules.
    evaluation.write_text("\n".join(lines[:: len(lines) // n_eval]) + "\n")
    kept = set(range(0, len(lines), len(lines) // n_eval))
    train.write_text("\n".join(line for i, line in enumerate(lines) if i not in kept) + "\n")
    return {"pydoc": pydoc, "docstrings": (train, evaluation)}


def parse_config(text: str) -> dict:
    fields = text.split(":")
    if len(fields) not in (5, 6, 7, 8, 9):
        raise SystemExit(
            f"a configuration is LABEL:P:WARMUP:RAMP:FREEZE[:SELECTION[:COMPRESS[:FROM[:BUDGET]]]], got {text!r}"
        )
    label, p, warmup, ramp, freeze = fields[:5]
    selection, compress, ramp_from, budget = [*fields[5:], "-", "-", "-", "-"][:4]
    return {
        "label": label,
        "top_k": float(p),
        "warmup": None if warmup == "-" else int(warmup),
        # A ramp given as "N%" is that share of the run's steps, rounded up.
        "ramp": None if ramp == "-" else ramp if ramp.endswith("%") else int(ramp),
        "freeze": None if freeze == "-" else freeze == "1",
        "selection": None if selection == "-" else selection,
        "compress": None if compress == "-" else compress,
        "ramp_from": None if ramp_from == "-" else float(ramp_from),
        "budget": None if budget == "-" else float(budget),
    }


def spec_fields(config: dict, steps: int) -> dict:
    """The compression fields a configuration names, by their spec names; a field left out (``-``)
    keeps the spec's default."""
    if isinstance(config["ramp"], str):
        config = {**config, "ramp": math.ceil(float(config["ramp"][:-1]) / 100 * steps)}
    names = {
        "warmup": "warmupSteps",
        "ramp": "rampSteps",
        "ramp_from": "rampFrom",
        "budget": "byteBudget",
        "freeze": "freezeVariance",
        "selection": "selection",
        "compress": "compress",
    }
    return {spec: config[key] for key, spec in names.items() if config[key] is not None}


def one_run(
    pvc: Path, data: tuple[Path, Path], config: dict, steps: int, seed: int, max_len: int, batch_size: int
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job = write_job(
            Path(tmp) / "job.yaml",
            pvc,
            world=WORLD,
            steps=steps,
            batch_size=batch_size,
            max_len=max_len,
            top_k=config["top_k"],
            seed=seed,
            train=data[0],
            eval_data=data[1],
            spec_defaults=True,
            spec_fields=spec_fields(config, steps),
        )
        started = time.time()
        retried = None
        try:
            records, comp = run_job(job, Path(tmp) / "out", WORLD, 1)
        except RuntimeError as exc:
            # A failed run is repeated once from scratch (runs are deterministic per seed) and the
            # failure is recorded with it: gloo's teardown can abort a rank after a finished run
            # ("terminate called without an active exception", trainer/parallel/distributed.shutdown).
            signs = ("terminate called", "exitcode", "Error", "error")
            retried = [line.strip() for line in str(exc).splitlines() if any(s in line for s in signs)][-12:]
            shutil.rmtree(Path(tmp) / "out", ignore_errors=True)
            records, comp = run_job(job, Path(tmp) / "out", WORLD, 1)
        metrics = json.loads((Path(tmp) / "out" / "result.json").read_text())["fullPrecision"]
    if metrics["metric"] != "perplexity":
        raise RuntimeError(f"expected a perplexity evaluation, got {metrics['metric']}")
    run = {
        "config": config["label"],
        "top_k": config["top_k"],
        "seed": seed,
        "steps": len(records),
        "loss_last": round(statistics.fmean(s["loss"] for s in records[-LAST:]), 5),
        "eval_perplexity": round(metrics["student"], 4),
        "seconds": round(time.time() - started, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if retried is not None:
        run["retried_after_failure"] = retried
    if comp:
        run.update({"hook_bytes_ratio": comp[-1]["ratio"], "bytes_sent": comp[-1]["bytes_sent"]})
    return run


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for corpus in sorted({r["corpus"] for r in runs}):
        mine = [r for r in runs if r["corpus"] == corpus]
        base = {r["seed"]: r for r in mine if r["top_k"] == 0.0}
        for label in dict.fromkeys(r["config"] for r in mine):
            group = [r for r in mine if r["config"] == label and r["seed"] in base]
            if not group:
                continue

            def gap(key: str, group: list[dict] = group, base: dict = base) -> list[float]:
                return [round(100 * (r[key] - base[r["seed"]][key]) / base[r["seed"]][key], 2) for r in group]

            row = {
                "corpus": corpus,
                "config": label,
                "top_k": group[0]["top_k"],
                "seeds": [r["seed"] for r in group],
                "loss_gap_pct_median": statistics.median(gap("loss_last")),
                "loss_gap_pct_per_seed": gap("loss_last"),
                "perplexity_gap_pct_median": statistics.median(gap("eval_perplexity")),
                "perplexity_gap_pct_per_seed": gap("eval_perplexity"),
                "loss_last_median": statistics.median(r["loss_last"] for r in group),
                "eval_perplexity_median": statistics.median(r["eval_perplexity"] for r in group),
                "load_average_1m": [r["load_average_1m"] for r in group],
            }
            ratios = [r["hook_bytes_ratio"] for r in group if "hook_bytes_ratio" in r]
            if ratios:
                row["bytes_fewer_x_median"] = statistics.median(ratios)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pvc", type=Path, default=ROOT / "pvc")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--corpora", nargs="+", default=["pydoc", "docstrings"])
    ap.add_argument(
        "--configs",
        nargs="+",
        default=DEFAULT_CONFIGS,
        help="LABEL:P:WARMUP:RAMP:FREEZE[:SELECTION[:COMPRESS[:FROM[:BUDGET]]]], '-' = default",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    ensure_teacher(args.pvc)
    configs = [parse_config(c) for c in args.configs]
    load_before = os.getloadavg()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        data = corpora(args.pvc, Path(work))
        for seed in range(args.seeds):
            for corpus in args.corpora:
                for config in configs:
                    run = one_run(args.pvc, data[corpus], config, args.steps, seed, args.max_len, args.batch_size)
                    runs.append({"corpus": corpus, **run})
                    print(json.dumps(runs[-1]), flush=True)
                    # Written after every run: a partial result survives an interrupted benchmark.
                    args.out.write_text(
                        json.dumps(
                            {
                                "command": command_line(),
                                "world": WORLD,
                                "steps": args.steps,
                                "max_seq_length": args.max_len,
                                "batch_size": args.batch_size,
                                "configs": args.configs,
                                "method": METHOD,
                                "rows": summarize(runs),
                                "runs": runs,
                                "load_average_before": load_before,
                                "load_average_at_end": os.getloadavg(),
                            },
                            indent=1,
                        )
                    )
    print(f"{'corpus':>10} {'config':>16} {'loss gap %':>10} {'ppl gap %':>9} {'bytes x fewer':>13}")
    for r in summarize(runs):
        print(
            f"{r['corpus']:>10} {r['config']:>16} {r['loss_gap_pct_median']:>10} {r['perplexity_gap_pct_median']:>9} "
            f"{r.get('bytes_fewer_x_median', 1.0):>13}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
