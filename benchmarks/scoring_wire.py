"""Teacher scoring on the wire: the OpenAI JSON answer against the binary safetensors frame, on one
real ``kdistill serve`` process serving a plain Hugging Face directory (FP32 GPT2 built from a
config) over loopback.

    flock /tmp/kdistill-bench.lock .venv/bin/python -P benchmarks/scoring_wire.py \
        [--clients 8] [--seconds 10] [--runs 3] [--k 20] [--prompts-per-request 4]

Each client sends ``echo: true, max_tokens: 0, logprobs: K`` requests (``--prompts-per-request``
prompts of Python's own docs, 32..128 tokens each) back to back for ``--seconds``, and parses every
answer into token ids and top-K log-probs, as a trainer would (``json.loads`` / the frame). Both
formats run against the same server in every run, in alternating order from run to run (JSON
first in odd runs); figures are medians over ``--runs``, each run with the load average when it
started. Reports scored tokens/s, answer bytes per scored token, p50 latency and the client's
parse time per token.

Writes benchmarks/results/serving_scoring.json (with the command that produced it) and prints a
table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.serving.helpers, for the tiny models

from benchmarks import bench_common
from kdistill.serving.logprobs_wire import BINARY_MEDIA_TYPE, read_binary_frame
from tests.serving.helpers import ServerProcess, pydoc_texts

FORMATS = ("json", "binary")


def build_teacher(root: Path, layers: int, width: int, vocab: int) -> tuple[Path, Any]:
    """A plain Hugging Face directory (no kdistill.json) of an FP32 GPT2, and its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdistill.trainer.tokenizer_build import build_tokenizer

    tok = build_tokenizer(pydoc_texts(2000), vocab, root / "tokenizer", model_max_length=512)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=512,
        n_embd=width,
        n_layer=layers,
        n_head=width // 64,
        pad_token_id=tok.pad_token_id or 0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    out = root / "teacher"
    GPT2LMHeadModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok


def prompts(tokenizer: Any, n: int = 256) -> list[str]:
    """Paragraphs of 32..128 tokens."""
    out = []
    for text in pydoc_texts(4000):
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= 32:
            out.append(tokenizer.decode(ids[:128]))
        if len(out) == n:
            break
    return out


def parse(fmt: str, content: bytes) -> int:
    """Scored tokens in one answer, after parsing it as a trainer would."""
    if fmt == "binary":
        tensors, _ = read_binary_frame(content)
        return int(tensors["token_ids"].shape[0])
    body = json.loads(content)
    return sum(len(c["logprobs"]["token_logprobs"]) for c in body["choices"])


async def load(url: str, fmt: str, texts: list[str], args: argparse.Namespace) -> dict[str, float]:
    headers = {"Accept": BINARY_MEDIA_TYPE} if fmt == "binary" else {}
    stats = {"tokens": 0.0, "bytes": 0.0, "parse_s": 0.0}
    latencies: list[float] = []
    deadline = time.perf_counter() + args.seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        j = i
        while time.perf_counter() < deadline:
            batch = [texts[(j + n) % len(texts)] for n in range(args.prompts_per_request)]
            j += args.clients * args.prompts_per_request
            body = {"prompt": batch, "echo": True, "max_tokens": 0, "logprobs": args.k}
            start = time.perf_counter()
            r = await http.post(f"{url}/v1/completions", json=body, headers=headers)
            latencies.append(time.perf_counter() - start)
            r.raise_for_status()
            t0 = time.process_time()
            stats["tokens"] += parse(fmt, r.content)
            stats["parse_s"] += time.process_time() - t0
            stats["bytes"] += len(r.content)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=args.clients)) as http:
        await asyncio.gather(*(client(i, http) for i in range(args.clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "tokens_per_s": stats["tokens"] / wall,
        "bytes_per_token": stats["bytes"] / stats["tokens"],
        "p50_ms": bench_common.percentile(latencies, 0.5) * 1000,
        "parse_us_per_token": stats["parse_s"] / stats["tokens"] * 1e6,
        "requests": float(len(latencies)),
        "tokens": stats["tokens"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        teacher, tok = build_teacher(Path(tmp), args.layers, args.width, args.vocab)
        texts = prompts(tok)
        limit = str(max(args.k, 20))
        server = ServerProcess(
            teacher, "--max-logprobs", limit, "--max-logprobs-binary", limit, "--max-queue", "1024", threads=1
        )
        try:
            server.wait_ready()
            warm = argparse.Namespace(**{**vars(args), "seconds": 2.0})
            for fmt in FORMATS:
                asyncio.run(load(server.url, fmt, texts, warm))
            runs = []
            for i in range(args.runs):
                order = FORMATS if i % 2 == 0 else FORMATS[::-1]
                row: dict[str, Any] = {"machine": bench_common.machine_state(), "order": list(order)}
                for fmt in order:
                    row[fmt] = asyncio.run(load(server.url, fmt, texts, args))
                runs.append(row)
        finally:
            server.terminate()
    medians = {fmt: {key: statistics.median(r[fmt][key] for r in runs) for key in runs[0][fmt]} for fmt in FORMATS}
    return {
        "command": bench_common.command_line(),
        "model": {"layers": args.layers, "width": args.width, "vocab": args.vocab, "dtype": "float32"},
        "k": args.k,
        "clients": args.clients,
        "prompts_per_request": args.prompts_per_request,
        "seconds": args.seconds,
        "runs": runs,
        "median": medians,
        "binary_over_json": {
            "tokens_per_s": medians["binary"]["tokens_per_s"] / medians["json"]["tokens_per_s"],
            "bytes_per_token": medians["binary"]["bytes_per_token"] / medians["json"]["bytes_per_token"],
        },
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"K={report['k']}, {report['clients']} clients x {report['prompts_per_request']} prompts per request")
    print(f"{'format':8} {'tokens/s':>10} {'bytes/token':>12} {'p50 ms':>8} {'parse us/token':>15}")
    for fmt in FORMATS:
        m = report["median"][fmt]
        print(
            f"{fmt:8} {m['tokens_per_s']:10.0f} {m['bytes_per_token']:12.1f} {m['p50_ms']:8.1f}"
            f" {m['parse_us_per_token']:15.2f}"
        )
    print("load average per run:", [r["machine"]["load_average"] for r in report["runs"]])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--prompts-per-request", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--out", type=Path, default=bench_common.RESULTS / "serving_scoring.json")
    return p


if __name__ == "__main__":
    bench_common.main(parser(), run, print_table)
