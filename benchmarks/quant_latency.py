"""INT8 student vs FP32 student vs FP32 teacher: forward latency on this CPU, side by side, and
the INT8 kernel the server picks against every kernel.

The teacher is a BERT-style encoder classifier and a GPT2-style causal LM built from configs; the
student keeps a quarter of the teacher's layers (same width). The INT8 student is the PTQ of that
student, run by the kernel the server would pick for it (``serving/kernel_choice.py``: measured
when the model loads; each run starts with an empty kernel cache, so each run measures).

    flock /tmp/kdistill-bench.lock .venv/bin/python -P benchmarks/quant_latency.py \
        [--threads N] [--seq 128] [--repeats 5] [--runs 3]

Each run times every variant in two fresh child processes, one with glibc's default allocator, one
with the allocator tuned as ``serving/runtime.py`` can tune it; the two alternate which goes first
(AB, BA, AB...). The variants: the plain FP32 teacher and student (what a user runs with
transformers), the plain INT8 student, the FP32 student with ``prepare_for_inference`` (the
tanh-GELU swap), and the served INT8 student (the swap) under every INT8 kernel; the "served"
INT8 student is the one under the chosen kernel. Every variant gets the same ``--repeats`` rounds,
one forward each per round, in an order that rotates every round; its time in a run is the best of
its rounds (other processes only ever add time). A kernel more than 4x slower than the fastest at
batch 1 is not timed at batch 16 (``torchao-dynamic`` on an AVX2-only CPU).

The table reports medians over ``--runs`` of each ratio:

- ``plain``: INT8 vs FP32 student, both plain, default allocator (the kernels alone);
- ``served vs user FP32``: the INT8 student as ``kdistill serve`` runs it vs the plain FP32 student
  in a default process (what a user would otherwise run);
- ``served vs served``: both students with kdistill's runtime (the fair both-ways figure);
- ``served vs best kernel``: the served INT8 student's time over the fastest kernel's in the same
  run (1.00: the server picked the fastest).
The same ratios with the other allocator setting are in the JSON (``other_allocator_*``), with the
load average of every run.

Targets: INT8 student >= 1.5x faster than the FP32 student, >= 5x faster than the FP32 teacher; the
served kernel within 5% of the fastest kernel measured (run-to-run noise); on a CPU with VNNI, the
served INT8 student >= 2.5x the FP32 student at batch 1 (reported as not measurable elsewhere).
Writes benchmarks/results/quant_latency.json (with the command that produced it) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.bench_common

from benchmarks import bench_common
from kdistill.serving import kernel_choice
from kdistill.serving.runtime import TUNE_ALLOCATOR_DEFAULT, prepare_for_inference, tune_allocator
from kdistill.trainer import quantization as q

# The served student may be this much slower than the fastest kernel in the same run and still count
# as "never slower than the best kernel": run-to-run noise on a shared machine, not a choice.
SERVED_VS_BEST_TOLERANCE = 1.05


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
def time_variants(
    models: dict[str, nn.Module], batch: int, seq: int, vocab: int, repeats: int, family: str
) -> dict[str, tuple[float, float]]:
    """Per model, (wall, thread CPU) seconds of its best forward pass. Every model gets the same
    ``repeats`` rounds, one forward each per round, in an order that rotates every round (ABC, BCA,
    CAB...), so a burst of load from other processes hits all of them alike and none always runs
    first; the minimum, because other processes only ever add time."""
    kwargs = forward_inputs(family, batch, seq, vocab)
    names = list(models)
    for model in models.values():
        model(**kwargs)  # warm-up: kernel packing, allocator
    best = {name: (float("inf"), float("inf")) for name in models}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            cpu, start = time.thread_time(), time.perf_counter()
            models[name](**kwargs)
            best[name] = min(best[name], (time.perf_counter() - start, time.thread_time() - cpu))
    return best


def served_name(kernel: str) -> str:
    return f"served_int8[{kernel}]"


def variants(family: str, args: argparse.Namespace) -> tuple[dict[str, nn.Module], kernel_choice.KernelChoice]:
    """The models one run times, and the INT8 kernel chosen for the student the way the server
    chooses it when it loads a model (measured; this process's cache directory is fresh)."""
    teacher = build(family, args.teacher_layers, args.width, args.vocab, args.seq)
    student = build(family, args.teacher_layers // 4, args.width, args.vocab, args.seq)
    int8 = q.quantize_ptq_int8(copy.deepcopy(student))
    served_int8 = copy.deepcopy(int8)
    choice = kernel_choice.apply(served_int8)  # its kernel per band of row counts, as the server runs it
    prepare_for_inference(served_int8)
    served_fp32 = copy.deepcopy(student)
    prepare_for_inference(served_fp32)
    models = {
        "teacher_fp32": teacher,
        "student_fp32": student,
        "student_int8": int8,
        "served_fp32": served_fp32,
        "served_int8": served_int8,
    }
    for kernel in kernel_choice.candidates():  # the served student under every kernel
        model = q.set_int8_kernel(copy.deepcopy(int8), kernel)
        prepare_for_inference(model)
        models[served_name(kernel)] = model
    return models, choice


def child_run(args: argparse.Namespace) -> dict[str, Any]:
    """One run of every variant at batch 1 and 16, in this process (allocator as ``--child``). A
    kernel more than ``kernel_choice.PRUNE_FACTOR`` times slower than the fastest at batch 1 is not
    timed at batch 16 (on an AVX2-only CPU ``torchao-dynamic`` would take minutes there)."""
    torch.set_num_threads(args.threads)
    tuned = tune_allocator() if args.child == "tuned" else False
    out: dict[str, Any] = {"allocator": args.child, "allocator_tuned": tuned, "families": {}}
    for family in args.families:
        models, choice = variants(family, args)
        rows: dict[str, Any] = {"served_kernel": choice.kernel, "served_bands": choice.bands, "probe_ms": choice.ms}
        skipped: set[str] = set()
        for batch in (1, 16):
            timed = time_variants(
                {n: m for n, m in models.items() if n not in skipped}, batch, args.seq, args.vocab, args.repeats, family
            )
            row: dict[str, float] = {}
            for name, (wall, cpu) in timed.items():
                row[f"{name}_ms"] = wall * 1e3
                row[f"{name}_cpu_ms"] = cpu * 1e3
            rows[f"batch{batch}"] = row
            by_kernel = {
                k: row[f"{served_name(k)}_ms"] for k in kernel_choice.candidates() if served_name(k) not in skipped
            }
            if batch == 1:
                fastest = min(by_kernel.values())
                skipped = {  # the served model itself always runs
                    served_name(k) for k, ms in by_kernel.items() if ms > kernel_choice.PRUNE_FACTOR * fastest
                }
        out["families"][family] = rows
    return out


def spawn(args: argparse.Namespace, allocator: str) -> dict[str, Any]:
    """``child_run`` in a fresh process: a process's allocator settings cannot be undone. Each child
    gets an empty kernel cache, so it measures its kernel as a server on a new machine would."""
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
    with tempfile.TemporaryDirectory(prefix="kdistill-kernel-cache-") as cache:
        env = {**os.environ, kernel_choice.CACHE_DIR_ENV: cache}
        env.pop(q.KERNEL_ENV, None)  # the choice, not a forced kernel
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{allocator} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return cast(dict[str, Any], json.loads(done.stdout.strip().splitlines()[-1]))


def times(row: dict[str, float], cpu: bool) -> dict[str, float]:
    """Variant -> ms of one run's row: wall (``name_ms``) or thread CPU (``name_cpu_ms``)."""
    if cpu:
        return {k.removesuffix("_cpu_ms"): v for k, v in row.items() if k.endswith("_cpu_ms")}
    return {k.removesuffix("_ms"): v for k, v in row.items() if k.endswith("_ms") and not k.endswith("_cpu_ms")}


def ratios(default: dict[str, float], tuned: dict[str, float]) -> dict[str, float]:
    """The speedups of one run at one batch size (wall time; ``*_cpu`` from thread CPU time).
    "served" is the runtime ``kdistill serve`` runs by default (its allocator setting:
    ``TUNE_ALLOCATOR_DEFAULT``, its INT8 kernel choice); "other_allocator" the same models with the
    other setting. ``served_vs_best_kernel``: the served student's time over the fastest kernel's
    time in the same run (1.0: the choice was the fastest; above 1: slower than the best)."""
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
        kernels = [v for k, v in srv.items() if k.startswith("served_int8[")]
        out[f"served_vs_best_kernel{tag}"] = srv["served_int8"] / min(kernels)
    return out


def by_kernel(raw: list[dict[str, Any]], family: str, batch: str) -> dict[str, float | None]:
    """Median ms per kernel over the runs (served runtime and allocator); None: not timed at this
    batch size (far slower than the fastest at batch 1)."""
    srv = "tuned" if TUNE_ALLOCATOR_DEFAULT else "default"
    out: dict[str, float | None] = {}
    for kernel in kernel_choice.candidates():
        key = f"{served_name(kernel)}_ms"
        values = [r[srv]["families"][family][batch][key] for r in raw if key in r[srv]["families"][family][batch]]
        out[kernel] = statistics.median(values) if len(values) == len(raw) else None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cpu = q.cpu_int8_features()
    report: dict[str, Any] = {
        "command": bench_common.command_line(),
        "cpu": cpu,
        "threads": args.threads,
        **bench_common.machine_state(),
        "runs": args.runs,
        "repeats": args.repeats,
        "table_kernel": q.select_int8_kernel(),
        "seq_len": args.seq,
        "families": {},
    }
    raw = []
    for i in range(args.runs):
        # Both allocators in every run, their order alternating (AB, BA, AB...), so a change in the
        # machine's load hits them alike.
        order = ("default", "tuned") if i % 2 == 0 else ("tuned", "default")
        before = bench_common.machine_state()["load_average"]
        one = {allocator: spawn(args, allocator) for allocator in order}
        raw.append({**one, "order": list(order), "load_average": before, "load_average_after": list(os.getloadavg())})
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
                        "load_average": r["load_average"],
                    }
                )
            keys = [k for k in per_run[0] if k != "load_average" and all(k in p for p in per_run)]
            rows[b] = {**{key: statistics.median(p[key] for p in per_run) for key in keys}, "per_run": per_run}
            rows[f"{b}_ms_by_kernel"] = by_kernel(raw, family, b)
        srv = "tuned" if TUNE_ALLOCATOR_DEFAULT else "default"
        rows["served_kernel_per_run"] = [r[srv]["families"][family]["served_kernel"] for r in raw]
        rows["served_bands_per_run"] = [r[srv]["families"][family]["served_bands"] for r in raw]
        rows["probe_ms_per_run"] = [r[srv]["families"][family]["probe_ms"] for r in raw]
        rows["layers"] = {"teacher": args.teacher_layers, "student": args.teacher_layers // 4}
        report["families"][family] = rows
    report["allocator_tuned"] = raw[0]["tuned"]["allocator_tuned"]
    report["served_allocator"] = "tuned" if TUNE_ALLOCATOR_DEFAULT else "default"
    report["load_average_per_run"] = [r["load_average"] for r in raw]
    report["load_average_at_end"] = bench_common.machine_state()["load_average"]
    report["targets"] = {
        "int8_vs_fp32_student": 1.5,
        "int8_vs_teacher": 5.0,
        "served_vs_best_kernel_at_most": SERVED_VS_BEST_TOLERANCE,
        "vnni_served_int8_vs_fp32_student_batch1": 2.5,
    }
    report["met"] = {
        f"{fam}/{b}": {
            **{
                key: r[b][key] >= (5.0 if "teacher" in key else 1.5)
                for key in (
                    "plain_int8_vs_fp32_student",
                    "served_int8_vs_user_fp32_student",
                    "served_int8_vs_served_fp32_student",
                    "served_int8_vs_teacher",
                )
            },
            "served_vs_best_kernel": r[b]["served_vs_best_kernel"] <= SERVED_VS_BEST_TOLERANCE,
        }
        for fam, r in report["families"].items()
        for b in ("batch1", "batch16")
    }
    if not (cpu["vnni"] or cpu["amx"]):
        report["met"]["vnni_target"] = "not measurable: this CPU has no VNNI (nor AMX)"
    else:  # the served INT8 student against the FP32 student, as served and as a user runs it
        report["met"]["vnni_target"] = {
            f"{fam}/batch1": {
                key: r["batch1"][key] >= 2.5
                for key in ("served_int8_vs_served_fp32_student", "served_int8_vs_user_fp32_student")
            }
            for fam, r in report["families"].items()
        }
    return report


def print_table(report: dict[str, Any]) -> None:
    cpu = report["cpu"]
    print(
        f"CPU: {cpu['torch_cpu_capability']} avx512={cpu['avx512']} vnni={cpu['vnni']} amx={cpu['amx']}; "
        f"threads={report['threads']}; table kernel: {report['table_kernel']}; seq={report['seq_len']}; "
        f"load average {report['load_average'][0]:.1f} -> {report['load_average_at_end'][0]:.1f} "
        f"on {report['cpus']} CPUs (per run: "
        + ", ".join(f"{la[0]:.1f}" for la in report["load_average_per_run"])
        + ")"
    )
    srv = report["served_allocator"]
    print(
        f"medians of {report['runs']} runs (ms: wall, best of {report['repeats']} rounds). default = glibc allocator "
        f"as is; served = as kdistill serve runs it: its INT8 kernel choice, tanh-GELU swap, allocator {srv}"
    )
    head = (
        f"{'model':16} {'batch':>5} {'teacher':>8} {'fp32':>7} {'int8':>7} {'fp32 srv':>8} {'int8 srv':>8} "
        f"{'plain':>6} {'srv/user':>8} {'srv/srv':>7} {'srv/teach':>9} {'srv/best':>8} {'cpu srv/srv':>11}"
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
                f"{r['served_int8_vs_teacher']:8.2f}x {r['served_vs_best_kernel']:7.2f}x "
                f"{r['served_int8_vs_served_fp32_student_cpu']:10.2f}x"
            )
        for b in ("batch1", "batch16"):
            ks = ", ".join(
                f"{k} {v:.1f} ms" if v is not None else f"{k} not timed" for k, v in rows[f"{b}_ms_by_kernel"].items()
            )
            print(f"{'':16} served student by kernel, {b}: {ks}")
        chosen = [
            k + "".join(f", from {n} rows {b}" for n, b in bands)
            for k, bands in zip(rows["served_kernel_per_run"], rows["served_bands_per_run"], strict=True)
        ]
        print(f"{'':16} kernels the server chose, per run: {'; '.join(chosen)}")
    if "vnni_target" in report["met"]:
        print(f"VNNI target (served INT8 >= 2.5x FP32 at batch 1): {report['met']['vnni_target']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # One thread by default: on a shared 2-core machine two OpenMP threads spin-wait on each other
    # (measured 10-15x slower per small matmul under load); pass --threads N on a dedicated machine.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5, help="rounds per run; every variant runs once per round")
    p.add_argument("--runs", type=int, default=3, help="whole comparisons; the table shows their medians")
    p.add_argument("--families", nargs="+", default=["bert-classifier", "gpt2-lm"])
    p.add_argument("--out", type=Path, default=bench_common.RESULTS / "quant_latency.json")
    p.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)  # one run, JSON on stdout
    args, _ = p.parse_known_args()
    if args.child:
        print(json.dumps(child_run(p.parse_args())))
        return
    bench_common.main(p, run, print_table)


if __name__ == "__main__":
    main()
