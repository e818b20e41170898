"""Tiny real models and artifacts for the serving tests and benchmarks: transformers models built
from configs, a byte-level BPE tokenizer learned locally from Python's own docs (pydoc_data)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

LABELS = ["compound", "expressions", "datamodel", "other"]


def pydoc_texts(limit: int = 400) -> list[str]:
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 40]
    return paragraphs[:limit]


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 400) -> Any:
    from kdistill.trainer.tokenizer_build import build_tokenizer

    return build_tokenizer(pydoc_texts(), vocab_size, out_dir, model_max_length=128)


def tiny_gpt2(
    vocab_size: int, *, layers: int = 2, width: int = 64, heads: int = 4, positions: int = 128, seed: int = 0
) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(
    vocab_size: int, *, layers: int = 2, width: int = 64, heads: int = 4, positions: int = 128, seed: int = 0
) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=width * 2,
        max_position_embeddings=positions,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
        pad_token_id=0,
    )
    return BertForSequenceClassification(config).eval()


def make_artifact(root: Path, task: str, quantization: str = "ptq-int8", seed: int = 0) -> Path:
    """A saved artifact of a tiny model (INT8 unless quantization is "none")."""
    from kdistill.trainer.artifact import save_artifact
    from kdistill.trainer.quantization import quantize_ptq_int8

    tok_dir = root / "tokenizer"
    tokenizer = build_tiny_tokenizer(tok_dir) if not tok_dir.is_dir() else _reload(tok_dir)
    model = (tiny_gpt2 if task == "causal-lm" else tiny_bert_classifier)(len(tokenizer), seed=seed)
    if quantization != "none":
        model = quantize_ptq_int8(model)
    name = f"{'lm' if task == 'causal-lm' else 'cls'}-{quantization}"
    return save_artifact(
        model, tokenizer, root / name / "student-int8", task=task, quantization=quantization, metrics={"metric": "test"}
    )


def load_served(model_dir: Path, server: ServerProcess | None = None) -> Any:
    """The artifact as ``kdistill serve`` runs it (load, the INT8 kernel ``server`` chose, then the
    runtime's fused kernels): what a server's answers are compared with."""
    from kdistill.serving.runtime import prepare_for_inference
    from kdistill.trainer.artifact import load_artifact
    from kdistill.trainer.quantization import set_int8_kernel

    artifact = load_artifact(model_dir)
    kernel, bands = served_kernels(server) if server is not None else ("none", ())
    if kernel != "none":
        set_int8_kernel(artifact.model, kernel, bands)  # type: ignore[arg-type]  # checked by the server
    prepare_for_inference(artifact.model)
    return artifact


def _kernel_series(server: ServerProcess) -> list[tuple[str, str, int]]:
    """(kernel, how it was chosen, from which row count) of each ``kdistill_int8_kernel`` series."""
    pattern = r'^kdistill_int8_kernel\{from_rows="(\d+)",kernel="([^"]+)",source="([^"]+)"\} 1\.0$'
    found = re.findall(pattern, metrics_text(server), re.M)
    series = sorted((kernel, source, int(rows)) for rows, kernel, source in found)
    starts = [rows for _, _, rows in series]
    if 1 not in starts or len(set(starts)) != len(starts):
        raise AssertionError(f"expected one kdistill_int8_kernel series from 1 row and one per band, found {found}")
    return series


def served_kernel(server: ServerProcess) -> tuple[str, str]:
    """(kernel of the smallest inputs, how it was chosen) from the server's ``kdistill_int8_kernel`` gauge."""
    kernel, source, _ = next(s for s in _kernel_series(server) if s[2] == 1)
    return kernel, source


def served_kernels(server: ServerProcess) -> tuple[str, tuple[tuple[int, str], ...]]:
    """The kernel of the smallest inputs and the bands ``(from rows, kernel)`` the server runs."""
    series = _kernel_series(server)
    bands = tuple(sorted((rows, kernel) for kernel, _, rows in series if rows != 1))
    return served_kernel(server)[0], bands


def metrics_text(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def _reload(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``kdistill serve`` in a child process on a free loopback port."""

    def __init__(
        self,
        model_dir: Path,
        *extra: str,
        threads: int = 1,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or model_dir.parent / f"server-{self.port}.log"
        cmd = [
            sys.executable,
            "-P",
            "-m",
            "kdistill.cli.main",
            "serve",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--threads",
            str(threads),
            "--log-level",
            "warning",
            *extra,
        ]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        )

    def wait_ready(self, timeout: float = 420.0) -> None:  # import + load + warm-up on a loaded CI machine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


@contextlib.contextmanager
def running_server(model_dir: Path, *extra: str) -> Iterator[ServerProcess]:
    server = ServerProcess(model_dir, *extra)
    try:
        server.wait_ready()
        yield server
    finally:
        server.terminate()
