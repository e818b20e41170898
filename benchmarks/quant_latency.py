"""INT8 student vs FP32 student vs FP32 teacher: forward latency on this CPU, side by side.

The teacher is a BERT-style encoder classifier and a GPT2-style causal LM built from configs; the
student keeps a quarter of the teacher's layers (same width). The INT8 student is the PTQ of that
student with the kernel this machine selects (see ``trainer/quantization.py``). Every kernel is also
timed at batch 1, so the report shows *why* the chosen one is chosen (on AVX2-only CPUs
``torch._int_mm`` is a reference loop).

    python benchmarks/quant_latency.py [--threads N] [--seq 128] [--repeats 5] [--runs 3]

``--runs`` repeats the whole comparison (all variants side by side, interleaved) and reports the
median of each ratio over the runs; the opt-in ``onednn-dynamic`` kernel is timed beside the
selected one in every run, so the two can be compared at model level.

Targets: INT8 student >= 1.5x faster than the FP32 student, >= 5x faster than the FP32 teacher.
Writes benchmarks/results/quant_latency.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.bench_common

from benchmarks import bench_common
from kdistill.trainer import quantization as q


def build(family: str, layers: int, width: int, vocab: int, seq: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if family == "bert-classifier":
        cfg = BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
                         intermediate_size=4 * width, max_position_embeddings=max(512, seq), num_labels=8)
        return BertForSequenceClassification(cfg).eval()
    cfg = GPT2Config(vocab_size=vocab, n_positions=max(512, seq), n_embd=width, n_layer=layers, n_head=width // 64)
    return GPT2LMHeadModel(cfg).eval()


@torch.inference_mode()
def time_forward(model: nn.Module, batch: int, seq: int, vocab: int, repeats: int, family: str) -> float:
    """Best-of-``repeats`` seconds of one forward pass: the minimum, because other processes share
    this CPU and only ever add time. The LM computes only the last position's logits, as in
    generation's prefill."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "gpt2-lm":
        kwargs["logits_to_keep"] = 1
    model(**kwargs)  # warm-up: kernel packing, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def ratios(ms: dict[str, float]) -> dict[str, float]:
    return {"int8_vs_fp32_student": ms["student_fp32"] / ms["student_int8"],
            "int8_vs_teacher": ms["teacher_fp32"] / ms["student_int8"],
            "onednn_int8_vs_fp32_student": ms["student_fp32"] / ms["student_int8_onednn"],
            "onednn_int8_vs_teacher": ms["teacher_fp32"] / ms["student_int8_onednn"],
            "fp32_student_vs_teacher": ms["teacher_fp32"] / ms["student_fp32"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    kernel = q.select_int8_kernel()
    report: dict[str, Any] = {"cpu": q.cpu_int8_features(), "threads": torch.get_num_threads(),
                              **bench_common.machine_state(), "runs": args.runs,
                              "selected_kernel": kernel, "seq_len": args.seq, "families": {}}
    for family in args.families:
        teacher = build(family, args.teacher_layers, args.width, args.vocab, args.seq)
        student = build(family, args.teacher_layers // 4, args.width, args.vocab, args.seq)
        int8 = q.quantize_ptq_int8(copy.deepcopy(student), kernel)
        models = {"teacher_fp32": teacher, "student_fp32": student, "student_int8": int8,
                  "student_int8_onednn": q.set_int8_kernel(copy.deepcopy(int8), "onednn-dynamic")}
        rows: dict[str, Any] = {}
        for batch in (1, 16):
            # Every run times all variants back to back, so a change in the machine's load hits them
            # alike; the medians over runs are what the table reports.
            per_run = []
            for _ in range(args.runs):
                ms = {name: time_forward(m, batch, args.seq, args.vocab, args.repeats, family) * 1e3
                      for name, m in models.items()}
                per_run.append({**{f"{k}_ms": v for k, v in ms.items()}, **ratios(ms)})
            rows[f"batch{batch}"] = {**{key: statistics.median(r[key] for r in per_run) for key in per_run[0]},
                                     "per_run": per_run}
        # Every kernel at batch 1, to show what the selection buys.
        per_kernel = {}
        for other in ("torchao-dynamic", "fbgemm-dynamic", "onednn-dynamic", "weight-only"):
            model = q.set_int8_kernel(copy.deepcopy(int8), other)  # type: ignore[arg-type]
            per_kernel[other] = time_forward(model, 1, args.seq, args.vocab, max(1, args.repeats // 2), family) * 1e3
        rows["batch1_ms_by_kernel"] = per_kernel
        rows["params_m"] = {"teacher": sum(p.numel() for p in teacher.parameters()) / 1e6,
                            "student": sum(p.numel() for p in student.parameters()) / 1e6}
        rows["layers"] = {"teacher": args.teacher_layers, "student": args.teacher_layers // 4}
        report["families"][family] = rows
    report["load_average_at_end"] = bench_common.machine_state()["load_average"]
    report["targets"] = {"int8_vs_fp32_student": 1.5, "int8_vs_teacher": 5.0}
    report["met"] = {
        f"{fam}/{b}": {"int8_vs_fp32_student": r[b]["int8_vs_fp32_student"] >= 1.5,
                       "int8_vs_teacher": r[b]["int8_vs_teacher"] >= 5.0}
        for fam, r in report["families"].items() for b in ("batch1", "batch16")}
    return report


def print_table(report: dict[str, Any]) -> None:
    cpu = report["cpu"]
    print(f"CPU: {cpu['torch_cpu_capability']} avx512={cpu['avx512']} vnni={cpu['vnni']} amx={cpu['amx']}; "
          f"threads={report['threads']}; INT8 kernel: {report['selected_kernel']}; seq={report['seq_len']}; "
          f"load average {report['load_average'][0]:.1f} on {report['cpus']} CPUs")
    print(f"medians of {report['runs']} runs; 'onednn' = the same INT8 student on the onednn-dynamic kernel")
    head = f"{'model':16} {'batch':>5} {'teacher ms':>11} {'fp32 stu ms':>12} {'int8 stu ms':>12} " \
           f"{'int8/fp32':>9} {'int8/teach':>10} {'onednn ms':>10} {'onednn/fp32':>11} {'onednn/teach':>12}"
    print(head)
    print("-" * len(head))
    for fam, rows in report["families"].items():
        for b in ("batch1", "batch16"):
            r = rows[b]
            print(f"{fam:16} {b[5:]:>5} {r['teacher_fp32_ms']:11.1f} {r['student_fp32_ms']:12.1f} "
                  f"{r['student_int8_ms']:12.1f} {r['int8_vs_fp32_student']:8.2f}x {r['int8_vs_teacher']:9.2f}x "
                  f"{r['student_int8_onednn_ms']:10.1f} {r['onednn_int8_vs_fp32_student']:10.2f}x "
                  f"{r['onednn_int8_vs_teacher']:11.2f}x")
        ks = ", ".join(f"{k} {v:.1f} ms" for k, v in rows["batch1_ms_by_kernel"].items())
        print(f"{'':16} batch 1 INT8 student by kernel: {ks}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # One thread by default: on a shared 2-core machine two OpenMP threads spin-wait on each other
    # (measured 10-15x slower per small matmul under load); pass --threads N on a dedicated machine.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--runs", type=int, default=3, help="whole comparisons; the table shows their medians")
    p.add_argument("--families", nargs="+", default=["bert-classifier", "gpt2-lm"])
    p.add_argument("--out", type=Path, default=bench_common.RESULTS / "quant_latency.json")
    bench_common.main(p, run, print_table)


if __name__ == "__main__":
    main()
