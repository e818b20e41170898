"""Peak RSS per rank of a pipeline-split student: while loading, during one training step, and
while saving, for this tree's code and another checkout's (``--tree``, e.g. the commit before
meta-device loading), at 1, 2 and 4 ranks.

The student is Llama-shaped with TinyLlama's widths (hidden 2048, intermediate 5632, 32 heads, 4
KV heads, vocabulary 32000) and ``--layers`` blocks (TinyLlama has 22; the default is smaller so
that both variants fit on a shared machine), random weights saved as safetensors. The teacher is
a 2-block Llama of width 64 with the same vocabulary, so the figures are the student's.

Each rank is a real ``python -m kdistill.trainer`` process (gloo, CPU), started with torchrun's
variables; a sampler reads every rank's VmRSS from /proc every 20 ms and files each sample under
the phase rank 0 is in: ``load`` until the ``plan`` event (models loaded and split, before the
first step), ``step`` until the last step's record, ``save`` until the process exits (the final
student written, then the served artifact). A run whose ranks together pass ``--cap-gib`` is
stopped and its cell recorded as not fitting, with the RSS measured when it was stopped.

Target per rank: (student parameters + gradients + AdamW's two moments) / N in fp32 plus a
bounded allowance (``--allowance-gib``: the interpreter, torch, the teacher, activations and
the 512 MiB shard buffer of the streamed save); at ``load`` only the parameters count. A cell
meets it on the median of ``--repeats`` runs.

    flock /tmp/kdistill-bench.lock .venv/bin/python -P benchmarks/sharded_memory.py --tree /tmp/kdistill-today
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.append(str(Path(__file__).resolve().parent))
from bench_common import RESULTS, ROOT, command_line, machine_state, main

GIB = 2**30
PHASES = ("load", "step", "save")
WIDTHS = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
# Started instead of ``python -m kdistill.trainer``: points the editable install's import map at
# the tree under test before anything of kdistill is imported.
BOOT = (
    "import sys, runpy, __editable___kdistill_0_1_0_finder as f; "
    "f.MAPPING.update({k: v.replace(sys.argv[1], sys.argv[2], 1) for k, v in f.MAPPING.items()}); "
    "sys.argv = ['kdistill.trainer', *sys.argv[3:]]; runpy.run_module('kdistill.trainer', run_name='__main__')"
)


def git_commit(tree: Path) -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True)
    if head.returncode == 0:
        return head.stdout.strip()
    marker = tree / ".commit"  # a `git archive` export records its commit here
    return marker.read_text().strip() if marker.is_file() else "unknown"


def build_models(work: Path, layers: int, widths: dict[str, int]) -> tuple[Path, Path, int]:
    """The student (random weights) and the teacher with a tokenizer; returns their folders and
    the student's parameter count."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    student_dir, teacher_dir = work / "student", work / "teacher"
    common = {"max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    torch.manual_seed(0)
    if not (student_dir / "config.json").is_file():
        cfg = LlamaConfig(**widths, num_hidden_layers=layers, tie_word_embeddings=False, **common)
        LlamaForCausalLM(cfg).save_pretrained(str(student_dir))
    if not (teacher_dir / "config.json").is_file():
        cfg = LlamaConfig(
            vocab_size=widths["vocab_size"],
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
        LlamaForCausalLM(cfg).save_pretrained(str(teacher_dir))
        raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizers.Whitespace()
        words = [f"w{i}" for i in range(200)]
        raw.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>"]))
        PreTrainedTokenizerFast(
            tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>"
        ).save_pretrained(str(teacher_dir))
    with open(student_dir / "config.json") as f:
        cfg_dict = json.load(f)
    h, i, v, n = cfg_dict["hidden_size"], cfg_dict["intermediate_size"], cfg_dict["vocab_size"], layers
    kv = cfg_dict["num_key_value_heads"] * h // cfg_dict["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return student_dir, teacher_dir, 2 * v * h + n * per_layer + h


def write_job(work: Path, student: Path, teacher: Path, world: int, seq: int) -> Path:
    data = work / "train.jsonl"
    if not data.is_file():
        rows = [{"text": " ".join(f"w{(7 * j + k) % 200}" for k in range(seq))} for j in range(64)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": f"mem{world}"},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": str(teacher), "dtype": "float32"},
            "student": {"model": str(student)},
            "data": {"train": str(data), "maxSeqLength": seq},
            "distillation": {
                "stages": [{"name": "output", "steps": 1, "objectives": ["logits"]}],
                "batchSize": 2,
                "learningRate": 1e-4,
            },
            "quantization": {"mode": "none"},
            "parallelism": {
                "nodes": world,
                "gpusPerNode": 0,
                "student": {"data": 1, "tensor": 1, "pipeline": world},
            },
            "checkpoint": {"everySteps": 1000, "keep": 1},
            "serving": {"enabled": False},
        },
    }
    path = work / f"job{world}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Phases:
    """Rank 0's phase, advanced by its output lines."""

    def __init__(self) -> None:
        self.now = "load"

    def feed(self, line: str) -> None:
        start = line.find("{")
        if start < 0:
            return
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            return
        if record.get("event") == "plan":
            self.now = "step"
        elif record.get("event") == "step" and record.get("step") == record.get("totalSteps"):
            self.now = "save"


def run_once(tree: Path, job: Path, out: Path, world: int, cap: int) -> dict[str, Any]:
    """One run: per-rank peak RSS per phase, or the RSS at which the cap stopped it."""
    shutil.rmtree(out, ignore_errors=True)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TORCHELASTIC_USE_AGENT_STORE="",
            OMP_NUM_THREADS="1",
            TRANSFORMERS_VERBOSITY="error",
        )
        cmd = [sys.executable, "-P", "-c", BOOT, str(ROOT), str(tree), "--config", str(job), "--output", str(out)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
        )
    phases = Phases()
    tails: list[list[str]] = [[] for _ in procs]

    def pump(i: int) -> None:
        assert procs[i].stdout is not None
        for line in procs[i].stdout:
            tails[i] = (tails[i] + [line])[-40:]
            if i == 0:
                phases.feed(line)

    readers = [threading.Thread(target=pump, args=(i,), daemon=True) for i in range(world)]
    for t in readers:
        t.start()
    peaks = [dict.fromkeys(PHASES, 0) for _ in procs]
    stopped_at = None
    while any(p.poll() is None for p in procs):
        now = phases.now
        rss = [_rss(p.pid) or 0 for p in procs]
        for r, value in enumerate(rss):
            peaks[r][now] = max(peaks[r][now], value)
        if sum(rss) > cap and stopped_at is None:
            stopped_at = {"phase": now, "rss_gib": [round(x / GIB, 3) for x in rss]}
            for p in procs:
                p.kill()
        time.sleep(0.02)
    for t in readers:
        t.join(timeout=5)
    result: dict[str, Any] = {"peak_gib": [{k: round(v / GIB, 3) for k, v in pk.items()} for pk in peaks]}
    if stopped_at is not None:
        result["stopped"] = stopped_at
    elif any(p.returncode != 0 for p in procs):
        bad = next(i for i, p in enumerate(procs) if p.returncode != 0)
        raise RuntimeError(f"rank {bad} exited {procs[bad].returncode}:\n{''.join(tails[bad])}")
    return result


def wait_for_memory(need: int, patience_s: float = 120.0) -> int:
    """Available memory (``free``'s figure) once it reaches ``need``, or what it was at the end."""
    deadline = time.monotonic() + patience_s
    while True:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        if avail >= need or time.monotonic() > deadline:
            return avail
        time.sleep(10)


def target_gib(params: int, world: int, phase: str, allowance: float) -> float:
    per_param = 4 if phase == "load" else 16  # fp32 weights; + gradients + AdamW's two moments
    return round(params * per_param / world / GIB + allowance, 3)


def summarise(runs: list[dict[str, Any]], params: int, world: int, allowance: float, cap_gib: float) -> dict[str, Any]:
    stopped = [r for r in runs if "stopped" in r]
    if stopped:
        return {
            "fits": False,
            "note": f"does not fit in {cap_gib} GiB (all ranks together)",
            "stopped": [r["stopped"] for r in stopped],
        }
    cell: dict[str, Any] = {"fits": True, "per_rank": []}
    for rank in range(world):
        row: dict[str, Any] = {"rank": rank}
        for phase in PHASES:
            values = [r["peak_gib"][rank][phase] for r in runs]
            median = statistics.median(values)
            target = target_gib(params, world, phase, allowance)
            row[phase] = {"runs_gib": values, "median_gib": median, "target_gib": target, "met": median <= target}
        cell["per_rank"].append(row)
    return cell


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    widths = {**WIDTHS, "hidden_size": args.hidden, "intermediate_size": args.intermediate}
    student, teacher, params = build_models(work, args.layers, widths)
    trees = {"new": ROOT}
    if args.tree is not None:
        trees = {"today": args.tree.resolve(), "new": ROOT}
    cap = int(args.cap_gib * GIB)
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {v: {w: [] for w in args.ranks} for v in trees}
    loads: list[list[float]] = []
    for repeat in range(args.repeats):
        for world in args.ranks:
            job = write_job(work, student, teacher, world, args.seq)
            for variant, tree in trees.items():  # interleaved: today, new, today, new, ...
                avail = wait_for_memory(cap + 2 * GIB)
                loads.append(list(os.getloadavg()))
                out = work / f"out-{variant}-{world}"
                result = run_once(tree, job, out, world, cap)
                # A run's checkpoints and student take 5-7 GB at 0.92B: keep one run's at a time.
                shutil.rmtree(out, ignore_errors=True)
                result["available_gib_before"] = round(avail / GIB, 2)
                result["load_average"] = loads[-1]
                raw[variant][world].append(result)
                print(f"repeat {repeat} world {world} {variant}: {result}", flush=True)
    cells = {
        v: {str(w): summarise(raw[v][w], params, w, args.allowance_gib, args.cap_gib) for w in args.ranks}
        for v in trees
    }
    return {
        "command": command_line(),
        "benchmark": "sharded_memory",
        "machine": machine_state(),
        "commits": {v: git_commit(t) for v, t in trees.items()},
        "student": {**widths, "num_hidden_layers": args.layers, "parameters": params, "tinyllama_layers": 22},
        "layout": "student.pipeline = ranks (data 1, tensor 1)",
        "sequence_length": args.seq,
        "batch_size": 2,
        "allowance_gib": args.allowance_gib,
        "cap_gib": args.cap_gib,
        "repeats": args.repeats,
        "load_averages": loads,
        "cells": cells,
        "runs": {v: {str(w): raw[v][w] for w in args.ranks} for v in trees},
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"student: {report['student']['parameters'] / 1e6:.0f}M parameters, commits {report['commits']}")
    for variant, cells in report["cells"].items():
        for world, cell in cells.items():
            if not cell["fits"]:
                print(f"{variant:6} N={world}: {cell['note']} {cell['stopped']}")
                continue
            for row in cell["per_rank"]:
                parts = [
                    f"{p} {row[p]['median_gib']:.2f}/{row[p]['target_gib']:.2f} {'met' if row[p]['met'] else 'MISSED'}"
                    for p in PHASES
                ]
                print(f"{variant:6} N={world} rank {row['rank']}: " + "  ".join(parts))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=None, help="another checkout to measure beside this one")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=WIDTHS["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=WIDTHS["intermediate_size"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--cap-gib", type=float, default=14.0)
    parser.add_argument("--allowance-gib", type=float, default=1.5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kdistill-sharded-memory"))
    parser.add_argument("--out", type=Path, default=RESULTS / "sharded_memory.json")
    main(parser, run, print_table)
