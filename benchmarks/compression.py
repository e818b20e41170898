"""Top-k gradient compression in the real trainer: traffic and loss at p = 0.01 and 0.1.

Two data-parallel ranks (gloo) run the same quickstart-like job for N steps without compression
and with top-k at p = 0.1 and 0.01 (per-tensor top-k with error feedback, a few uncompressed warm-up steps, then a
density ramp down to p). Reported:
- the bytes the hook sent against what plain all-reduce would have (counted by the hook itself,
  including the warm-up steps), and the ring-traffic estimate for the same world size;
- the same ratio over the last logged interval only (steady state, past warm-up and ramp);
- the loss gap: mean training loss of the last 5 steps against the uncompressed run's.

    python benchmarks/compression.py [--pvc DIR] [--steps N]
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

WORLD = 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pvc", type=Path, default=ROOT / "pvc")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    ensure_teacher(args.pvc)
    rows = []
    for p in (0.0, 0.1, 0.01):
        with tempfile.TemporaryDirectory() as tmp:
            job = write_job(Path(tmp) / "job.yaml", args.pvc, world=WORLD, steps=args.steps, batch_size=16,
                            top_k=p, warmup=args.warmup if p else 0)
            steps, comp = run_job(job, Path(tmp) / "out", WORLD, 1)
        last = statistics.fmean(s["loss"] for s in steps[-5:])
        row = {"top_k": p, "steps": len(steps), "final_loss_mean_last5": round(last, 5)}
        if comp:
            row.update({"hook_bytes_ratio": comp[-1]["ratio"], "ring_wire_ratio": comp[-1]["wire_ratio"],
                        "bytes_sent": comp[-1]["bytes_sent"], "bytes_dense": comp[-1]["bytes_dense"],
                        "counted_steps": comp[-1]["step"]})
            # Every rank logs its counters: keep one log per step (rank 0's comes first).
            by_step = {}
            for c in comp:
                by_step.setdefault(c["step"], c)
            logs = [by_step[k] for k in sorted(by_step)]
            if len(logs) >= 2:
                # Steady state: the bytes of the last logged interval only (past warm-up and ramp).
                a, b = logs[-2], logs[-1]
                row["steady_bytes_ratio"] = round((b["bytes_dense"] - a["bytes_dense"])
                                                  / max(1, b["bytes_sent"] - a["bytes_sent"]), 3)
                row["steady_steps"] = [a["step"], b["step"]]
        rows.append(row)
    base = rows[0]["final_loss_mean_last5"]
    for r in rows:
        r["loss_gap_pct"] = round(100 * (r["final_loss_mean_last5"] - base) / base, 3)
    print(f"{'top-k':>6} {'loss(last5)':>12} {'gap %':>7} {'bytes x fewer':>13} {'steady x fewer':>14} "
          f"{'ring x fewer':>12}")
    for r in rows:
        print(f"{r['top_k']:>6} {r['final_loss_mean_last5']:>12} {r['loss_gap_pct']:>7} "
              f"{r.get('hook_bytes_ratio', 1.0):>13} {r.get('steady_bytes_ratio', 1.0):>14} "
              f"{r.get('ring_wire_ratio', 1.0):>12}")
    out = ROOT / "benchmarks" / "results" / "compression.json"
    out.write_text(json.dumps({"world": WORLD, "warmup_steps": args.warmup, "rows": rows,
                               "load_average_at_end": os.getloadavg()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
