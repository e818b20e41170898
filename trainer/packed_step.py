"""The logits objective on packed micro-batches, through the fused chunked head and loss.

When a job only distils logits (forward KL) of a causal LM whose logits are ``head(backbone(x))``
in one process, a micro-batch is packed (``packing.pack_or_pad``: several examples a row, no
attention across them, so no padding inside rows; or, where the examples' lengths are close, as
the length-grouped sampler makes them, one example a row in rows as wide as the longest) and:
- the live teacher runs its backbone in inference mode on the packed rows; its logits at the
  trained rows are computed chunk by chunk inside the fused loss (``TeacherHead``), never as a
  whole [N, V] tensor;
- with the teacher cache, the cached top-k is laid out as the packed rows; on a miss the teacher's
  logits are computed once, their top-k stored per example and read back, as ``targets.CacheStore``
  does for padded batches;
- the student runs its backbone on the packed rows; its head and the loss run fused and chunked
  (``fused_head_loss.py``).
Where every row holds a single example (close or long lengths, one a row), the backbones run without
``position_ids``: the example's positions are then the default ``0..n-1`` and plain causal
attention (no block-diagonal mask) gives its tokens the same outputs; only the trailing padding,
which is never trained, differs. With ``KDISTILL_COMPILE=1`` both backbones run compiled
(``compile.maybe_compiled_module``).
The result equals the padded path's loss and gradient up to float rounding (tests/unit/
test_packing.py, tests/unit/test_fused_head_loss.py, tests/trainer/test_compile.py). Any other
job keeps the padded path.
``KDISTILL_PACKED_STEP=0`` turns this path off (for measuring it against the padded one).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode

from .compile import maybe_compiled_module
from .errors import TrainerError
from .fused_head_loss import TeacherHead, TopKTeacher, fused_head_kd_loss
from .objective import trained_rows
from .packing import to_examples
from .stages import Phase
from .targets import CacheStore, row_head_parts

# transformers builds the block-diagonal mask of packed rows for these attention kernels.
PACKABLE_ATTENTION = frozenset({"sdpa", "eager"})


def _attention_kind(model: nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def packed_step_applies(
    spec: DistillationJobSpec, plan: list[Phase], parallel: Any, student: nn.Module, teacher: nn.Module
) -> bool:
    """Whether every micro-batch of this job can run packed through the fused head and loss."""
    if os.environ.get("KDISTILL_PACKED_STEP", "1") == "0":
        return False
    if spec.task != "causal-lm" or spec.quantization.mode == "qat-int8":
        return False
    if spec.distillation.loss != "forward-kl" or spec.data.uncertainty_weighting.enabled:
        return False
    if parallel.model_parallel or parallel.split_teacher or parallel.distributed:
        return False
    if any(set(p.objectives) != {"logits"} for p in plan):
        return False
    models = (student, teacher)
    return all(row_head_parts(m) is not None and _attention_kind(m) in PACKABLE_ATTENTION for m in models)


def backbone_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The backbones' inputs for a packed micro-batch: ``position_ids`` (so transformers builds the
    block-diagonal mask) only where a row holds several examples."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch["example_ids"].numel() != batch["input_ids"].shape[0]:
        inputs["position_ids"] = batch["position_ids"]
    return inputs


def trained_row_spans(batch: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[list[int], list[int]]:
    """(first row, rows) of each example among the trained rows ``[:, :-1][valid]``: an example
    of ``n`` tokens trains its tokens ``0 .. n-2``, which lie next to each other in one packed row,
    so they are consecutive trained rows."""
    lengths = batch["lengths"]
    longest = int(lengths.max())
    index = batch["pack_index"][:, :-1][valid]  # b * longest + t of every trained row
    first = (index % longest == 0).nonzero().squeeze(1)
    starts = torch.zeros(len(lengths), dtype=torch.long)
    starts[index[first] // longest] = first
    return starts.tolist(), (lengths - 1).tolist()


class PackedLogitsStep:
    """Loss of one packed micro-batch: teacher targets, student backbone, fused head + loss."""

    def __init__(self, spec: DistillationJobSpec, student: nn.Module, teacher: nn.Module, cache: CacheStore | None):
        s_parts, t_parts = row_head_parts(student), row_head_parts(teacher)
        assert s_parts is not None and t_parts is not None
        self.s_backbone, self.s_head = s_parts
        self.t_backbone, self.t_head = t_parts
        self.cache = cache
        self.alpha = spec.distillation.alpha
        # What runs each backbone: the module, or its compiled forward (KDISTILL_COMPILE=1).
        self.student_forward = maybe_compiled_module(self.s_backbone)
        self.teacher_forward = maybe_compiled_module(self.t_backbone)

    def micro_loss(self, batch: dict[str, torch.Tensor], temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        valid = trained_rows(labels)
        inputs = backbone_inputs(batch)
        teacher = self._teacher(batch, valid, inputs)
        hidden = self.student_forward(**inputs).last_hidden_state
        loss, kd, ce = fused_head_kd_loss(
            hidden[:, :-1][valid],
            self.s_head.weight,
            getattr(self.s_head, "bias", None),
            teacher,
            labels[:, 1:][valid],
            alpha=self.alpha,
            temperature=temperature,
        )
        return loss, {"kd": float(kd.mean()), "ce": float(ce.mean()), "logits": float(loss.detach())}

    def _teacher(
        self, batch: dict[str, torch.Tensor], valid: torch.Tensor, inputs: dict[str, Any]
    ) -> TeacherHead | TopKTeacher:
        if self.cache is None:
            with torch.inference_mode():
                hidden = self.teacher_forward(**inputs).last_hidden_state[:, :-1][valid]
            # An inference tensor may not meet autograd; a [N, H] copy is cheap.
            bias = getattr(self.t_head, "bias", None)
            return TeacherHead(hidden.clone(), self.t_head.weight.detach(), None if bias is None else bias.detach())
        ids = batch["example_ids"].tolist()
        starts, counts = trained_row_spans(batch, valid)
        rows = int(valid.sum())
        cached = self.cache.cache.lookup_rows(ids, starts, counts, rows)
        if cached is None:
            self._fill_cache(batch, ids, inputs)
            cached = self.cache.cache.lookup_rows(ids, starts, counts, rows)
            if cached is None:
                raise TrainerError(ExitCode.INTERNAL, "the teacher cache lost an entry it just stored")
        return TopKTeacher(cached.values, cached.indices, cached.logsumexp)

    def _fill_cache(self, batch: dict[str, torch.Tensor], ids: list[int], inputs: dict[str, Any]) -> None:
        """Teacher logits of the packed rows; their top-k stored per example (read back by the
        caller: training sees exactly what a later epoch reads)."""
        assert self.cache is not None
        with torch.inference_mode():
            logits = self.t_head(self.teacher_forward(**inputs).last_hidden_state).float()
            lse = torch.logsumexp(logits, dim=-1)
            values, indices = logits.topk(self.cache.top_k, dim=-1)
        index = batch["pack_index"]
        lengths = batch["lengths"].tolist()
        longest = max(lengths)
        self.cache.cache.store(
            ids,
            to_examples(values.half(), index, len(ids), longest).cpu(),
            to_examples(indices, index, len(ids), longest).cpu(),
            lengths,
            to_examples(lse, index, len(ids), longest).cpu(),
        )
