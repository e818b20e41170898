"""The served model: tokenization limits, the batch functions the batcher's worker thread calls,
and the warm-up that gates readiness."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kdistill.trainer.artifact import Artifact

from . import kernel_choice
from .batcher import BatchStats, DynamicBatcher, length_groups
from .generation import DecodeStats, GenRequest, GenResult, generate_batch
from .metrics import ServerMetrics
from .runtime import inference_mode, prepare_for_inference
from .scoring import ScoreRequest, TokenLogprobs, score_batch

# Fixed cost of one forward pass in token-equivalents (see batcher.length_groups): measured on this
# CPU, a 2-layer, 256-wide INT8 student costs ~4 ms per call plus ~0.04 ms per padded token.
FORWARD_OVERHEAD_TOKENS = 96
# Continuous batching admits at most this many times max_batch_size requests into one running
# generation batch, so that a batch under sustained load still ends now and then (the batch-size
# histogram and the Retry-After estimate are per batch).
MAX_ADMITTED_BATCHES = 8
# Joining costs a prefill forward, about one decode step of per-call overhead. Waiting requests
# therefore join together: once they would fill a quarter of the batch (or every free row), or
# after this many decode steps, whichever comes first.
ADMIT_EVERY_STEPS = 4
# Opt-in: intra-op threads for big classification passes only (``KDISTILL_BATCH_THREADS``). A pass
# of at least BIG_PASS_TOKENS padded tokens is a GEMM large enough to split across cores; small
# passes (and batch size 1) keep the server's thread count, so they leave the other core to the
# event loop. See docs/serving.md for what it measured.
BATCH_THREADS_ENV = "KDISTILL_BATCH_THREADS"
BIG_PASS_TOKENS = 1024


def batch_threads_from_env() -> int:
    raw = os.environ.get(BATCH_THREADS_ENV, "") or "0"
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{BATCH_THREADS_ENV}={raw!r}: expected a whole number of threads") from None
    if value < 0:
        raise ValueError(f"{BATCH_THREADS_ENV}={raw!r}: must be >= 0 (0: off)")
    return value


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """``n`` torch intra-op threads inside the block (0 or the current count: no change)."""
    before = torch.get_num_threads()
    if n <= 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TokenCount:
    """Tokens a batch processed (and padded to, when the engine split it), handed from run_* to the
    batch-stats hook."""

    value: int = 0
    padded: int | None = None


class Engine:
    def __init__(self, artifact: Artifact, metrics: ServerMetrics) -> None:
        self.artifact = artifact
        self.model = artifact.model.eval()
        # The fastest INT8 kernel on this machine (measured or cached; see serving/kernel_choice.py).
        self.int8_kernel = kernel_choice.apply(self.model)
        metrics.set_int8_kernel(self.int8_kernel.kernel, self.int8_kernel.source, self.int8_kernel.bands)
        # Fused kernels for the same function (both FP32 and INT8 artifacts): see serving/runtime.py.
        self.runtime = prepare_for_inference(self.model)
        self.tokenizer = artifact.tokenizer
        self.task = artifact.task
        self.metrics = metrics
        config = self.model.config
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 512
        tok_max = getattr(self.tokenizer, "model_max_length", None) or positions
        self.max_context = int(min(positions, tok_max))
        id2label = getattr(config, "id2label", None) or {}
        num_labels = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
        self.labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._last_tokens = TokenCount()
        self._batcher: DynamicBatcher[Any, Any] | None = None
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        plain = backend is not None and backend.truncation is None and backend.padding is None
        self._backend = backend if plain else None
        self.batch_threads = batch_threads_from_env()
        self.big_passes = 0  # classification passes run with batch_threads

    def info(self) -> dict[str, Any]:
        """What the server reports about its model (``/v1/models``, ``/v2/models/NAME``)."""
        return {
            "task": self.task,
            "quantization": self.artifact.meta.get("quantization", {}).get("mode", "none"),
            "int8_kernel": self.int8_kernel.kernel,
            "int8_kernel_source": self.int8_kernel.source,
            "int8_kernel_bands": self.int8_kernel.bands,
        }

    def attach(self, batcher: DynamicBatcher[Any, Any]) -> None:
        """Generation admits waiting requests from ``batcher`` into its running batch."""
        self._batcher = batcher

    def encode(self, text: str) -> list[int]:
        # The Rust tokenizer directly when it would give the same ids (no truncation or padding set
        # on it): transformers' __call__ wrapper costs ~80 us more per request on this CPU.
        if self._backend is not None:
            return list(self._backend.encode(text, add_special_tokens=True).ids)
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    @inference_mode
    def run_classification(self, batch: list[list[int]]) -> list[list[float]]:
        """One batch, run as a few padded passes of similar lengths (``length_groups``): the batcher
        gathers whatever waits, and padding a 10-token text to 128 would cost as much as the text."""
        out: list[list[float]] = [[] for _ in batch]
        padded = 0
        for group in length_groups([len(r) for r in batch], FORWARD_OVERHEAD_TOKENS):
            rows = [batch[i] for i in group]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, : len(row)] = 1
            # A pass without padding needs no mask: the model takes its unmasked attention path.
            kwargs = {} if len(rows) == 1 or all(len(r) == width for r in rows) else {"attention_mask": mask}
            big = self.batch_threads > 0 and len(rows) > 1 and width * len(rows) >= BIG_PASS_TOKENS
            self.big_passes += big
            with intra_op_threads(self.batch_threads if big else 0):
                logits = self.model(input_ids=ids, **kwargs).logits
            for i, probs in zip(group, torch.softmax(logits.float(), dim=-1).tolist(), strict=True):
                out[i] = probs
            padded += width * len(rows)
        self._last_tokens.value = sum(len(r) for r in batch)
        self._last_tokens.padded = padded
        self.metrics.tokens.labels("input").inc(self._last_tokens.value)
        return out

    def run_generation(self, batch: list[GenRequest | ScoreRequest]) -> list[GenResult | TokenLogprobs]:
        """One causal-LM batch: scoring requests (one forward each group) and generation requests
        (prefill + decode with continuous batching); results in batch order, then admission order."""
        order: list[GenRequest | ScoreRequest] = list(batch)
        scored: dict[int, TokenLogprobs] = {}

        def score(requests: list[GenRequest | ScoreRequest]) -> list[GenRequest]:
            """Score the scoring requests at once (answering each early); the rest go on to generate."""
            todo = [r for r in requests if isinstance(r, ScoreRequest)]
            if todo:
                for r, lp in zip(
                    todo, score_batch(self.model, todo, self.pad_id, FORWARD_OVERHEAD_TOKENS), strict=True
                ):
                    scored[id(r)] = lp
                    if r.on_done is not None:
                        r.on_done(lp)
                self.metrics.tokens.labels("input").inc(sum(len(r.prompt_ids) for r in todo))
            return [r for r in requests if isinstance(r, GenRequest)]

        generating = score(order)
        generated = iter(self._generate(generating, order, score) if generating else [])
        self._last_tokens.value = sum(len(r.prompt_ids) for r in order if isinstance(r, ScoreRequest)) + (
            self._last_tokens.value if generating else 0
        )
        return [scored[id(r)] if isinstance(r, ScoreRequest) else next(generated) for r in order]

    def _generate(
        self,
        batch: list[GenRequest],
        order: list[GenRequest | ScoreRequest],
        score: Callable[[list[GenRequest | ScoreRequest]], list[GenRequest]],
    ) -> list[GenResult]:
        """Generation with continuous batching; admitted scoring requests are scored at admission
        (``score``) and only appended to ``order``."""
        stats = DecodeStats()
        batcher, admit, max_rows = self._batcher, None, None
        if batcher is not None:
            policy, left = batcher.policy, MAX_ADMITTED_BATCHES * batcher.policy.max_batch_size
            quarter, steps = max(1, policy.max_batch_size // 4), 0

            def admit(free: int, budgeted: int) -> list[GenRequest]:
                nonlocal left, steps
                steps += 1
                if batcher.depth < min(free, quarter) and steps < ADMIT_EVERY_STEPS:
                    return []
                admitted = batcher.admit(min(free, left), policy.max_batch_tokens - budgeted)
                left -= len(admitted)
                steps = 0 if admitted else steps
                order.extend(admitted)
                return score(admitted)

            max_rows = policy.max_batch_size
        results: list[GenResult] = generate_batch(self.model, self.tokenizer, batch, stats, admit, max_rows)
        self.metrics.decode_steps.inc(stats.steps)
        self.metrics.decode_rows.inc(stats.rows)
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        self.metrics.tokens.labels("input").inc(prompt)
        self.metrics.tokens.labels("generated").inc(completion)
        self._last_tokens.value = prompt + completion
        return results

    def on_batch(self, stats: BatchStats) -> None:
        if self._last_tokens.padded is not None:  # the engine split the batch: report what it padded
            stats = dataclasses.replace(stats, padded_tokens=self._last_tokens.padded)
            self._last_tokens.padded = None
        self.metrics.observe_batch(stats, self._last_tokens.value)

    def warm_up(self) -> None:
        """One real pass of each shape family, so the first request does not pay for lazy init
        (kernel packing, allocator growth)."""
        probe = self.encode("warm up") or [self.pad_id]
        if self.task == "causal-lm":
            self.run_generation(
                [
                    GenRequest(probe, max_tokens=2, temperature=0.0),
                    GenRequest(probe[:1], max_tokens=1, temperature=0.0),
                    ScoreRequest(probe, top_k=1),  # the scoring pass (padded forward, log-softmax, top-K)
                ]
            )
        else:
            self.run_classification([probe, probe[:1]])
