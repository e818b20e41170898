"""Generation throughput of a served teacher for the sequence objective: many requests in flight
against one request at a time, on one real ``kdistill serve`` process with dynamic batching.

    flock /tmp/kdistill-bench.lock .venv/bin/python -P benchmarks/teacher_generation.py \
        [--prompts 64] [--max-new-tokens 64] [--runs 3] [--teacher DIR]

The work is what a sequence stage asks of its teacher: prompts from data (the first half of each
line of the pydoc corpus, as ``data.promptField`` falls back to; those that leave no room for
``--max-new-tokens`` in the teacher's 128-token context are left out), ``--max-new-tokens`` per
completion with temperature 0.8 and top-p 0.95, written into a generated set by the trainer's own
``generated_set.generate_shards`` through the trainer's ``HttpTeacher``. The two variants differ
only on the client side:

- **in flight**: ``generate_shards`` keeps ``--in-flight-shards`` shards of 16 prompts asked at
  once, and ``HttpTeacher`` cuts them into requests of ``--prompts-per-request`` prompts on
  ``--max-in-flight`` connections (the trainer's settings);
- **one at a time**: one shard in flight, one prompt per request, one connection.

Both talk to the same server (dynamic batching: ``--max-batch-size`` 64, ``--max-wait-ms`` 10),
started once and warmed up. Each run times both variants on a fresh output folder, the order
alternating from run to run; tokens are the server's own count of generated tokens
(``kdistill_tokens_total{kind="generated"}``), and the server's mean decode batch comes from its
``kdistill_decode_rows`` / ``kdistill_decode_steps``. The figures are medians over ``--runs``;
each run records the load average before it. Target: in flight >= 4x the tokens/s of one
request at a time.

The teacher defaults to an untrained GPT2 of the quickstart teacher's shape (4 layers, 128 wide,
the 2048-token pydoc tokenizer, FP32, served as a plain Hugging Face directory): throughput does
not depend on what the weights say, and an untrained model rarely stops early, so both variants
write about the same number of tokens. ``--teacher DIR`` serves another model directory.
Writes benchmarks/results/teacher_generation.json (with the command that produced it).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.serving.helpers: the server process

from benchmarks import bench_common
from kdistill.trainer import generated_set as gs
from kdistill.trainer.teacher_client import HttpTeacher
from tests.serving.helpers import ServerProcess

TARGET_SPEEDUP = 4.0


def build_teacher(root: Path) -> Path:
    """An untrained GPT2 of the quickstart teacher's shape, saved as a plain HF directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdistill.trainer.teacher_pretrain import PretrainConfig
    from kdistill.trainer.tokenizer_build import build_tokenizer
    from tests.serving.helpers import pydoc_texts

    cfg = PretrainConfig()
    torch.manual_seed(0)  # the same weights, so the same completions' lengths, run to run
    tok = build_tokenizer(pydoc_texts(2000), cfg.vocab_size, root / "tokenizer", model_max_length=cfg.max_length)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=cfg.max_length,
            n_embd=cfg.width,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=int(tok.pad_token_id),
        )
    ).eval()
    out = root / "teacher"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def data_prompts(root: Path, teacher: Path, count: int, max_new_tokens: int) -> list[str]:
    """Prompts as a sequence stage takes them from the pydoc corpus, fitted to the teacher."""
    from transformers import AutoConfig, AutoTokenizer

    from kdistill.trainer.corpus import build_pydoc_corpus
    from kdistill.trainer.prompts import read_prompts

    train, _ = build_pydoc_corpus(root / "data")
    prompts = read_prompts(train, prompt_field="prompt", text_field="text", max_bad_fraction=0.0)
    tok = AutoTokenizer.from_pretrained(str(teacher))
    config = AutoConfig.from_pretrained(str(teacher))
    room = int(getattr(config, "n_positions", None) or config.max_position_embeddings) - max_new_tokens
    fitting = [p for p in prompts if len(tok(p).input_ids) <= room]
    if len(fitting) < count:
        raise SystemExit(f"only {len(fitting)} prompts fit {room} tokens; ask for fewer")
    return fitting[:count]


def generated_tokens(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('kdistill_tokens_total{kind="generated"}'):
            return float(line.split()[-1])
    return 0.0


def timed(
    args: argparse.Namespace, server: ServerProcess, plan: gs.GenerationPlan, root: Path, *, in_flight: bool
) -> dict[str, Any]:
    """One variant: the whole generated set written through HttpTeacher, timed, with the CPU
    time the server spent on it."""
    url = server.url
    proc = psutil.Process(server.proc.pid)
    teacher = HttpTeacher(
        url,
        max_in_flight=args.max_in_flight if in_flight else 1,
        prompts_per_request=args.prompts_per_request if in_flight else 1,
    )
    root.mkdir(parents=True)
    load_before = bench_common.machine_state()["load_average"]
    tokens_before = generated_tokens(url)
    rows_before = _decode_raw(url)
    cpu_before = proc.cpu_times()
    started = time.perf_counter()
    try:
        written = gs.generate_shards(root, plan, teacher, in_flight=args.in_flight_shards if in_flight else 1)
    finally:
        teacher.close()
    seconds = time.perf_counter() - started
    cpu_after = proc.cpu_times()
    server_cpu = cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system
    tokens = generated_tokens(url) - tokens_before
    rows_after = _decode_raw(url)
    steps = rows_after[1] - rows_before[1]
    completions = sum(len((root / gs.shard_name(i)).read_text(encoding="utf-8").splitlines()) for i in written)
    return {
        "seconds": seconds,
        "generated_tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "server_cpu_seconds": server_cpu,
        "server_cpu_ms_per_token": server_cpu / tokens * 1e3 if tokens else float("nan"),
        "completions": completions,
        "requests": teacher.requests,
        "mean_decode_batch": (rows_after[0] - rows_before[0]) / steps if steps else 0.0,
        "load_average_before": load_before,
    }


def _decode_raw(url: str) -> tuple[float, float]:
    """The server's cumulative decode rows and decode steps."""
    vals = {"kdistill_decode_rows_total": 0.0, "kdistill_decode_steps_total": 0.0}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name = line.split(" ")[0]
        if name in vals:
            vals[name] = float(line.split()[-1])
    return vals["kdistill_decode_rows_total"], vals["kdistill_decode_steps_total"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    at_start = bench_common.machine_state()
    root = Path(tempfile.mkdtemp(prefix="kdistill-teacher-gen-"))
    teacher_dir = args.teacher or build_teacher(root)
    prompts = data_prompts(root, teacher_dir, args.prompts, args.max_new_tokens)
    plan = gs.GenerationPlan(
        prompts=prompts,
        samples_per_prompt=1,
        max_new_tokens=args.max_new_tokens,
        temperature=0.8,
        top_p=0.95,
        seed=0,
        teacher={"model": str(teacher_dir)},
    )
    server = ServerProcess(
        teacher_dir,
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-batch-tokens",
        "16384",
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-queue",
        "1024",
        threads=args.threads,
        log_path=root / "server.log",
    )
    runs: list[dict[str, Any]] = []
    try:
        server.wait_ready()
        # Warm-up: the same path, a few prompts, both shapes of request.
        warm = dataclasses.replace(plan, prompts=prompts[:8])
        timed(args, server, warm, root / "warm-a", in_flight=True)
        timed(args, server, warm, root / "warm-b", in_flight=False)
        for i in range(args.runs):
            order = ["in_flight", "one_at_a_time"] if i % 2 == 0 else ["one_at_a_time", "in_flight"]
            variants = {
                name: timed(args, server, plan, root / f"run{i}-{name}", in_flight=name == "in_flight")
                for name in order
            }
            variants["order"] = order  # type: ignore[assignment]
            fast, slow = variants["in_flight"], variants["one_at_a_time"]
            variants["speedup"] = fast["tokens_per_second"] / slow["tokens_per_second"]  # type: ignore[assignment]
            # The same ratio per server CPU second: on a shared machine the server's share of the
            # CPU moves between variants, and this ratio does not depend on it.
            ratio = slow["server_cpu_ms_per_token"] / fast["server_cpu_ms_per_token"]
            variants["speedup_per_server_cpu"] = ratio  # type: ignore[assignment]
            runs.append(variants)
    finally:
        server.terminate()
    medians = {
        name: {
            k: statistics.median(r[name][k] for r in runs)
            for k in (
                "tokens_per_second",
                "seconds",
                "generated_tokens",
                "mean_decode_batch",
                "requests",
                "server_cpu_ms_per_token",
            )
        }
        for name in ("in_flight", "one_at_a_time")
    }
    speedups = [r["speedup"] for r in runs]
    per_cpu = [r["speedup_per_server_cpu"] for r in runs]
    return {
        "command": bench_common.command_line(),
        **at_start,
        "teacher": str(args.teacher)
        if args.teacher
        else "untrained GPT2, quickstart teacher shape (4x128, vocab 2048)",
        "server": {
            "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms,
            "threads": args.threads,
        },
        "work": {
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "temperature": 0.8,
            "top_p": 0.95,
            "prompt_source": "pydoc corpus, first half of each line (data.promptField fallback)",
        },
        "client": {
            "in_flight": {
                "shards_in_flight": args.in_flight_shards,
                "prompts_per_shard": plan.shard_prompts,
                "prompts_per_request": args.prompts_per_request,
                "connections": args.max_in_flight,
            },
            "one_at_a_time": {"shards_in_flight": 1, "prompts_per_request": 1, "connections": 1},
        },
        "runs": runs,
        "medians": medians,
        "speedup_per_run": speedups,
        "speedup": statistics.median(speedups),
        "speedup_per_server_cpu_per_run": per_cpu,
        "speedup_per_server_cpu": statistics.median(per_cpu),
        "target_speedup": TARGET_SPEEDUP,
        "met": statistics.median(speedups) >= TARGET_SPEEDUP,
        "load_average_at_end": bench_common.machine_state()["load_average"],
    }


def print_table(report: dict[str, Any]) -> None:
    head = f"{'variant':<16}{'tokens/s':>10}{'seconds':>10}{'tokens':>9}{'decode batch':>14}{'requests':>10}"
    print(head + f"{'server CPU ms/token':>21}")
    for name in ("in_flight", "one_at_a_time"):
        m = report["medians"][name]
        print(
            f"{name:<16}{m['tokens_per_second']:>10.1f}{m['seconds']:>10.2f}{m['generated_tokens']:>9.0f}"
            f"{m['mean_decode_batch']:>14.1f}{m['requests']:>10.0f}{m['server_cpu_ms_per_token']:>21.2f}"
        )
    runs = len(report["runs"])
    per_run = ", ".join(f"{s:.2f}" for s in report["speedup_per_run"])
    per_cpu = ", ".join(f"{s:.2f}" for s in report["speedup_per_server_cpu_per_run"])
    print(f"\nspeedup (median of {runs}): {report['speedup']:.2f}x ({per_run}); target {TARGET_SPEEDUP}x")
    print(f"per server CPU second: {report['speedup_per_server_cpu']:.2f}x ({per_cpu})")
    print(f"load average: {report['load_average']} at the start, {report['load_average_at_end']} at the end")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--teacher", type=Path, default=None, help="a model directory to serve (default: built)")
    p.add_argument("--threads", type=int, default=1, help="the server's intra-op threads")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--in-flight-shards", type=int, default=gs.IN_FLIGHT_SHARDS)
    p.add_argument("--max-in-flight", type=int, default=16, help="HttpTeacher connections")
    p.add_argument("--prompts-per-request", type=int, default=8)
    p.add_argument("--out", type=Path, default=bench_common.RESULTS / "teacher_generation.json")
    return p


if __name__ == "__main__":
    bench_common.main(parser(), run, print_table)
