"""The model-parallel flow: the student split over ranks by tensor and/or pipeline parallelism
(``parallel/student.py``), replicated over the data ranks.

It trains the logits objective of causal LMs (what ``parallel.runtime.check_model_parallel``
admits): from the live teacher or the teacher cache, optionally entropy-weighted, through QAT's
reduced-precision and fake-quant phases (``parallel/student_qat.py``). Rank 0 keeps an unsplit
copy of the student: checkpoints and the final student are gathered into it
(``parallel/student_state.py``), so a checkpoint is the whole student whatever the layout, and
any layout can resume it.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode

from ..checkpoint import CheckpointInfo
from ..errors import TrainerError
from ..objective import IGNORE_INDEX, token_objective
from ..stages import Phase
from .base import Batch, CheckpointState
from .single import logits_settings

# One pipeline schedule per batch shape: lengths are rounded up to a multiple of this.
PIPELINE_LENGTH_MULTIPLE = 16


class ModelParallelFlow:
    def __init__(
        self,
        spec: DistillationJobSpec,
        student: nn.Module,
        teacher: nn.Module,
        parallel: Any,  # ParallelRuntime
        *,
        pad_id: int,
        device: torch.device,
        is_writer: bool,
    ) -> None:
        """Records the unsplit parameter layout, keeps rank 0's unsplit copy, then splits
        ``student`` in place."""
        from ..parallel.student_state import FullLayout

        self.settings = logits_settings(spec)
        self.teacher = teacher
        self.parallel = parallel
        self.pad_id = pad_id
        self.device = device
        self.is_writer = is_writer
        self.full_layout = FullLayout.of(student)
        self.template: nn.Module | None = copy.deepcopy(student) if is_writer else None
        self.temperature = 1.0  # the current step's, read by the token loss
        self.loss_sums: list[torch.Tensor] = []  # per loss call: [KD sum, CE sum, valid tokens]
        # The teacher cache (targets.CacheStore), set by the loop once it exists; None: off.
        self.cache: Any = None
        self.split_student = parallel.parallelize_student(student, self._token_loss)

    # ---- the interface -------------------------------------------------------------------------
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.split_student.named_params.items() if p.requires_grad]

    @property
    def foreach_optimizer(self) -> bool | None:
        # DTensor shards and plain tensors cannot share one foreach kernel call.
        return False

    def micro_step(self, batch: Batch, phase: Phase, temperature: float, accum: int) -> tuple[float, dict[str, float]]:
        """Forward and backward of one micro-batch through the split student; returns the global
        mean loss and its KD/CE parts (the same numbers a single process reports)."""
        ids, mask, labels = self._padded(batch)
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        with self._autocast(phase):
            teacher = self._teacher_targets(batch["example_ids"].tolist(), ids, mask)
        weights = None
        if teacher is not None and self.settings.entropy_beta is not None:
            # The token's sample weight travels as one more channel of the teacher's side.
            weights = self._token_weights(teacher, shifted)
            teacher = torch.cat([teacher, weights.unsqueeze(-1).to(teacher.dtype)], dim=-1)
        self.temperature = temperature
        self.loss_sums.clear()
        loss = self.split_student.forward_backward(
            ids,
            shifted,
            teacher,
            mask,
            grad_scale=1.0 / accum,
            autocast=lambda: self._autocast(phase),
            token_weights=weights,
        )
        sums = self._reported_sums()
        count = max(float(sums[2]), 1.0)
        return loss, {"kd": float(sums[0]) / count, "ce": float(sums[1]) / count, "logits": loss}

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> None:
        from ..parallel.student_state import clip_grad_norm

        with self.parallel.guard("the gradient norm"):
            clip_grad_norm(self.split_student, self.full_layout, max_norm)

    def save(self, step: int, phase: Phase, temperature: float, state: CheckpointState) -> Path | None:
        # Every rank takes part in the gather; rank 0 writes the whole student.
        gathered = self._gather(state.optimizer)
        if gathered is None:
            return None
        assert self.template is not None
        return state.write(
            step=step, phase=phase, temperature=temperature, model=self.template, optimizer=gathered.optimizer_view()
        )

    def restore(self, info: CheckpointInfo, state: CheckpointState) -> None:
        """Every rank reads the whole-student checkpoint and keeps its own shard of it."""
        from safetensors.torch import load_file

        from ..checkpoint import restore_rng
        from ..parallel.student_state import load_state

        weights = load_file(str(info.path / "model.safetensors"))
        opt_state = torch.load(info.path / "optimizer.pt", weights_only=True)
        try:
            load_state(self.split_student, state.optimizer, self.full_layout, weights, opt_state)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise TrainerError(
                ExitCode.CHECKPOINT_INCOMPATIBLE, f"checkpoint {info.path} does not fit this student: {exc}"
            ) from None
        state.scheduler.load_state_dict(torch.load(info.path / "scheduler.pt", weights_only=True))
        restore_rng(torch.load(info.path / "rng.pt", weights_only=True))

    def finish(self, optimizer: torch.optim.Optimizer) -> None:
        """The outputs (student/, the INT8 artifact, evaluation) are written by rank 0 from its
        unsplit copy; the gather is collective, so every rank does it."""
        self._gather(optimizer)

    def final_student(self) -> nn.Module:
        """The writer's unsplit copy: plain float layers (the fake quantizers live in the split
        student only), which INT8 conversion quantizes as it does the unsplit QAT student."""
        assert self.template is not None, "only the writer holds the whole student"
        return self.template

    # ---- QAT -----------------------------------------------------------------------------------
    def enter_fake_quant(self) -> None:
        """INT8 fake quantization of every rank's shard of the backbone Linear layers, in place
        (``parallel/student_qat.py``): the same Parameters, so the optimizer and DDP carry on."""
        from ..parallel.student_qat import prepare_split_qat

        prepare_split_qat(self.split_student.model, tensor_parallel=self.parallel.layout.tensor > 1)

    def _autocast(self, phase: Phase) -> contextlib.AbstractContextManager[Any]:
        """QAT's reduced-precision part runs the teacher and the student under autocast, as the
        single-process flow does."""
        if phase.kind != "qat-reduced":
            return contextlib.nullcontext()
        from ..quantization import reduced_precision_autocast

        return reduced_precision_autocast(self.device)

    # ---- internals -----------------------------------------------------------------------------
    def _token_loss(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ParallelStudent's TokenLoss: runs on the ranks that hold the LM head (the last
        pipeline stage), at the step's temperature; keeps the KD/CE sums for the report."""
        weighted = self.settings.entropy_beta is not None
        top_k = self.cache.top_k if self.cache is not None else None
        loss, sums = token_objective(
            student,
            teacher[..., :-1] if weighted else teacher,
            labels,
            temperature=self.temperature,
            settings=self.settings,
            top_k=top_k,
        )
        self.loss_sums.append(sums)
        return loss * teacher[..., -1] if weighted else loss

    def _padded(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if self.parallel.layout.pipeline > 1:
            # Few shapes, few schedules: right padding is ignored by causal attention and the loss.
            pad = -ids.shape[1] % PIPELINE_LENGTH_MULTIPLE
            if pad:
                ids = torch.nn.functional.pad(ids, (0, pad), value=self.pad_id)
                mask = torch.nn.functional.pad(mask, (0, pad), value=0)
                labels = torch.nn.functional.pad(labels, (0, pad), value=IGNORE_INDEX)
        return ids, mask, labels

    def _teacher_targets(self, example_ids: list[int], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The teacher's side of every token on the ranks that compute the loss (None elsewhere):
        its logits, or with the teacher cache the packed top-k entry (``token_objective``).

        With the cache, tensor rank 0 of each loss rank's tensor group looks the batch up, runs
        the teacher on a miss and stores its top-k, then hands the entry to its tensor peers:
        one writer per batch, and every peer trains on exactly what the cache gives back."""
        if self.cache is None:
            return self._teacher_logits(ids, mask)
        ps = self.split_student
        loss_rank = ps.is_last_stage
        keeper = loss_rank and ps.coords["tensor"] == 0
        cached = self.cache.lookup(example_ids) if keeper else None
        need = keeper and cached is None
        logits = None
        if self.parallel.split_teacher:
            # The split teacher's forward is collective: its group runs it if any member misses.
            if self.parallel.any_needs_teacher(need):
                logits = self.parallel.teacher_logits(ids, mask)
        elif need:
            with torch.inference_mode():
                logits = self.teacher(input_ids=ids, attention_mask=mask).logits.float().clone()
        if need:
            assert logits is not None
            cached = self.cache.store(example_ids, logits.float(), mask)
        if not loss_rank:
            return None
        k = self.cache.top_k
        packed = torch.zeros(*ids.shape, 2 * k + 1, device=self.device)
        if keeper:
            assert cached is not None
            length = min(cached.values.shape[1], ids.shape[1])
            packed[:, :length, :k] = cached.values[:, :length].to(self.device)
            packed[:, :length, k : 2 * k] = cached.indices[:, :length].to(self.device).float()
            packed[:, :length, 2 * k] = cached.logsumexp[:, :length].to(self.device)
        if self.parallel.layout.tensor > 1:
            import torch.distributed as dist

            group = self.parallel.mesh["tensor"].get_group()
            c = ps.coords
            source = self.parallel.layout.rank_of(c["pipeline"], c["data"], 0)
            with self.parallel.guard("the teacher-cache entry broadcast"):
                dist.broadcast(packed, src=source, group=group)
        return packed

    def _token_weights(self, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token entropy weights [b, L] (``weighting.py``): each sample's weight at its
        predicted tokens, normalised over the global micro-batch (every data rank's rows), so a
        token weighs what it weighs in the single-process step."""
        from ..objective import bucket_logits
        from ..weighting import normalise_weights, raw_entropy_weights

        beta = self.settings.entropy_beta
        assert beta is not None
        valid = labels.to(teacher.device) != IGNORE_INDEX
        if self.cache is None:
            source = teacher
        else:
            k = self.cache.top_k
            source = bucket_logits(teacher[..., :k], teacher[..., 2 * k])
        raw, present = raw_entropy_weights(source, beta, valid.float())
        totals = torch.tensor([float(present.sum()), float(raw.double().sum())], dtype=torch.float64)
        if self.parallel.layout.data > 1:
            import torch.distributed as dist

            with self.parallel.guard("the entropy-weight totals"):
                totals = totals.to(self.device)
                dist.all_reduce(totals, group=self.parallel.mesh["data"].get_group())
        weights = normalise_weights(raw, present, int(totals[0].item()), float(totals[1].item()))
        return weights[:, None].expand_as(valid) * valid

    def _teacher_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The ranks that compute the loss (the last pipeline stage, every tensor peer there) run
        the teacher on their own rows; earlier stages never run it. A split teacher's forward is
        collective, so then every rank takes part."""
        if self.parallel.split_teacher:
            return self.parallel.teacher_logits(ids, mask)
        if not self.split_student.is_last_stage:
            return None
        with torch.inference_mode():
            logits = self.teacher(input_ids=ids, attention_mask=mask).logits.float()
        return logits.clone()

    def _reported_sums(self) -> torch.Tensor:
        """KD/CE sums and token count summed over the data ranks' loss ranks (tensor 0 only),
        from the real micro-batches (the last calls; shape inference calls come first)."""
        import torch.distributed as dist

        sums = torch.zeros(3, dtype=torch.float64)
        ps = self.split_student
        if ps.is_last_stage and ps.coords["tensor"] == 0 and ps.last_loss_calls:
            sums = torch.stack(self.loss_sums[-ps.last_loss_calls :]).sum(0)
        if self.parallel.distributed:
            with self.parallel.guard("the loss report"):
                sums = sums.to(self.device)
                dist.all_reduce(sums)
        return sums

    def _gather(self, optimizer: torch.optim.Optimizer) -> Any:
        """Collective: the whole student's state on rank 0 (GatheredState), None elsewhere."""
        from ..parallel.student_state import gather_state, load_into_template

        with self.parallel.guard("gathering the student"):
            state = gather_state(self.split_student, optimizer, self.full_layout)
        if state is not None:
            load_into_template(self.template, state.weights)
        return state
