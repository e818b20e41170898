"""The teacher's side of training when the teacher is served over HTTP.

Where the served teacher comes from (``teacher_url``): ``KDISTILL_TEACHER_URL`` when it is set
(the operator sets it for ``teacher.serve`` and ``teacher.endpoint``, ``kdistill run`` for the
local server it starts), else ``teacher.endpoint``; neither means the teacher runs in-process.
``teacher.serve.enabled`` without the variable is an error: the server that spec asks for is
started by the operator or ``kdistill run``, not by the trainer.

The ``logits`` objective trains on the served teacher's top-K log-probs at each position plus a
tail bucket for the rest of the mass (``RemoteTargetSource``): the same top-k path as the
teacher cache (``TeacherTargets.top_values/top_indices/logsumexp``), with log-probs as logits
and a log-sum-exp of 0. K is ``distillation.teacherCache.topK`` (at most the vocabulary), so a
job trains on the same targets whether or not the cache is on; with the cache on, the served
teacher fills it and later epochs read it without asking the server.

Overlap: the loop hands the next micro-batch to ``prefetch`` before the student steps on the
current one (``peek_next``), so the teacher's answer is computed while the student works.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import Future
from typing import Any

import torch

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode
from kdistill.api.metadata import TEACHER_URL_ENV

from .errors import TrainerError
from .evaluate import EvalResult
from .objective import IGNORE_INDEX
from .targets import Batch, CacheStore, Needs, TeacherTargets
from .teacher_client import HttpTeacher
from .teacher_service import ScoredTokens, TeacherService

log = logging.getLogger(__name__)

# Text the startup check scores to compare the served teacher's tokens with the trainer's.
PROBE_TEXT = "Knowledge distillation: the student learns from the teacher's answers, 42 times over."


def teacher_url(spec: DistillationJobSpec) -> str | None:
    """The served teacher's URL for this job (module docstring), or None for an in-process teacher."""
    env = os.environ.get(TEACHER_URL_ENV, "").strip()
    if env:
        return env
    if spec.teacher.endpoint:
        return spec.teacher.endpoint
    if spec.teacher.serve.enabled:
        raise TrainerError(
            ExitCode.TEACHER_UNAVAILABLE,
            f"teacher.serve.enabled but {TEACHER_URL_ENV} is not set: the operator or kdistill run starts the "
            "teacher server and passes its URL",
        )
    return None


def check_remote_layout(url: str | None, parallel: Any) -> None:
    """A split student's flow runs the teacher's logits through its own schedule; a served
    teacher feeds the whole-student flows only (single process or data parallel)."""
    if url is not None and parallel.model_parallel:
        raise TrainerError(
            ExitCode.BAD_SPEC,
            "a served teacher (teacher.endpoint, teacher.serve) trains a whole student per rank: "
            "parallelism.student.tensor and .pipeline must be 1",
        )


def remote_top_k(spec: DistillationJobSpec, vocab: int) -> int:
    return min(spec.distillation.teacher_cache.top_k, vocab)


def open_teacher(url: str, spec: DistillationJobSpec) -> HttpTeacher:
    """The client of the served teacher, with enough requests in flight to fill its batches."""
    batching = spec.teacher.serve.batching
    in_flight = max(4, min(64, spec.teacher.serve.replicas * max(1, batching.max_batch_size // 4)))
    return HttpTeacher(url, max_in_flight=in_flight)


def check_served_tokens(service: TeacherService, tokenizer: Any, url: str, needs_same: bool) -> bool:
    """Whether the served teacher cuts text into the trainer's token ids. Also waits for it (with
    the client's retries) before the first step. A different tokenizer is an error when the job
    trains on the teacher's logits position by position (``needs_same``)."""
    served = service.score_texts([PROBE_TEXT], 1).result()[0].token_ids.tolist()
    mine = list(tokenizer(PROBE_TEXT)["input_ids"])
    if served == mine:
        return True
    if needs_same:
        raise TrainerError(
            ExitCode.BAD_SPEC,
            f"the teacher at {url} tokenizes text differently from the student ({served[:8]}... against "
            f"{mine[:8]}...): the logits objective and the teacher cache compare them token by token",
        )
    log.warning("the teacher at %s tokenizes text differently from the student; only text passes between them", url)
    return False


def peek_next(sampler: Any) -> list[int]:
    """The positions the sampler hands out next, without taking them (its state stays put, so a
    checkpoint never counts a batch that was only looked at)."""
    return list(sampler.global_batch(sampler.state_dict()["batches"])[sampler.rank :: sampler.world])


def _sequences(batch: Batch) -> list[list[int]]:
    """Each example's real tokens (padding is on the right)."""
    ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
    return [ids[b, : int(mask[b].sum())].tolist() for b in range(ids.shape[0])]


def lay_out(rows: list[ScoredTokens], width: int, k: int, vocab: int) -> tuple[torch.Tensor, ...]:
    """Top-k log-probs as the cache lays them out: ``values[b, i]`` is the teacher's top-k at
    position i (the distribution of token i + 1), [B, width, k], with indices and a log-sum-exp
    of 0 (log-probs are normalised). The scoring answer has no row for the distribution after an
    example's last token; that position is never trained on, and holds a uniform distribution so
    that the cache stores only finite rows. Padding is zero."""
    b = len(rows)
    values = torch.zeros((b, width, k))
    indices = torch.zeros((b, width, k), dtype=torch.int64)
    for i, row in enumerate(rows):
        n = len(row)
        if row.top_ids.shape[1] < k:
            raise TrainerError(ExitCode.INTERNAL, f"the teacher answered top-{row.top_ids.shape[1]}, asked {k}")
        values[i, : n - 1] = row.top_logprobs[1:n, :k]
        indices[i, : n - 1] = row.top_ids[1:n, :k]
        values[i, n - 1] = -math.log(vocab)
        indices[i, n - 1] = torch.arange(k)
    return values, indices, torch.zeros((b, width))


class RemoteTargetSource:
    """``TeacherTargetSource``'s answers from a served teacher (module docstring)."""

    def __init__(self, service: TeacherService, top_k: int, vocab: int, cache: CacheStore | None) -> None:
        self.service = service
        self.top_k = top_k
        self.vocab = vocab
        self.cache = cache
        self._pending: dict[tuple[int, ...], Future[list[ScoredTokens]]] = {}
        # Seconds for_batch spent waiting on the teacher (what the overlap did not hide).
        self.wait_seconds = 0.0

    def _key(self, batch: Batch) -> tuple[int, ...]:
        return tuple(int(i) for i in batch["example_ids"].tolist())

    def _cached(self, key: tuple[int, ...]) -> bool:
        return self.cache is not None and all(i in self.cache.cache for i in key)

    def prefetch(self, batch: Batch) -> None:
        """Ask for ``batch``'s scores now; ``for_batch`` collects them later."""
        key = self._key(batch)
        if key not in self._pending and not self._cached(key):
            self._pending[key] = self.service.score_ids(_sequences(batch), self.top_k)

    def for_batch(self, batch: Batch, objectives: set[str], autocast: Any) -> TeacherTargets:
        import time

        out = TeacherTargets()
        if not Needs.of(objectives).logits:
            return out
        key = self._key(batch)
        device = batch["input_ids"].device
        cached = self.cache.lookup(list(key)) if self._cached(key) and self.cache is not None else None
        if cached is None:
            future = self._pending.pop(key, None) or self.service.score_ids(_sequences(batch), self.top_k)
            started = time.perf_counter()
            rows = future.result()
            self.wait_seconds += time.perf_counter() - started
            values, indices, lse = lay_out(rows, batch["input_ids"].shape[1], self.top_k, self.vocab)
            if self.cache is None:
                out.top_values, out.top_indices, out.logsumexp = values.to(device), indices.to(device), lse.to(device)
                return out
            lengths = [len(r) for r in rows]
            self.cache.cache.store(list(key), values.half(), indices, lengths, lse)
            # Train on exactly what a later epoch (or a resumed run) will read back.
            cached = self.cache.lookup(list(key))
            if cached is None:
                raise TrainerError(ExitCode.INTERNAL, "the teacher cache lost an entry it just stored")
        out.top_values = cached.values.to(device)
        out.top_indices = cached.indices.to(device)
        out.logsumexp = cached.logsumexp.to(device)
        return out


def evaluate_remote(service: TeacherService, batches: list[Batch]) -> EvalResult:
    """The served teacher's perplexity on collated causal-LM batches (its log-probs of each
    trained token), as ``evaluate`` scores an in-process model."""
    futures = [service.score_ids(_sequences(b), 1) for b in batches]  # all in flight at once
    total, count = 0.0, 0
    scored_bytes: int | None = 0
    for batch, future in zip(batches, futures, strict=True):
        for i, row in enumerate(future.result()):
            n = len(row)
            valid = batch["labels"][i, 1:n].cpu() != IGNORE_INDEX
            total -= float(row.logprobs[1:n][valid].double().sum())
            count += int(valid.sum())
        in_batch = batch.get("scored_bytes")
        scored_bytes = None if in_batch is None or scored_bytes is None else scored_bytes + int(in_batch.sum())
    if count == 0:
        raise ValueError("evaluation data has nothing to score")
    mean = total / count
    bpb = total / math.log(2) / scored_bytes if scored_bytes else None
    return EvalResult("perplexity", math.exp(min(mean, 700.0)), mean, count, bpb)
