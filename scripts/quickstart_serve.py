"""The last step of ``make quickstart``: serve the INT8 artifact, send one real request, print the
answer and its latency, then stop the server (SIGTERM, graceful).

    python -P scripts/quickstart_serve.py ARTIFACT_DIR [--prompt TEXT] [--port 0]

A causal LM gets an OpenAI-style ``/v1/completions`` request; a classifier a ``/v1/classify`` one.
Exit status 0 only if the server became ready and answered 200.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

DEFAULT_PROMPT = "The for statement is used to"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"kdistill serve exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout:.0f}s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    meta = json.loads((args.artifact / "kdistill.json").read_text())
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "kdistill.cli.main",
            "serve",
            str(args.artifact),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
    )
    try:
        ready_s = wait_ready(url, proc, args.timeout)
        print(f"server ready in {ready_s:.1f}s at {url} ({meta['task']}, {meta['quantization']['mode']})")
        if meta["task"] == "causal-lm":
            body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}
            path = "/v1/completions"
        else:
            body = {"texts": [args.prompt]}
            path = "/v1/classify"
        start = time.perf_counter()
        r = httpx.post(f"{url}{path}", json=body, timeout=60)
        latency_ms = (time.perf_counter() - start) * 1e3
        print(f"POST {path} {json.dumps(body)}")
        if r.status_code != 200:
            print(f"-> HTTP {r.status_code}: {r.text}")
            return 1
        answer = r.json()
        if meta["task"] == "causal-lm":
            print(f"-> {args.prompt}{answer['choices'][0]['text']!s}")
            print(f"   ({answer['usage']['completion_tokens']} tokens, {latency_ms:.0f} ms)")
        else:
            top = answer["results"][0]
            print(f"-> {top['label']} (score {top['score']:.3f}), {latency_ms:.0f} ms")
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        print("server stopped")


if __name__ == "__main__":
    sys.exit(main())
