"""Training step overlap with a served teacher: the student's step time when the teacher is a
``kdistill serve`` process against the same step with the teacher in the training process, and
how much of the served teacher's latency the in-flight requests hide.

Variants, each in its own process, on the same job (logits objective, live teacher, no cache,
padded batches on every side: ``KDISTILL_PACKED_STEP=0``, so that only where the teacher runs
differs):

- ``in-process``: the teacher's forward in the training process, before the student's;
- ``served``: the teacher behind ``kdistill serve`` on loopback; the trainer asks for the next
  micro-batch's top-K while the student steps on the current one (what the trainer does);
- ``served-sequential``: the same server, the look-ahead turned off (each micro-batch's request
  is sent when the step needs it), so every step waits out the teacher's whole latency.

Per variant: the median step time over the timed steps; the time a step spent waiting for the
teacher's answer (``RemoteTargetSource.wait_seconds``); the in-process teacher's time per step
(``TeacherTargetSource.for_batch``); the trainer's CPU time per step (all its threads); and the
server's CPU time per step (its process, over the whole run). ``hidden`` =
1 - wait(served) / wait(served-sequential): the share of the teacher's latency the look-ahead
hides behind the student's step. The trainer and the server each run ``--threads`` torch
threads; on a machine with fewer free cores than both together the two compete for the CPU and
the overlap hides less than on separate hardware (the load average is recorded beside each run).

Rounds: every round runs every variant once, in an order rotated by one each round.

    .venv/bin/python -P benchmarks/teacher_overlap.py [--rounds 3] [--steps 12] [--warmup 3]
        [--batch 8] [--top-k 64] [--threads 1]

Writes benchmarks/results/teacher_overlap.json (``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import RESULTS, command_line, machine_state, write_report  # noqa: E402

MAX_LEN = 128
VOCAB = 1024
SEED = 0
TEACHER = {"layers": 6, "width": 192, "heads": 4}
STUDENT = {"layers": 2, "width": 64, "heads": 4}
VARIANTS = ("in-process", "served", "served-sequential")


def prepare(work: Path) -> None:
    """Corpus, tokenizer and a GPT2 teacher (random weights: step times do not depend on them)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdistill.trainer.corpus import build_pydoc_corpus
    from kdistill.trainer.data import read_jsonl
    from kdistill.trainer.tokenizer_build import build_tokenizer

    train, _ = build_pydoc_corpus(work / "data", max_chars=600, min_chars=20)
    rows = read_jsonl(train, text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.0)
    tok = build_tokenizer([r.text for r in rows], VOCAB, work / "teacher")
    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=MAX_LEN,
        n_embd=TEACHER["width"],
        n_layer=TEACHER["layers"],
        n_head=TEACHER["heads"],
        pad_token_id=tok.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(str(work / "teacher"))


def job(work: Path, steps: int, batch: int, top_k: int) -> dict[str, Any]:
    return {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "overlap"},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": str(work / "teacher"), "dtype": "float32"},
            "student": {
                "fromTeacher": {
                    "numLayers": STUDENT["layers"],
                    "hiddenSize": STUDENT["width"],
                    "numAttentionHeads": STUDENT["heads"],
                }
            },
            "data": {"train": str(work / "data" / "train.jsonl"), "maxSeqLength": MAX_LEN},
            "distillation": {
                "loss": "forward-kl",
                "stages": [{"name": "output", "steps": steps, "objectives": ["logits"]}],
                "batchSize": batch,
                "warmupSteps": 0,
                "seed": SEED,
                "teacherCache": {"enabled": False, "topK": top_k},
            },
            "quantization": {"mode": "none"},
            "parallelism": {"nodes": 1, "gpusPerNode": 0},
            "checkpoint": {"everySteps": 1_000_000, "keep": 1},
            "serving": {"enabled": False},
        },
    }


# ---- one variant, in its own process ------------------------------------------------------------
def run_variant(variant: str, work: Path, out: Path, steps: int, warmup: int, batch: int, top_k: int) -> dict[str, Any]:
    import torch

    from kdistill.api import parse_job
    from kdistill.trainer.loop import RunOptions, Trainer
    from kdistill.trainer.outputs import OutputLayout
    from kdistill.trainer.remote_targets import RemoteTargetSource
    from kdistill.trainer.targets import TeacherTargetSource

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    shutil.rmtree(out, ignore_errors=True)  # never resume an earlier round
    if variant == "served-sequential":
        RemoteTargetSource.prefetch = lambda self, batch: None  # type: ignore[method-assign]
    # The in-process teacher's time per step: its forward (and top-k/rows) inside for_batch.
    teacher_seconds = [0.0]
    local_for_batch = TeacherTargetSource.for_batch

    def timed_for_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return local_for_batch(self, *args, **kwargs)
        finally:
            teacher_seconds[0] += time.perf_counter() - started

    TeacherTargetSource.for_batch = timed_for_batch  # type: ignore[method-assign]
    marks: list[tuple[float, float, float, float]] = []
    holder: list[Any] = []

    def waited() -> float:
        source = getattr(holder[0].flow, "targets", None)
        return float(getattr(source, "wait_seconds", 0.0))

    def on_step(_report: Any) -> None:
        marks.append((time.perf_counter(), waited(), teacher_seconds[0], time.process_time()))

    trainer = Trainer(
        parse_job(job(work, warmup + steps, batch, top_k)),
        RunOptions(output=OutputLayout(out), base_dir=work, evaluate=False, on_step=on_step),
    )
    holder.append(trainer)
    trainer.train()
    timed = marks[warmup - 1 :]
    step_seconds = [b[0] - a[0] for a, b in itertools.pairwise(timed)]
    return {
        "median_step_ms": 1000 * statistics.median(step_seconds),
        "teacher_wait_ms_per_step": 1000 * (timed[-1][1] - timed[0][1]) / steps,
        "in_process_teacher_ms_per_step": 1000 * (timed[-1][2] - timed[0][2]) / steps,
        "trainer_cpu_ms_per_step": 1000 * (timed[-1][3] - timed[0][3]) / steps,
        "steps": steps,
        "tokens": trainer.tokens_seen,
    }


# ---- the driver ---------------------------------------------------------------------------------
def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as answer:
            return int(answer.status) == 200
    except OSError:
        return False


@contextlib.contextmanager
def teacher_server(work: Path, threads: int, top_k: int) -> Iterator[tuple[str, int]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-P", "-m", "kdistill.cli.main", "serve", str(work / "teacher"), "--port", str(port)]
    cmd += ["--threads", str(threads), "--max-wait-ms", "2", "--max-logprobs-binary", str(max(128, top_k))]
    log = (work / "server.log").open("w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
    )
    try:
        deadline = time.monotonic() + 600
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"teacher server failed: {(work / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(variant: str, work: Path, url: str, server_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "KDISTILL_PACKED_STEP": "0"}
    env.pop("KDISTILL_TEACHER_URL", None)
    if variant != "in-process":
        env["KDISTILL_TEACHER_URL"] = url
    cmd = [sys.executable, "-P", __file__, "--variant", variant, "--work", str(work)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    cmd += ["--top-k", str(args.top_k)]
    load = list(os.getloadavg())
    server_cpu = cpu_seconds(server_pid)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average_before"] = load
    # Over the whole run (warm-up steps and the start-up check included): what the server spent.
    result["server_cpu_ms_per_step"] = 1000 * (cpu_seconds(server_pid) - server_cpu) / (args.steps + args.warmup)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="teacher-overlap-"))
    prepare(work)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with teacher_server(work, args.threads, args.top_k) as (url, server_pid):
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                runs[variant].append(spawn(variant, work, url, server_pid, args))
                print(f"round {r + 1} {variant}: {runs[variant][-1]}", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    for variant, results in runs.items():
        summary[variant] = {
            key: statistics.median(x[key] for x in results)
            for key in (
                "median_step_ms",
                "teacher_wait_ms_per_step",
                "in_process_teacher_ms_per_step",
                "trainer_cpu_ms_per_step",
                "server_cpu_ms_per_step",
            )
        }
    seq = summary["served-sequential"]["teacher_wait_ms_per_step"]
    summary["hidden_share_of_teacher_latency"] = (
        1 - summary["served"]["teacher_wait_ms_per_step"] / seq if seq else None
    )
    summary["served_over_in_process_step"] = (
        summary["served"]["median_step_ms"] / summary["in-process"]["median_step_ms"]
    )
    return {
        "command": command_line(),
        "machine": machine_state(),
        "settings": {
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup": args.warmup,
            "batch": args.batch,
            "top_k": args.top_k,
            "threads_each": args.threads,
            "teacher": TEACHER,
            "student": STUDENT,
            "max_len": MAX_LEN,
            "vocab": VOCAB,
        },
        "summary": summary,
        "runs": runs,
    }


def print_table(report: dict[str, Any]) -> None:
    s = report["summary"]
    cols = ("median_step_ms", "teacher_wait_ms_per_step", "in_process_teacher_ms_per_step")
    cols += ("trainer_cpu_ms_per_step", "server_cpu_ms_per_step")
    print(f"{'variant':<20} " + " ".join(f"{c.replace('_ms_per_step', '').replace('_ms', ''):>20}" for c in cols))
    for v in VARIANTS:
        print(f"{v:<20} " + " ".join(f"{s[v][c]:>20.1f}" for c in cols))
    hidden = s["hidden_share_of_teacher_latency"]
    print(f"latency hidden by the look-ahead: {hidden:.0%}" if hidden is not None else "no latency measured")
    print(f"served step / in-process step: {s['served_over_in_process_step']:.2f}")
    print(f"load average at the end: {report['machine']['load_average']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the server")
    p.add_argument("--out", type=Path, default=RESULTS / "teacher_overlap.json")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant is not None:
        work = Path(args.work)
        result = run_variant(
            args.variant, work, work / f"out-{args.variant}", args.steps, args.warmup, args.batch, args.top_k
        )
        print(json.dumps(result))
        return
    report = run(args)
    write_report(report, args.out)
    print_table(report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
