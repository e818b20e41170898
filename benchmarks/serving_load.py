"""Serving under load: 32 concurrent clients over loopback, mixed lengths, dynamic batching against
``--max-batch-size 1``, on a real ``kdistill serve`` process and real INT8 artifacts.

    flock /tmp/kdistill-bench.lock .venv/bin/python -P benchmarks/serving_load.py \
        [--mode both|classify|completions] [--clients 32] [--seconds 20] [--runs 3]

Each run starts a fresh server per configuration (dynamic batching, ``--max-batch-size 1``), gives
each the same warm-up and the same ``--seconds`` of load, and rotates which goes first from run to
run; the figures are medians over ``--runs``, each run with the load average when it started. The
servers choose their INT8 kernel as ``kdistill serve`` does (measured at load, or from the cache of
an earlier start on this machine), and the results name it.

Classification: each client sends ``/v1/classify`` requests of one text (8..128 tokens of Python's
own docs) back to back for ``--seconds``. Reports throughput, p50/p99 latency, the server's own
batch-size and padding-efficiency metrics, and where the CPU went: server and load-generator CPU per
request, and the model alone (the engine in this process, no HTTP) at batch 1 and in the server's
batches, which bounds what batching can gain.

Completions: each client sends OpenAI ``/v1/completions`` requests (one prompt of 8..64 tokens,
``max_tokens`` 8..64, greedy) to a causal-LM INT8 student of the quickstart's shape (GPT2, 2 layers,
128 wide). Reports the same, plus generated tokens/s and the server's mean decode batch (sequences
per decode step, from ``kdistill_decode_rows`` / ``kdistill_decode_steps``).

Targets: dynamic batching >= 4x the throughput of batch size 1, and p99 <= 300 ms for
classification requests of <= 128 tokens.

The load generator is a raw asyncio HTTP/1.1 keep-alive client (no httpx): on 2 shared cores the
client's own CPU counts against the server, and httpx cost several times more per request.
Writes benchmarks/results/serving_load.json (with the command that produced it) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.serving.helpers, for the tiny models

from benchmarks import bench_common
from kdistill.serving.engine import BATCH_THREADS_ENV
from kdistill.serving.runtime import allocator_tuning_wanted
from tests.serving.helpers import ServerProcess, pydoc_texts


def build_artifact(root: Path, layers: int, width: int, vocab: int) -> tuple[Path, Any]:
    from transformers import BertConfig, BertForSequenceClassification

    from kdistill.trainer.artifact import save_artifact
    from kdistill.trainer.quantization import quantize_ptq_int8
    from kdistill.trainer.tokenizer_build import build_tokenizer

    tok = build_tokenizer(pydoc_texts(2000), vocab, root / "tokenizer", model_max_length=512)
    labels = [f"topic-{i}" for i in range(8)]
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        intermediate_size=4 * width,
        max_position_embeddings=512,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        pad_token_id=0,
    )
    model = quantize_ptq_int8(BertForSequenceClassification(cfg).eval())
    out = save_artifact(
        model,
        tok,
        root / "load-bench" / "student-int8",
        task="sequence-classification",
        quantization="ptq-int8",
        metrics={},
    )
    return out, tok


def build_lm_artifact(root: Path, layers: int, width: int, vocab: int) -> tuple[Path, Any]:
    """A GPT2 causal-LM student of the quickstart's shape (2 layers x 128), PTQ INT8."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdistill.trainer.artifact import save_artifact
    from kdistill.trainer.quantization import quantize_ptq_int8
    from kdistill.trainer.tokenizer_build import build_tokenizer

    tok = build_tokenizer(pydoc_texts(2000), vocab, root / "lm-tokenizer", model_max_length=512)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=512,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 32),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = quantize_ptq_int8(GPT2LMHeadModel(cfg).eval())
    out = save_artifact(
        model, tok, root / "lm-bench" / "student-int8", task="causal-lm", quantization="ptq-int8", metrics={}
    )
    return out, tok


def completion_bodies(
    tok: Any, n: int, seed: int, prompt_tokens: tuple[int, int], new_tokens: tuple[int, int]
) -> list[dict[str, Any]]:
    """Greedy completions of mixed prompt lengths and mixed ``max_tokens``."""
    rng = random.Random(seed)
    paragraphs = [p for p in pydoc_texts(3000) if len(tok(p)["input_ids"]) >= prompt_tokens[1]]
    bodies = []
    for _ in range(n):
        ids = tok(rng.choice(paragraphs))["input_ids"][: rng.randint(*prompt_tokens)]
        bodies.append({"prompt": tok.decode(ids), "max_tokens": rng.randint(*new_tokens), "temperature": 0})
    return bodies


def request_texts(tok: Any, n: int, seed: int) -> list[str]:
    """Mixed lengths, uniformly 8..128 tokens, cut from real paragraphs."""
    rng = random.Random(seed)
    paragraphs = [p for p in pydoc_texts(3000) if len(tok(p)["input_ids"]) >= 128]
    texts = []
    for _ in range(n):
        ids = tok(rng.choice(paragraphs))["input_ids"][: rng.randint(8, 128)]
        text = tok.decode(ids)
        while len(tok(text)["input_ids"]) > 128:  # decode/encode may not round-trip exactly
            text = text[: int(len(text) * 0.9)]
        texts.append(text)
    return texts


class Client:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the status and the body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def connect(cls, host: str, port: int) -> Client:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def load(
    url: str, bodies: list[bytes], clients: int, seconds: float, path: str = "/v1/classify"
) -> dict[str, Any]:
    """Closed loop: each client posts its next body as soon as the previous answer arrives. For
    completions, the generated tokens are counted from each answer's ``usage``."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    generated = 0
    errors = 0
    conns = [await Client.connect(host, int(port)) for _ in range(clients)]
    stop_at = time.perf_counter() + seconds

    async def client(cid: int, conn: Client) -> None:
        nonlocal errors, generated
        i = cid
        while time.perf_counter() < stop_at:
            body = bodies[i % len(bodies)]
            i += clients
            start = time.perf_counter()
            status, answer = await conn.post(path, body)
            if status == 200:
                latencies.append(time.perf_counter() - start)
                if path == "/v1/completions":
                    generated += json.loads(answer)["usage"]["completion_tokens"]
            else:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(c, conn) for c, conn in enumerate(conns)))
    wall = time.perf_counter() - started
    for conn in conns:
        conn.close()
    latencies.sort()
    pct = lambda p: bench_common.percentile(latencies, p) * 1e3  # noqa: E731
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": wall,
        "throughput_rps": len(latencies) / wall,
        "generated_tokens": generated,
        "tokens_per_second": generated / wall,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.mean(latencies) * 1e3,
    }


def measured_load(
    server: ServerProcess, bodies: list[bytes], clients: int, seconds: float, path: str
) -> dict[str, Any]:
    """``load`` plus the CPU the server process and this client process spent on it."""
    proc = psutil.Process(server.proc.pid)
    s0, c0 = proc.cpu_times(), resource.getrusage(resource.RUSAGE_SELF)
    load_before = bench_common.machine_state()["load_average"]
    stats = asyncio.run(load(server.url, bodies, clients, seconds, path))
    s1, c1 = proc.cpu_times(), resource.getrusage(resource.RUSAGE_SELF)
    n = max(1, stats["requests"])
    stats["server_cpu_ms_per_request"] = (s1.user + s1.system - s0.user - s0.system) / n * 1e3
    stats["client_cpu_ms_per_request"] = (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / n * 1e3
    stats["server_cpu_cores"] = (s1.user + s1.system - s0.user - s0.system) / stats["seconds"]
    stats["load_average_before"] = load_before
    return stats


def model_only(artifact: Path, texts: list[str], threads: int, batch: int, batch_threads: int = 0) -> dict[str, float]:
    """The engine alone, in this process: ms of model time per request at batch 1 and in batches of
    ``batch`` (as the server would split them). Their ratio bounds the throughput gain of batching
    once HTTP is free; HTTP and the event loop only add the same per-request cost to both."""
    import torch

    from kdistill.serving.engine import Engine
    from kdistill.serving.metrics import ServerMetrics
    from kdistill.serving.runtime import allocator_tuning_wanted, tune_allocator
    from kdistill.trainer.artifact import load_artifact

    torch.set_num_threads(threads)
    if allocator_tuning_wanted():  # as in the server process
        tune_allocator()
    engine = Engine(load_artifact(artifact), ServerMetrics())
    engine.warm_up()
    encoded = [engine.encode(t) for t in texts[:128]]

    def per_request(size: int) -> float:
        best = float("inf")
        for _ in range(3):  # best of 3: other processes only ever add time
            start = time.perf_counter()
            for i in range(0, len(encoded), size):
                engine.run_classification(encoded[i : i + size])
            best = min(best, time.perf_counter() - start)
        return best / len(encoded) * 1e3

    one, many = per_request(1), per_request(batch)
    out = {"batch1_ms_per_request": one, f"batch{batch}_ms_per_request": many, "ceiling_speedup": one / many}
    if batch_threads:
        engine.batch_threads = batch_threads
        out[f"batch{batch}_ms_per_request_batch_threads"] = bt = per_request(batch)
        out["ceiling_speedup_batch_threads"] = one / bt
        engine.batch_threads = 0
    if batch != 16:
        out["batch16_ms_per_request"] = per_request(16)
    return out


def model_only_generation(artifact: Path, bodies: list[dict[str, Any]], threads: int, batch: int) -> dict[str, float]:
    """Generation alone, in this process: ms per request when ``batch`` requests are generated
    together (one prefill, shared decode, early exit) against one at a time."""
    import torch

    from kdistill.serving.engine import Engine
    from kdistill.serving.generation import GenRequest
    from kdistill.serving.metrics import ServerMetrics
    from kdistill.serving.runtime import allocator_tuning_wanted, tune_allocator
    from kdistill.trainer.artifact import load_artifact

    torch.set_num_threads(threads)
    if allocator_tuning_wanted():  # as in the server process
        tune_allocator()
    engine = Engine(load_artifact(artifact), ServerMetrics())
    engine.warm_up()
    reqs = [(engine.encode(b["prompt"]), b["max_tokens"]) for b in bodies[:batch]]

    def per_request(size: int) -> float:
        start = time.perf_counter()
        for i in range(0, len(reqs), size):
            engine.run_generation([GenRequest(ids, n, temperature=0.0) for ids, n in reqs[i : i + size]])
        return (time.perf_counter() - start) / len(reqs) * 1e3

    one, many = per_request(1), per_request(batch)
    return {"batch1_ms_per_request": one, f"batch{batch}_ms_per_request": many, "ceiling_speedup": one / many}


def server_metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    vals: dict[str, float] = {}
    names = (
        "kdistill_batch_size_sum",
        "kdistill_batch_size_count",
        "kdistill_padding_efficiency_ratio",
        "kdistill_decode_steps_total",
        "kdistill_decode_rows_total",
    )
    for line in text.splitlines():
        for name in names:
            if line.startswith(name + " "):
                vals[name] = float(line.split()[-1])
    count = vals.get("kdistill_batch_size_count", 0.0)
    steps = vals.get("kdistill_decode_steps_total", 0.0)
    return {
        "mean_batch_size": vals.get("kdistill_batch_size_sum", 0.0) / count if count else 0.0,
        "batches": count,
        "padding_efficiency": vals.get("kdistill_padding_efficiency_ratio", 0.0),
        "mean_decode_batch": vals.get("kdistill_decode_rows_total", 0.0) / steps if steps else 0.0,
    }


def served_kernel(url: str) -> list[dict[str, str]]:
    """The INT8 kernels the server runs, from which row count each, and how it chose them (its
    ``kdistill_int8_kernel`` gauge)."""
    found = []
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("kdistill_int8_kernel{") and line.endswith(" 1.0"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            found.append({k: v.strip('"') for k, v in labels.items()})
    return sorted(found, key=lambda labels: int(labels.get("from_rows", "1")))


def compare(
    args: argparse.Namespace, artifact: Path, bodies: list[bytes], path: str, run_index: int = 0
) -> dict[str, Any]:
    """Dynamic batching and ``--max-batch-size 1`` on the same artifact and the same requests, the
    same warm-up and the same seconds each; the configurations take turns first (the order rotates
    with ``run_index``), so a change in the machine's load over the runs hits them alike."""
    dynamic = [
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-batch-tokens",
        "8192",
        "--max-wait-ms",
        str(args.max_wait_ms),
    ]
    configs: dict[str, tuple[list[str], dict[str, str]]] = {
        "dynamic": (dynamic, {}),
        "batch1": (["--max-batch-size", "1", "--max-wait-ms", "0"], {}),
    }
    if args.batch_threads and path == "/v1/classify":
        # The same dynamic server, with big classification passes on more intra-op threads.
        configs["dynamic_batch_threads"] = (dynamic, {BATCH_THREADS_ENV: str(args.batch_threads)})
    runs: dict[str, Any] = {}
    names = list(configs)
    shift = run_index % len(names)
    for name in names[shift:] + names[:shift]:
        flags, env = configs[name]
        server = ServerProcess(artifact, *flags, "--max-queue", "1024", threads=args.threads, env=env)
        try:
            server.wait_ready()
            asyncio.run(load(server.url, bodies, args.clients, min(3.0, args.seconds), path))  # warm-up
            stats = measured_load(server, bodies, args.clients, args.seconds, path)
            stats["server"] = server_metrics(server.url)
            stats["int8_kernel"] = served_kernel(server.url)
            runs[name] = stats
        finally:
            server.terminate()
    dyn, one = runs["dynamic"], runs["batch1"]
    out: dict[str, Any] = {"runs": runs, "speedup": dyn["throughput_rps"] / one["throughput_rps"]}
    # The same ratio per server CPU second: on a shared machine the server's share of the CPU moves
    # between the two runs, and this ratio does not depend on it.
    out["speedup_per_server_cpu"] = one["server_cpu_ms_per_request"] / dyn["server_cpu_ms_per_request"]
    if "dynamic_batch_threads" in runs:
        out["speedup_batch_threads"] = runs["dynamic_batch_threads"]["throughput_rps"] / one["throughput_rps"]
    # What one dedicated core would give: requests/s at the measured CPU cost, and the mean latency of
    # the closed loop (clients / throughput).
    out["one_dedicated_core"] = {
        name: {
            "rps": 1e3 / r["server_cpu_ms_per_request"],
            "mean_latency_ms": args.clients * r["server_cpu_ms_per_request"],
        }
        for name, r in runs.items()
    }
    return out


def repeated(args: argparse.Namespace, artifact: Path, bodies: list[bytes], path: str) -> dict[str, Any]:
    """``compare`` ``--runs`` times: the first run's full figures, every run's speedups, and their
    medians (the speedups the table reports)."""
    runs = [compare(args, artifact, bodies, path, i) for i in range(args.runs)]
    out = dict(runs[0])
    for key in ("speedup", "speedup_per_server_cpu", "speedup_batch_threads"):
        if key not in runs[0]:
            continue
        out[f"{key}_per_run"] = [r[key] for r in runs]
        out[key] = statistics.median(out[f"{key}_per_run"])
    keys = (
        "throughput_rps",
        "p50_ms",
        "p99_ms",
        "tokens_per_second",
        "server_cpu_ms_per_request",
        "client_cpu_ms_per_request",
        "errors",
        "server",
        "load_average_before",
        "int8_kernel",
    )
    out["per_run"] = [{name: {k: stats[k] for k in keys} for name, stats in r["runs"].items()} for r in runs]
    # Per configuration, the median over the runs of each figure (what the table and docs report).
    out["medians"] = {
        name: {
            k: statistics.median(r["runs"][name][k] for r in runs)
            for k in ("throughput_rps", "p50_ms", "p99_ms", "tokens_per_second", "server_cpu_ms_per_request")
        }
        for name in runs[0]["runs"]
    }
    out["order_per_run"] = [list(r["runs"]) for r in runs]
    return out


def run_classification(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    artifact, tok = build_artifact(root, args.layers, args.width, args.vocab)
    texts = request_texts(tok, 512, seed=0)
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    report: dict[str, Any] = {
        "model": {"layers": args.layers, "width": args.width, "vocab": len(tok), "quantization": "ptq-int8"},
        "request_tokens": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
    }
    report["model_only"] = model_only(artifact, texts, args.threads, args.max_batch_size, args.batch_threads)
    report.update(repeated(args, artifact, [json.dumps({"texts": [t]}).encode() for t in texts], "/v1/classify"))
    report["met"] = {"speedup": report["speedup"] >= 4.0, "p99_ms": report["medians"]["dynamic"]["p99_ms"] <= 300.0}
    return report


def run_completions(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    artifact, tok = build_lm_artifact(root, args.lm_layers, args.lm_width, args.lm_vocab)
    bodies = completion_bodies(tok, 512, 1, (8, 64), (args.min_new_tokens, args.max_new_tokens))
    prompts = [len(tok(b["prompt"])["input_ids"]) for b in bodies]
    report: dict[str, Any] = {
        "model": {
            "family": "gpt2",
            "layers": args.lm_layers,
            "width": args.lm_width,
            "vocab": len(tok),
            "quantization": "ptq-int8",
        },
        "prompt_tokens": {"min": min(prompts), "max": max(prompts), "mean": statistics.mean(prompts)},
        "max_tokens": {
            "min": args.min_new_tokens,
            "max": args.max_new_tokens,
            "mean": statistics.mean(b["max_tokens"] for b in bodies),
        },
        "sampling": "greedy",
    }
    report["model_only"] = model_only_generation(artifact, bodies, args.threads, args.clients)
    report.update(repeated(args, artifact, [json.dumps(b).encode() for b in bodies], "/v1/completions"))
    report["met"] = {"speedup": report["speedup"] >= 4.0}
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="kdistill-load-"))
    report: dict[str, Any] = {
        "command": bench_common.command_line(),
        "clients": args.clients,
        "seconds": args.seconds,
        "threads": args.threads,
        "batch_threads": args.batch_threads,
        "allocator_tuned": allocator_tuning_wanted(),
        **bench_common.machine_state(),
    }
    if args.mode in ("both", "classify"):
        report["classification"] = run_classification(args, root)
    if args.mode in ("both", "completions"):
        report["completions"] = run_completions(args, root)
    report["load_average_at_end"] = bench_common.machine_state()["load_average"]
    report["targets"] = {"speedup": 4.0, "classification_p99_ms": 300.0}
    return report


def print_runs(part: dict[str, Any], tokens: bool) -> None:
    extra = f" {'tok/s':>7} {'decode batch':>12}" if tokens else f" {'padding eff':>11}"
    head = (
        f"{'config':10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10}{extra} "
        f"{'srv cpu ms/req':>14} {'cli cpu ms/req':>14} {'errors':>6} {'load':>5}"
    )
    print(head)
    print("-" * len(head))
    rows = [
        (f"{name}#{i + 1}", r) for i, run in enumerate(part.get("per_run", [part["runs"]])) for name, r in run.items()
    ]
    for name, r in rows:
        srv = r["server"]
        cols = (
            f" {r['tokens_per_second']:7.0f} {srv['mean_decode_batch']:12.1f}"
            if tokens
            else f" {srv['padding_efficiency']:11.2f}"
        )
        print(
            f"{name:10} {r['throughput_rps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
            f"{srv['mean_batch_size']:10.1f}{cols} "
            f"{r['server_cpu_ms_per_request']:14.2f} {r['client_cpu_ms_per_request']:14.2f} {r['errors']:6d} "
            f"{r.get('load_average_before', [float('nan')])[0]:5.1f}"
        )
    m = part["model_only"]
    print(
        f"model alone (no HTTP): {m['batch1_ms_per_request']:.2f} ms/request at batch 1, "
        f"{list(m.values())[1]:.2f} in batches: at most {m['ceiling_speedup']:.2f}x from batching"
    )
    if "ceiling_speedup_batch_threads" in m:
        print(
            f"model alone, big passes on more threads: {list(m.values())[3]:.2f} ms/request in batches, "
            f"at most {m['ceiling_speedup_batch_threads']:.2f}x"
        )
    for name, med in part["medians"].items():
        print(
            f"median of {len(part['per_run'])} runs, {name}: {med['throughput_rps']:.1f} req/s, "
            f"p50 {med['p50_ms']:.0f} ms, p99 {med['p99_ms']:.0f} ms"
        )
    cores = ", ".join(f"{n} {r['server_cpu_cores']:.2f}" for n, r in part["runs"].items())
    print(f"server's share of the CPU during the runs (cores): {cores}")
    per_run = ", ".join(f"{x:.2f}" for x in part["speedup_per_run"])
    print(
        f"dynamic batching speedup, median of {len(part['speedup_per_run'])} runs ({per_run}): "
        f"{part['speedup']:.2f}x (target 4x), {part['speedup_per_server_cpu']:.2f}x "
        f"per server CPU second; INT8 kernel {part['runs']['dynamic']['int8_kernel'].get('kernel', '?')}"
    )
    if "speedup_batch_threads_per_run" in part:
        per_run = ", ".join(f"{x:.2f}" for x in part["speedup_batch_threads_per_run"])
        print(
            f"dynamic with big passes on more threads, median ({per_run}): {part['speedup_batch_threads']:.2f}x; "
            f"first run's p99 {part['runs']['dynamic_batch_threads']['p99_ms']:.0f} ms"
        )


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{report['clients']} clients, {report['seconds']}s per config, {report['threads']} torch thread(s); "
        f"load average {report['load_average'][0]:.1f} at start, {report['load_average_at_end'][0]:.1f} at end, "
        f"on {report['cpus']} CPUs"
    )
    if "classification" in report:
        c = report["classification"]
        print(
            f"\n/v1/classify: requests of {c['request_tokens']['min']}-{c['request_tokens']['max']} tokens; "
            f"BERT student {c['model']['layers']}x{c['model']['width']} INT8 (p99 target <= 300 ms)"
        )
        print_runs(c, tokens=False)
        ded = c["one_dedicated_core"]["dynamic"]
        print(
            f"with one dedicated core, dynamic: {ded['rps']:.0f} req/s, closed-loop mean latency "
            f"{ded['mean_latency_ms']:.0f} ms"
        )
    if "completions" in report:
        g = report["completions"]
        print(
            f"\n/v1/completions: prompts of {g['prompt_tokens']['min']}-{g['prompt_tokens']['max']} tokens, "
            f"max_tokens {g['max_tokens']['min']}-{g['max_tokens']['max']}, greedy; GPT2 student "
            f"{g['model']['layers']}x{g['model']['width']} INT8"
        )
        print_runs(g, tokens=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["both", "classify", "completions"], default="both")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--runs", type=int, default=3, help="repeat each dynamic/batch1 comparison; report medians")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--lm-layers", type=int, default=2)
    p.add_argument("--lm-width", type=int, default=128)
    p.add_argument("--lm-vocab", type=int, default=4096)
    p.add_argument("--min-new-tokens", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="server intra-op threads (1: see quant_latency.py)")
    p.add_argument(
        "--batch-threads",
        type=int,
        default=0,
        help="also run the dynamic classification server with this many threads for big passes",
    )
    p.add_argument("--out", type=Path, default=bench_common.RESULTS / "serving_load.json")
    bench_common.main(p, run, print_table)


if __name__ == "__main__":
    main()
