"""Tokens/s of the real trainer with data parallelism at 1, 2 and 4 processes on CPU (gloo).

Each world size runs the same quickstart-like job (2-layer student distilled from the
quickstart teacher, global batch 16, sequences up to 128 tokens) under torchrun. Throughput is
global: rank 0's tokens per step times the data-parallel degree (every rank takes the same
number of rows of each global micro-batch), divided by its step time; the median over steps
after a warm-up. The machine has 2 cores, shared with other work: at 4 processes two ranks
share a core, so this measures the overhead of gloo all-reduce and oversubscription, not the
speed-up a node with one core (or GPU) per rank would see.

    python benchmarks/parallel_scaling.py [--pvc DIR] [--steps N]
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

from parallel_common import ROOT, ensure_teacher, run_job, write_job


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pvc", type=Path, default=ROOT / "pvc")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    ensure_teacher(args.pvc)
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            job = write_job(Path(tmp) / "job.yaml", args.pvc, world=world, steps=args.steps, batch_size=16)
            threads = max(1, cores // world)
            steps, _ = run_job(job, Path(tmp) / "out", world, threads)
        warm = steps[3:] or steps
        tps = [s["tokensPerSecond"] * world for s in warm]
        rows.append({"processes": world, "threads_per_rank": threads, "steps_measured": len(warm),
                     "tokens_per_second_median": round(statistics.median(tps), 1),
                     "step_seconds_median": round(statistics.median(s["stepSeconds"] for s in warm), 4)})
    base = rows[0]["tokens_per_second_median"]
    for r in rows:
        r["speedup_vs_1"] = round(r["tokens_per_second_median"] / base, 3)
    print(f"{'procs':>5} {'threads':>7} {'tokens/s':>10} {'step s':>8} {'speed-up':>8}")
    for r in rows:
        print(f"{r['processes']:>5} {r['threads_per_rank']:>7} {r['tokens_per_second_median']:>10} "
              f"{r['step_seconds_median']:>8} {r['speedup_vs_1']:>8}")
    out = ROOT / "benchmarks" / "results" / "parallel_scaling.json"
    out.write_text(json.dumps({"cpu_cores": cores, "backend": "gloo", "gpu": "none available in this session",
                               "rows": rows,
                               "load_average_before_after": [load_before, os.getloadavg()],
                               "note": "2 shared CPU cores: 4 ranks oversubscribe them; numbers show DP overhead, "
                                       "not scaling on one-core-per-rank hardware"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
