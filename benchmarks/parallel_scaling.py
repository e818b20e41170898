"""Tokens/s of the real trainer with data parallelism at 1, 2 and 4 processes on CPU (gloo).

Each world size runs the same quickstart-like job (2-layer student distilled from the
quickstart teacher, global batch 16, sequences up to 128 tokens) under torchrun. Throughput is
global: rank 0's tokens per step times the data-parallel degree (every rank takes the same
number of rows of each global micro-batch), divided by its step time; the median over steps
after a warm-up. The machine has 2 cores, shared with other work: at 4 processes two ranks
share a core, so this measures the overhead of gloo all-reduce and oversubscription, not the
speed-up a node with one core (or GPU) per rank would see.

    python benchmarks/parallel_scaling.py [--pvc DIR] [--steps N]

``--model-parallel`` measures the student split instead: one process, ``tensor=2`` and
``pipeline=2`` (world 2), on a Llama teacher of the quickstart teacher's shape (4 layers, width
128, 4 heads, the quickstart tokenizer and corpus; random weights, which do not change the
cost), because tensor parallelism cuts Llama-family projections only. Throughput there is rank
0's tokens per step (the whole global batch: data degree 1) over its step time. Results:
``benchmarks/results/parallel_scaling_model.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import command_line
from parallel_common import ROOT, ensure_teacher, run_job, write_job


def warm_medians(steps: list[dict[str, Any]], tokens_scale: int) -> dict[str, Any]:
    """Medians over the steps after the first three (warm-up); ``tokens_scale`` turns one rank's
    tokens/s into the job's when every data rank reports only its own share."""
    warm = steps[3:] or steps
    return {
        "steps_measured": len(warm),
        "tokens_per_second_median": round(statistics.median(s["tokensPerSecond"] * tokens_scale for s in warm), 1),
        "step_seconds_median": round(statistics.median(s["stepSeconds"] for s in warm), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pvc", type=Path, default=ROOT / "pvc")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--model-parallel", action="store_true", help="tensor=2 and pipeline=2 against one process")
    args = ap.parse_args()
    if args.model_parallel:
        model_parallel(args.pvc, args.steps)
        return
    ensure_teacher(args.pvc)
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            job = write_job(Path(tmp) / "job.yaml", args.pvc, world=world, steps=args.steps, batch_size=16)
            threads = max(1, cores // world)
            steps, _ = run_job(job, Path(tmp) / "out", world, threads)
        rows.append({"processes": world, "threads_per_rank": threads, **warm_medians(steps, world)})
    base = rows[0]["tokens_per_second_median"]
    for r in rows:
        r["speedup_vs_1"] = round(r["tokens_per_second_median"] / base, 3)
    print(f"{'procs':>5} {'threads':>7} {'tokens/s':>10} {'step s':>8} {'speed-up':>8}")
    for r in rows:
        print(
            f"{r['processes']:>5} {r['threads_per_rank']:>7} {r['tokens_per_second_median']:>10} "
            f"{r['step_seconds_median']:>8} {r['speedup_vs_1']:>8}"
        )
    out = ROOT / "benchmarks" / "results" / "parallel_scaling.json"
    out.write_text(
        json.dumps(
            {
                "command": command_line(),
                "cpu_cores": cores,
                "backend": "gloo",
                "gpu": "none on this machine",
                "rows": rows,
                "load_average_before_after": [load_before, os.getloadavg()],
                "note": "2 shared CPU cores: 4 ranks oversubscribe them; numbers show DP overhead, "
                "not scaling on one-core-per-rank hardware",
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


def llama_teacher(pvc: Path) -> Path:
    """A Llama teacher shaped like the quickstart GPT2 teacher, with the quickstart tokenizer."""
    out = pvc / "models" / "bench-llama-teacher"
    if (out / "config.json").exists():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdistill.trainer.teacher_pretrain import PretrainConfig, build_corpus
    from kdistill.trainer.tokenizer_build import build_tokenizer

    cfg = PretrainConfig()
    train = pvc / "data" / "pydoc-train.jsonl"
    if not train.exists():
        build_corpus(pvc)
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines() if line.strip()]
    tok = build_tokenizer(texts, cfg.vocab_size, out)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=cfg.width,
            intermediate_size=4 * cfg.width,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            max_position_embeddings=cfg.max_length,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    model.save_pretrained(str(out))
    return out


def model_parallel(pvc: Path, steps: int) -> None:
    import yaml

    teacher = llama_teacher(pvc)
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    rows = []
    for label, (pipeline, tensor) in {"1 process": (1, 1), "tensor=2": (1, 2), "pipeline=2": (2, 1)}.items():
        world = pipeline * tensor
        with tempfile.TemporaryDirectory() as tmp:
            job = write_job(Path(tmp) / "job.yaml", pvc, world=world, steps=steps, batch_size=16)
            spec = yaml.safe_load(job.read_text())
            spec["spec"]["teacher"]["model"] = str(teacher)
            spec["spec"]["parallelism"]["student"] = {"data": 1, "tensor": tensor, "pipeline": pipeline}
            job.write_text(yaml.safe_dump(spec, sort_keys=False))
            threads = max(1, cores // world)
            found, _ = run_job(job, Path(tmp) / "out", world, threads)
        rows.append(
            {
                "layout": label,
                "processes": world,
                "threads_per_rank": threads,
                **warm_medians(found, 1),
                "first_loss": found[0]["loss"],
                "last_loss": found[-1]["loss"],
            }
        )
    print(f"{'layout':>11} {'procs':>5} {'tokens/s':>10} {'step s':>8} {'first loss':>10} {'last loss':>10}")
    for r in rows:
        print(
            f"{r['layout']:>11} {r['processes']:>5} {r['tokens_per_second_median']:>10} "
            f"{r['step_seconds_median']:>8} {r['first_loss']:>10} {r['last_loss']:>10}"
        )
    out = ROOT / "benchmarks" / "results" / "parallel_scaling_model.json"
    out.write_text(
        json.dumps(
            {
                "command": command_line(),
                "cpu_cores": cores,
                "backend": "gloo",
                "gpu": "none on this machine",
                "teacher": "Llama, 4 layers, width 128, 4 heads, vocab 2048 (random weights)",
                "student": "fromTeacher numLayers 2",
                "global_batch": 16,
                "rows": rows,
                "load_average_before_after": [load_before, os.getloadavg()],
                "note": "2 shared CPU cores; a split student of this size pays one all-reduce "
                "per block half (tensor) or one send per micro-batch (pipeline) for "
                "little compute, so this measures overhead, not speed-up",
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
