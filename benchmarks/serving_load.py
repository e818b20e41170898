"""Serving under load: 32 concurrent clients over loopback, mixed lengths, dynamic batching against
``--max-batch-size 1``, on a real ``kdistill serve`` process and a real INT8 classification artifact.

    python benchmarks/serving_load.py [--clients 32] [--seconds 20]

Each client sends ``/v1/classify`` requests of one text (8..128 tokens of Python's own docs) back to
back for ``--seconds``. Reports throughput, p50/p99 latency and the server's own batch-size and
padding-efficiency metrics. Targets: dynamic batching >= 4x the throughput of batch size 1, and
p99 <= 300 ms for classification requests of <= 128 tokens.
Writes benchmarks/results/serving_load.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.serving.helpers, for the tiny models

from tests.serving.helpers import ServerProcess, pydoc_texts

RESULTS = Path(__file__).parent / "results"


def build_artifact(root: Path, layers: int, width: int, vocab: int) -> tuple[Path, Any]:
    from transformers import BertConfig, BertForSequenceClassification

    from kdistill.trainer.artifact import save_artifact
    from kdistill.trainer.quantization import quantize_ptq_int8
    from kdistill.trainer.tokenizer_build import build_tokenizer

    tok = build_tokenizer(pydoc_texts(2000), vocab, root / "tokenizer", model_max_length=512)
    labels = [f"topic-{i}" for i in range(8)]
    cfg = BertConfig(vocab_size=len(tok), hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
                     intermediate_size=4 * width, max_position_embeddings=512, num_labels=len(labels),
                     id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}, pad_token_id=0)
    model = quantize_ptq_int8(BertForSequenceClassification(cfg).eval())
    out = save_artifact(model, tok, root / "load-bench" / "student-int8", task="sequence-classification",
                        quantization="ptq-int8", metrics={})
    return out, tok


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


async def load(url: str, texts: list[str], clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(cid: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = cid
        while time.perf_counter() < stop_at:
            text = texts[i % len(texts)]
            i += clients
            start = time.perf_counter()
            r = await http.post(f"{url}/v1/classify", json={"texts": [text]})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - started
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3  # noqa: E731
    return {"requests": len(latencies), "errors": errors, "seconds": wall, "throughput_rps": len(latencies) / wall,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "mean_ms": statistics.mean(latencies) * 1e3}


def server_metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    vals: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("kdistill_batch_size_sum", "kdistill_batch_size_count", "kdistill_padding_efficiency_ratio"):
            if line.startswith(name + " "):
                vals[name] = float(line.split()[-1])
    count = vals.get("kdistill_batch_size_count", 0.0)
    return {"mean_batch_size": vals.get("kdistill_batch_size_sum", 0.0) / count if count else 0.0,
            "batches": count, "padding_efficiency": vals.get("kdistill_padding_efficiency_ratio", 0.0)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="kdistill-load-"))
    artifact, tok = build_artifact(root, args.layers, args.width, args.vocab)
    texts = request_texts(tok, 512, seed=0)
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    report: dict[str, Any] = {"clients": args.clients, "seconds": args.seconds, "cpus": os.cpu_count(),
                              "model": {"layers": args.layers, "width": args.width, "vocab": len(tok),
                                        "quantization": "ptq-int8"},
                              "request_tokens": {"min": min(lengths), "max": max(lengths),
                                                 "mean": statistics.mean(lengths)},
                              "load_average_at_start": os.getloadavg(), "runs": {}}
    configs = {"dynamic": ["--max-batch-size", str(args.max_batch_size), "--max-batch-tokens", "8192",
                           "--max-wait-ms", str(args.max_wait_ms)],
               "batch1": ["--max-batch-size", "1", "--max-wait-ms", "0"]}
    for name, flags in configs.items():
        server = ServerProcess(artifact, *flags, "--max-queue", "1024", threads=args.threads)
        try:
            server.wait_ready()
            asyncio.run(load(server.url, texts, args.clients, min(3.0, args.seconds)))  # warm-up
            stats = asyncio.run(load(server.url, texts, args.clients, args.seconds))
            stats["server"] = server_metrics(server.url)
            report["runs"][name] = stats
        finally:
            server.terminate()
    dyn, one = report["runs"]["dynamic"], report["runs"]["batch1"]
    report["speedup"] = dyn["throughput_rps"] / one["throughput_rps"]
    report["load_average_at_end"] = os.getloadavg()
    report["targets"] = {"speedup": 4.0, "p99_ms": 300.0}
    report["met"] = {"speedup": report["speedup"] >= 4.0, "p99_ms": dyn["p99_ms"] <= 300.0}
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"{report['clients']} clients, {report['seconds']}s, requests of {report['request_tokens']['min']}-"
          f"{report['request_tokens']['max']} tokens; student {report['model']['layers']}x{report['model']['width']} "
          f"INT8; load average {report['load_average_at_start'][0]:.1f} on {report['cpus']} CPUs")
    head = f"{'config':8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10} {'padding eff':>11} {'errors':>6}"
    print(head)
    print("-" * len(head))
    for name, r in report["runs"].items():
        print(f"{name:8} {r['throughput_rps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
              f"{r['server']['mean_batch_size']:10.1f} {r['server']['padding_efficiency']:11.2f} {r['errors']:6d}")
    p99 = report["runs"]["dynamic"]["p99_ms"]
    print(f"dynamic batching speedup: {report['speedup']:.2f}x (target 4x); p99 {p99:.0f} ms (target <= 300 ms)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="server intra-op threads (1: see quant_latency.py)")
    p.add_argument("--out", type=Path, default=RESULTS / "serving_load.json")
    args = p.parse_args()
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
