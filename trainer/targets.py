"""Teacher targets for one micro-batch, and the teacher cache as the training loop uses it.

``TeacherTargetSource.for_batch`` returns what the phase's objectives need from the teacher:
logits (all positions, or only the trained rows of a causal LM), hidden states, q/k/v
projections, or the top-k values of the teacher cache. It runs the teacher once per micro-batch
at most, in inference mode, and not at all when every example of the batch is in the cache and
nothing else is needed. A split teacher (``teacherPipelineStages > 1``) answers the same
questions through its collective forward.

``CacheStore`` writes the teacher's top-k logits for examples seen the first time and reads them
back, so a step trains on exactly what a later epoch (or a resumed run) will read.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode

from .errors import TrainerError
from .objective import trained_rows
from .teacher_cache import CachedLogits, TeacherCache

# Causal LMs whose logits are exactly output_head(backbone(x)): for these the head runs only on
# the rows that are trained on (no padding, no last position), not on every position.
ROW_HEAD_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})

Batch = dict[str, torch.Tensor]


@dataclass
class TeacherTargets:
    """Teacher outputs for one micro-batch, reduced to what the phase's objectives need."""

    logits: torch.Tensor | None = None  # [B,L,V] or [B,C]
    logit_rows: torch.Tensor | None = None  # causal-lm: [N,V] at the trained rows only
    top_values: torch.Tensor | None = None  # cache: [B,L,k] or [B,1,k]
    top_indices: torch.Tensor | None = None
    logsumexp: torch.Tensor | None = None
    hidden: tuple[torch.Tensor, ...] | None = None
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def use_cached(self, cached: CachedLogits) -> None:
        self.top_values, self.top_indices, self.logsumexp = cached.values, cached.indices, cached.logsumexp


@dataclass(frozen=True)
class Needs:
    """What one phase's objectives read from the teacher."""

    logits: bool
    hidden: bool
    attention: bool

    @classmethod
    def of(cls, objectives: set[str]) -> Needs:
        return cls(logits="logits" in objectives, hidden="hidden" in objectives, attention="attention" in objectives)


def row_head_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, output head) when logits at chosen rows may be computed as head(backbone(x)[rows])."""
    if getattr(model.config, "model_type", None) not in ROW_HEAD_MODEL_TYPES:
        return None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings()
    if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Module):
        return None
    return backbone, head


class CacheStore:
    """The teacher cache with the loop's k: lookups by example id, stores from teacher logits."""

    def __init__(self, cache: TeacherCache, top_k: int) -> None:
        self.cache = cache
        self.top_k = top_k

    @classmethod
    def from_spec(cls, spec: DistillationJobSpec, teacher: nn.Module, root: Any) -> CacheStore | None:
        settings = spec.distillation.teacher_cache
        if not settings.enabled:
            return None
        config = teacher.config
        vocab = int(config.vocab_size) if spec.task == "causal-lm" else int(config.num_labels)
        top_k = min(settings.top_k, vocab)
        return cls(TeacherCache(root, top_k, vocab), top_k)

    def lookup(self, ids: list[int]) -> CachedLogits | None:
        return self.cache.lookup(ids)

    def store(self, ids: list[int], logits: torch.Tensor, attention_mask: torch.Tensor) -> CachedLogits:
        """Store the top-k of ``logits`` for ``ids`` and return what the cache now gives back."""
        if logits.dim() == 2:  # classification: one "token" per sample
            logits = logits.unsqueeze(1)
            lengths = [1] * logits.shape[0]
        else:
            lengths = attention_mask.sum(dim=1).tolist()
        lse = torch.logsumexp(logits, dim=-1)
        values, indices = logits.topk(self.top_k, dim=-1)
        self.cache.store(ids, values.half().cpu(), indices.cpu(), [int(n) for n in lengths], lse.cpu())
        # Train on exactly what a later epoch (or a resumed run) will read back.
        again = self.cache.lookup(ids)
        if again is None:
            raise TrainerError(ExitCode.INTERNAL, "the teacher cache lost an entry it just stored")
        return again


class TeacherTargetSource:
    """Runs the teacher (local or split) for a micro-batch, or reads the cache instead."""

    def __init__(
        self,
        teacher: nn.Module,
        parallel: Any,  # ParallelRuntime
        task: str,
        pairs: list[tuple[int, int]],
        cache: CacheStore | None,
    ) -> None:
        self.teacher = teacher
        self.parallel = parallel
        self.task = task
        self.pairs = pairs
        self.cache = cache

    def for_batch(self, batch: Batch, objectives: set[str], autocast: Any) -> TeacherTargets:
        needs = Needs.of(objectives)
        out = TeacherTargets()
        ids = batch["example_ids"].tolist()
        cached = self.cache.lookup(ids) if needs.logits and self.cache is not None else None
        need_forward = needs.hidden or needs.attention or (needs.logits and cached is None)
        # A split teacher's forward is collective: its group runs it if any member needs it.
        need_forward = self.parallel.any_needs_teacher(need_forward)
        logits = None
        if need_forward and self.parallel.split_teacher:
            logits = self._split_forward(batch, needs, out)
        elif need_forward:
            logits = self._local_forward(batch, needs, out, autocast)
        if logits is not None:
            if self.cache is None:
                out.logits = logits
            else:
                cached = self.cache.store(ids, logits, batch["attention_mask"])
        if cached is not None:
            out.use_cached(cached)
        return out

    def _split_forward(self, batch: Batch, needs: Needs, out: TeacherTargets) -> torch.Tensor | None:
        """The split teacher's collective forward; fills hidden/qkv, returns the logits if asked."""
        from .parallel.teacher_pipeline import TeacherRequest

        split = self.parallel.teacher
        got = split.forward(
            batch["input_ids"],
            batch["attention_mask"],
            TeacherRequest(
                logits=needs.logits,
                hidden=tuple(t + 1 for _, t in self.pairs) if needs.hidden else (),
                qkv=tuple(t for _, t in self.pairs) if needs.attention else (),
            ),
        )
        if needs.hidden:
            # Only the mapped layers travel; HiddenStateTransfer reads index t + 1 of the tuple.
            out.hidden = tuple(got.hidden[i].float() if i in got.hidden else None for i in range(split.num_layers + 1))
        if needs.attention:
            out.qkv = {layer: tuple(x.float() for x in qkv) for layer, qkv in got.qkv.items()}
        return got.logits

    def _local_forward(self, batch: Batch, needs: Needs, out: TeacherTargets, autocast: Any) -> torch.Tensor | None:
        """The whole teacher in this process; fills hidden/qkv/logit_rows, returns full logits
        when the objectives need them at every position (classification, the cache)."""
        from .qkv_capture import QKVCapture

        t_layers = [t for _, t in self.pairs] if needs.attention else []
        capture = QKVCapture(self.teacher, t_layers) if needs.attention else contextlib.nullcontext()
        parts = row_head_parts(self.teacher) if self.task == "causal-lm" and self.cache is None else None
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "output_hidden_states": needs.hidden,
        }
        with torch.inference_mode(), autocast, capture as cap:
            if parts is not None:
                backbone, head = parts
                t_out = backbone(**inputs)
                if needs.logits:
                    rows = t_out.last_hidden_state[:, :-1][trained_rows(batch["labels"])]
                    out.logit_rows = head(rows).float().clone()
            else:
                t_out = self.teacher(**inputs)
        # Inference tensors cannot enter autograd graphs; clone the ones the losses keep.
        if needs.hidden:
            out.hidden = tuple(h.float().clone() for h in t_out.hidden_states)
        if needs.attention:
            assert cap is not None  # needs.attention installed the capture
            out.qkv = {layer: tuple(x.float().clone() for x in qkv) for layer, qkv in cap.qkv.items()}
        if needs.logits and out.logit_rows is None:
            return t_out.logits.float().clone()
        return None
