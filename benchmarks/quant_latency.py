"""INT8 student vs FP32 student vs FP32 teacher: forward latency on this CPU, side by side.

The teacher is a BERT-style encoder classifier and a GPT2-style causal LM built from configs; the
student keeps a quarter of the teacher's layers (same width). The INT8 student is the PTQ of that
student with the kernel this machine selects (see ``trainer/quantization.py``). Every kernel is also
timed at batch 1, so the report shows *why* the chosen one is chosen (on AVX2-only CPUs
``torch._int_mm`` is a reference loop).

    python benchmarks/quant_latency.py [--threads N] [--seq 128] [--repeats 5] [--runs 3]

Each run times every variant back to back, in two fresh child processes: one with glibc's default
allocator, one with the allocator tuned as ``serving/runtime.py`` can tune it. The variants: the
plain FP32 teacher and student (what a user runs with transformers), the plain INT8 student, and
both students with ``prepare_for_inference`` (the tanh-GELU swap). The table reports medians over
``--runs`` of each ratio, three ways:

- ``plain``: INT8 vs FP32 student, both plain, default allocator (the kernels alone);
- ``served vs user FP32``: the INT8 student as ``kdistill serve`` runs it (the swap, and its default
  allocator setting, ``TUNE_ALLOCATOR_DEFAULT``) vs the plain FP32 student in a default process
  (what a user would otherwise run);
- ``served vs served``: both students with kdistill's runtime (the fair both-ways figure).
The same two ratios with the other allocator setting are in the JSON (``other_allocator_*``).

Wall time is the best of ``--repeats`` forwards (the variants take turns, one forward each per
round); the thread CPU time of that forward is recorded too.

Targets: INT8 student >= 1.5x faster than the FP32 student, >= 5x faster than the FP32 teacher.
Writes benchmarks/results/quant_latency.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.bench_common

from benchmarks import bench_common
from kdistill.serving.runtime import TUNE_ALLOCATOR_DEFAULT, prepare_for_inference, tune_allocator
from kdistill.trainer import quantization as q


def build(family: str, layers: int, width: int, vocab: int, seq: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if family == "bert-classifier":
        cfg = BertConfig(
            vocab_size=vocab,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=width // 64,
            intermediate_size=4 * width,
            max_position_embeddings=max(512, seq),
            num_labels=8,
        )
        return BertForSequenceClassification(cfg).eval()
    cfg = GPT2Config(vocab_size=vocab, n_positions=max(512, seq), n_embd=width, n_layer=layers, n_head=width // 64)
    return GPT2LMHeadModel(cfg).eval()


def forward_inputs(family: str, batch: int, seq: int, vocab: int) -> dict[str, Any]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "gpt2-lm":
        kwargs["logits_to_keep"] = 1  # only the last position's logits, as in generation's prefill
    return kwargs


@torch.inference_mode()
def time_forward(model: nn.Module, batch: int, seq: int, vocab: int, repeats: int, family: str) -> tuple[float, float]:
    """(wall, thread CPU) seconds of the best of ``repeats`` forward passes of one model."""
    return time_variants({"m": model}, batch, seq, vocab, repeats, family)["m"]


@torch.inference_mode()
def time_variants(
    models: dict[str, nn.Module],
    batch: int,
    seq: int,
    vocab: int,
    repeats: int,
    family: str,
    few: tuple[str, ...] = (),
    few_repeats: int = 2,
) -> dict[str, tuple[float, float]]:
    """Per model, (wall, thread CPU) seconds of its best forward pass. The models take turns, one
    forward each per round, so a burst of load from other processes hits all of them alike; the
    minimum, because other processes only ever add time. Models in ``few`` (the teacher: slow, and
    far from its target) run only ``few_repeats`` rounds."""
    kwargs = forward_inputs(family, batch, seq, vocab)
    for model in models.values():
        model(**kwargs)  # warm-up: kernel packing, allocator
    best = {name: (float("inf"), float("inf")) for name in models}
    for round_ in range(repeats):
        for name, model in models.items():
            if name in few and round_ >= few_repeats:
                continue
            cpu, start = time.thread_time(), time.perf_counter()
            model(**kwargs)
            best[name] = min(best[name], (time.perf_counter() - start, time.thread_time() - cpu))
    return best


def variants(family: str, args: argparse.Namespace, kernel: q.Int8Kernel) -> dict[str, nn.Module]:
    teacher = build(family, args.teacher_layers, args.width, args.vocab, args.seq)
    student = build(family, args.teacher_layers // 4, args.width, args.vocab, args.seq)
    int8 = q.quantize_ptq_int8(copy.deepcopy(student), kernel)
    served_fp32, served_int8 = copy.deepcopy(student), copy.deepcopy(int8)
    prepare_for_inference(served_fp32)
    prepare_for_inference(served_int8)
    return {
        "teacher_fp32": teacher,
        "student_fp32": student,
        "student_int8": int8,
        "served_fp32": served_fp32,
        "served_int8": served_int8,
    }


def child_run(args: argparse.Namespace) -> dict[str, Any]:
    """One run of every variant at batch 1 and 16, in this process (allocator as ``--child``)."""
    torch.set_num_threads(args.threads)
    tuned = tune_allocator() if args.child == "tuned" else False
    kernel = q.select_int8_kernel()
    out: dict[str, Any] = {"allocator": args.child, "allocator_tuned": tuned, "families": {}}
    for family in args.families:
        models = variants(family, args, kernel)
        rows: dict[str, Any] = {}
        for batch in (1, 16):
            rows[f"batch{batch}"] = {}
            timed = time_variants(models, batch, args.seq, args.vocab, args.repeats, family, few=("teacher_fp32",))
            for name, (wall, cpu) in timed.items():
                rows[f"batch{batch}"][f"{name}_ms"] = wall * 1e3
                rows[f"batch{batch}"][f"{name}_cpu_ms"] = cpu * 1e3
        if args.by_kernel:  # every kernel at batch 1, to show what the selection buys
            rows["batch1_ms_by_kernel"] = {
                other: time_forward(
                    q.set_int8_kernel(copy.deepcopy(models["student_int8"]), other),  # type: ignore[arg-type]
                    1,
                    args.seq,
                    args.vocab,
                    max(1, args.repeats // 2),
                    family,
                )[0]
                * 1e3
                for other in ("torchao-dynamic", "fbgemm-dynamic", "onednn-dynamic", "weight-only")
            }
        out["families"][family] = rows
    return out


def spawn(args: argparse.Namespace, allocator: str, by_kernel: bool) -> dict[str, Any]:
    """``child_run`` in a fresh process: a process's allocator settings cannot be undone."""
    cmd = [
        sys.executable,
        "-P",
        str(Path(__file__).resolve()),
        "--child",
        allocator,
        "--threads",
        str(args.threads),
        "--seq",
        str(args.seq),
        "--width",
        str(args.width),
        "--teacher-layers",
        str(args.teacher_layers),
        "--vocab",
        str(args.vocab),
        "--repeats",
        str(args.repeats),
        "--families",
        *args.families,
    ]
    if by_kernel:
        cmd.append("--by-kernel")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return cast(dict[str, Any], json.loads(done.stdout.strip().splitlines()[-1]))


def times(row: dict[str, float], cpu: bool) -> dict[str, float]:
    """Variant -> ms of one run's row: wall (``name_ms``) or thread CPU (``name_cpu_ms``)."""
    if cpu:
        return {k.removesuffix("_cpu_ms"): v for k, v in row.items() if k.endswith("_cpu_ms")}
    return {k.removesuffix("_ms"): v for k, v in row.items() if k.endswith("_ms") and not k.endswith("_cpu_ms")}


def ratios(default: dict[str, float], tuned: dict[str, float]) -> dict[str, float]:
    """The speedups of one run at one batch size (wall time; ``*_cpu`` from thread CPU time).
    "served" is the runtime ``kdistill serve`` runs by default (its allocator setting:
    ``TUNE_ALLOCATOR_DEFAULT``); "other_allocator" the same models with the other setting."""
    out: dict[str, float] = {}
    for cpu, tag in ((False, ""), (True, "_cpu")):
        d, t = times(default, cpu), times(tuned, cpu)
        srv, alt = (t, d) if TUNE_ALLOCATOR_DEFAULT else (d, t)
        out[f"plain_int8_vs_fp32_student{tag}"] = d["student_fp32"] / d["student_int8"]
        out[f"served_int8_vs_user_fp32_student{tag}"] = d["student_fp32"] / srv["served_int8"]
        out[f"served_int8_vs_served_fp32_student{tag}"] = srv["served_fp32"] / srv["served_int8"]
        out[f"served_int8_vs_teacher{tag}"] = d["teacher_fp32"] / srv["served_int8"]
        out[f"other_allocator_served_int8_vs_user_fp32_student{tag}"] = d["student_fp32"] / alt["served_int8"]
        out[f"other_allocator_served_int8_vs_served_fp32_student{tag}"] = alt["served_fp32"] / alt["served_int8"]
        out[f"plain_int8_vs_teacher{tag}"] = d["teacher_fp32"] / d["student_int8"]
        # One change at a time: the allocator alone (plain models), the fused GELU alone (default).
        out[f"tuned_allocator_plain_int8_vs_fp32_student{tag}"] = t["student_fp32"] / t["student_int8"]
        out[f"fused_int8_vs_fp32_student_default_allocator{tag}"] = d["student_fp32"] / d["served_int8"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "cpu": q.cpu_int8_features(),
        "threads": args.threads,
        **bench_common.machine_state(),
        "runs": args.runs,
        "selected_kernel": q.select_int8_kernel(),
        "seq_len": args.seq,
        "families": {},
    }
    raw = []
    for i in range(args.runs):
        # Both allocators back to back in every run, so a change in the machine's load hits them alike.
        raw.append(
            {
                "default": spawn(args, "default", by_kernel=i == 0),
                "tuned": spawn(args, "tuned", False),
                "load_average": list(os.getloadavg()),
            }
        )
        print(f"run {i + 1}/{args.runs} done, load average {raw[-1]['load_average'][0]:.1f}", file=sys.stderr)
    for family in args.families:
        rows: dict[str, Any] = {}
        for b in ("batch1", "batch16"):
            per_run = []
            for r in raw:
                d, t = r["default"]["families"][family][b], r["tuned"]["families"][family][b]
                per_run.append(
                    {
                        **{f"default_{k}": v for k, v in d.items()},
                        **{f"tuned_{k}": v for k, v in t.items()},
                        **ratios(d, t),
                    }
                )
            rows[b] = {**{key: statistics.median(r[key] for r in per_run) for key in per_run[0]}, "per_run": per_run}
        rows["batch1_ms_by_kernel"] = raw[0]["default"]["families"][family]["batch1_ms_by_kernel"]
        rows["layers"] = {"teacher": args.teacher_layers, "student": args.teacher_layers // 4}
        report["families"][family] = rows
    report["allocator_tuned"] = raw[0]["tuned"]["allocator_tuned"]
    report["served_allocator"] = "tuned" if TUNE_ALLOCATOR_DEFAULT else "default"
    report["load_average_at_end"] = bench_common.machine_state()["load_average"]
    report["targets"] = {"int8_vs_fp32_student": 1.5, "int8_vs_teacher": 5.0}
    report["met"] = {
        f"{fam}/{b}": {
            key: r[b][key] >= (5.0 if "teacher" in key else 1.5)
            for key in (
                "plain_int8_vs_fp32_student",
                "served_int8_vs_user_fp32_student",
                "served_int8_vs_served_fp32_student",
                "served_int8_vs_teacher",
            )
        }
        for fam, r in report["families"].items()
        for b in ("batch1", "batch16")
    }
    return report


def print_table(report: dict[str, Any]) -> None:
    cpu = report["cpu"]
    print(
        f"CPU: {cpu['torch_cpu_capability']} avx512={cpu['avx512']} vnni={cpu['vnni']} amx={cpu['amx']}; "
        f"threads={report['threads']}; INT8 kernel: {report['selected_kernel']}; seq={report['seq_len']}; "
        f"load average {report['load_average'][0]:.1f} -> {report['load_average_at_end'][0]:.1f} "
        f"on {report['cpus']} CPUs"
    )
    srv = report["served_allocator"]
    print(
        f"medians of {report['runs']} runs (ms: wall, best of repeats). default = glibc allocator as is; "
        f"served = as kdistill serve runs it: tanh-GELU swap, allocator {srv}"
    )
    head = (
        f"{'model':16} {'batch':>5} {'teacher':>8} {'fp32':>7} {'int8':>7} {'fp32 srv':>8} {'int8 srv':>8} "
        f"{'plain':>6} {'srv/user':>8} {'srv/srv':>7} {'srv/teach':>9} {'cpu srv/user':>12} {'cpu srv/srv':>11}"
    )
    print(head)
    print("-" * len(head))
    for fam, rows in report["families"].items():
        for b in ("batch1", "batch16"):
            r = rows[b]
            print(
                f"{fam:16} {b[5:]:>5} {r['default_teacher_fp32_ms']:8.1f} {r['default_student_fp32_ms']:7.1f} "
                f"{r['default_student_int8_ms']:7.1f} {r[f'{srv}_served_fp32_ms']:8.1f} "
                f"{r[f'{srv}_served_int8_ms']:8.1f} {r['plain_int8_vs_fp32_student']:5.2f}x "
                f"{r['served_int8_vs_user_fp32_student']:7.2f}x {r['served_int8_vs_served_fp32_student']:6.2f}x "
                f"{r['served_int8_vs_teacher']:8.2f}x {r['served_int8_vs_user_fp32_student_cpu']:11.2f}x "
                f"{r['served_int8_vs_served_fp32_student_cpu']:10.2f}x"
            )
        ks = ", ".join(f"{k} {v:.1f} ms" for k, v in rows["batch1_ms_by_kernel"].items())
        print(f"{'':16} batch 1 INT8 student by kernel (first run, default allocator): {ks}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # One thread by default: on a shared 2-core machine two OpenMP threads spin-wait on each other
    # (measured 10-15x slower per small matmul under load); pass --threads N on a dedicated machine.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5, help="rounds of the students (the teacher: 2)")
    p.add_argument("--runs", type=int, default=3, help="whole comparisons; the table shows their medians")
    p.add_argument("--families", nargs="+", default=["bert-classifier", "gpt2-lm"])
    p.add_argument("--out", type=Path, default=bench_common.RESULTS / "quant_latency.json")
    p.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)  # one run, JSON on stdout
    p.add_argument("--by-kernel", action="store_true", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.child:
        print(json.dumps(child_run(p.parse_args())))
        return
    bench_common.main(p, run, print_table)


if __name__ == "__main__":
    main()
