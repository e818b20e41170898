"""Top-k gradient compression in the real trainer: traffic and loss at p = 0.01 and 0.1.

Two data-parallel ranks (gloo) run the same quickstart-like job for N steps (default 200, the
quickstart's length) without compression and with top-k at p = 0.1 and 0.01, for several seeds
(the seed sets the student's init, data order and dropout). The hook: per-tensor top-k with error
feedback, 1-D tensors sent whole, bfloat16 values, ``--warmup`` uncompressed steps then a density
ramp of as many steps down to p (p = 0.01 with a 5- and a 20-step warm-up). Reported per
configuration (medians over seeds):
- the loss gap: mean training loss of the last 5 steps against the same seed's uncompressed run;
- bytes the hook sent against what plain all-reduce would have, counted by the hook itself over
  the whole run (warm-up and ramp included) and over the last logged interval only (steady
  state, past warm-up and ramp), and the ring-traffic estimate for the same world size.

    python benchmarks/compression.py [--pvc DIR] [--steps N] [--seeds S] [--configs P:WARMUP ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import command_line
from parallel_common import ROOT, ensure_teacher, run_job, write_job

WORLD = 2
OUT = ROOT / "benchmarks" / "results" / "compression.json"


def one_run(pvc: Path, p: float, steps: int, warmup: int, seed: int) -> dict:
    warmup = warmup if p else 0
    with tempfile.TemporaryDirectory() as tmp:
        job = write_job(
            Path(tmp) / "job.yaml", pvc, world=WORLD, steps=steps, batch_size=16, top_k=p, warmup=warmup, seed=seed
        )
        records, comp = run_job(job, Path(tmp) / "out", WORLD, 1)
    run = {
        "top_k": p,
        "warmup_steps": warmup,
        "seed": seed,
        "steps": len(records),
        "final_loss_mean_last5": round(statistics.fmean(s["loss"] for s in records[-5:]), 5),
    }
    if comp:
        run.update(
            {
                "hook_bytes_ratio": comp[-1]["ratio"],
                "ring_wire_ratio": comp[-1]["wire_ratio"],
                "bytes_sent": comp[-1]["bytes_sent"],
                "bytes_dense": comp[-1]["bytes_dense"],
            }
        )
        by_step: dict[int, dict] = {}
        for c in comp:  # every rank logs its counters: keep one log per step
            by_step.setdefault(c["step"], c)
        logs = [by_step[k] for k in sorted(by_step)]
        if len(logs) >= 2:
            a, b = logs[-2], logs[-1]
            run["steady_bytes_ratio"] = round(
                (b["bytes_dense"] - a["bytes_dense"]) / max(1, b["bytes_sent"] - a["bytes_sent"]), 3
            )
    return run


def summarize(runs: list[dict]) -> list[dict]:
    base = {r["seed"]: r["final_loss_mean_last5"] for r in runs if r["top_k"] == 0.0}
    rows = []
    for p, warmup in sorted({(r["top_k"], r["warmup_steps"]) for r in runs}):
        mine = [r for r in runs if (r["top_k"], r["warmup_steps"]) == (p, warmup) and r["seed"] in base]
        if not mine:
            continue
        gaps = [100 * (r["final_loss_mean_last5"] - base[r["seed"]]) / base[r["seed"]] for r in mine]
        row = {
            "top_k": p,
            "warmup_steps": warmup,
            "ramp_steps": warmup,
            "seeds": [r["seed"] for r in mine],
            "loss_gap_pct_median": round(statistics.median(gaps), 3),
            "loss_gap_pct_per_seed": [round(g, 3) for g in gaps],
            "final_loss_median": round(statistics.median(r["final_loss_mean_last5"] for r in mine), 5),
        }
        for key in ("hook_bytes_ratio", "steady_bytes_ratio", "ring_wire_ratio"):
            vals = [r[key] for r in mine if key in r]
            if vals:
                row[key] = round(statistics.median(vals), 3)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pvc", type=Path, default=ROOT / "pvc")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    # (p, dense warm-up steps; the ramp is as long): p = 0.01 with a short and a long warm-up.
    ap.add_argument("--configs", nargs="+", default=["0:0", "0.01:5", "0.1:5", "0.01:20"], help="p:warmup pairs")
    args = ap.parse_args()
    ensure_teacher(args.pvc)
    load_before = os.getloadavg()
    runs: list[dict] = []
    for seed in range(args.seeds):
        for config in args.configs:
            p, warmup = config.split(":")
            runs.append(one_run(args.pvc, float(p), args.steps, int(warmup), seed))
            # Written after every run: a partial result survives an interrupted benchmark.
            OUT.write_text(
                json.dumps(
                    {
                        "command": command_line(),
                        "world": WORLD,
                        "steps": args.steps,
                        "method": "per-tensor top-k with error feedback; 1-D tensors sent whole; bfloat16 values "
                        "(rounding error kept in the residual); dense warm-up, then exponential density ramp",
                        "rows": summarize(runs),
                        "runs": runs,
                        "load_average_before": load_before,
                        "load_average_at_end": os.getloadavg(),
                    },
                    indent=1,
                )
            )
    print(
        f"{'top-k':>6} {'warm-up':>7} {'loss(last5)':>12} {'gap % (median)':>14} {'bytes x fewer':>13} "
        f"{'steady x fewer':>14}"
    )
    for r in summarize(runs):
        print(
            f"{r['top_k']:>6} {r['warmup_steps']:>7} {r['final_loss_median']:>12} {r['loss_gap_pct_median']:>14} "
            f"{r.get('hook_bytes_ratio', 1.0):>13} {r.get('steady_bytes_ratio', 1.0):>14}"
        )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
