"""Teacher parameter memory per rank when the teacher is split by layers over S = 1, 2, 4 ranks.

Two measurements:
- exact per-rank parameter bytes for benchmark-sized configs (GPT2-124M, GPT2-355M and a
  1.1B Llama-family decoder like TinyLlama), by cutting each model into stages on the ``meta``
  device with the same code the trainer uses (nothing is allocated, nothing downloaded);
- real processes: S gloo ranks each build a SplitTeacher of a small GPT2 and report the bytes
  they actually hold, plus the resident memory of the process.

    python benchmarks/teacher_memory.py          # writes benchmarks/results/teacher_memory.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_common import command_line  # noqa: E402
from kdistill.trainer.parallel.stages import (  # noqa: E402
    balance_layers,
    hollow_to_stage,
    stage_costs,
    unique_param_bytes,
)

STAGES = (1, 2, 4)


def configs() -> dict[str, object]:
    from transformers import GPT2Config, LlamaConfig

    return {
        "gpt2-124M": GPT2Config(),
        "gpt2-355M": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
        "llama-1.1B": LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    }


def build(cfg: object) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def exact_rows() -> list[dict[str, object]]:
    rows = []
    for name, cfg in configs().items():
        total = unique_param_bytes(build(cfg))
        for s in STAGES:
            ranges = balance_layers(stage_costs(build(cfg)), s)
            per_rank = []
            for i, layers in enumerate(ranges):
                stage = hollow_to_stage(build(cfg), layers, first=i == 0, last=i == s - 1)
                per_rank.append(unique_param_bytes(stage))
            rows.append(
                {
                    "model": name,
                    "dtype": "bfloat16",
                    "stages": s,
                    "total_MiB": round(total / 2**20, 1),
                    "per_rank_MiB": [round(b / 2**20, 1) for b in per_rank],
                    "max_rank_share": round(max(per_rank) / total, 3),
                    "ideal_share": round(1 / s, 3),
                    "layers": [f"{r.start}-{r.stop - 1}" for r in ranges],
                }
            )
    return rows


def real_rows() -> list[dict[str, object]]:
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from tests.parallel.harness import run_ranks

    rows = []
    for s in STAGES:
        with tempfile.TemporaryDirectory() as tmp:
            run_ranks(
                s,
                "tests.parallel.workers:teacher_split",
                Path(tmp),
                {"family": "gpt2", "layers": 8, "stages": s},
                timeout=600,
            )
            held = [int(load_file(str(Path(tmp) / f"rank{r}.safetensors"))["param_bytes"]) for r in range(s)]
        rows.append(
            {
                "model": "tiny gpt2 (8 layers, width 32), real gloo processes",
                "stages": s,
                "per_rank_KiB": [round(b / 1024, 1) for b in held],
            }
        )
    return rows


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--no-real", action="store_true", help="skip the real-process measurement (slow on busy CPUs)")
    args = ap.parse_args()
    exact = exact_rows()
    real = [] if args.no_real else real_rows()
    print(f"{'model':12} {'S':>2} {'total MiB':>10} {'max share':>9} {'ideal':>6}  per-rank MiB")
    for r in exact:
        print(
            f"{r['model']:12} {r['stages']:>2} {r['total_MiB']:>10} {r['max_rank_share']:>9} {r['ideal_share']:>6}"
            f"  {r['per_rank_MiB']}"
        )
    for r in real:
        print(f"real processes S={r['stages']}: per-rank KiB {r['per_rank_KiB']}")
    out = ROOT / "benchmarks" / "results" / "teacher_memory.json"
    out.write_text(
        json.dumps(
            {
                "command": command_line(),
                "exact_meta_device": exact,
                "real_processes": real,
                "note": "parameter bytes; a tied GPT2 head is a second copy of the embedding on the last stage",
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
