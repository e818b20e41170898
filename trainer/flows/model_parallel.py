"""The model-parallel flow: the student split over ranks by tensor and/or pipeline parallelism
(``parallel/student.py``), replicated over the data ranks.

It trains the logits objective of causal LMs (what ``parallel.runtime.check_model_parallel``
admits). Rank 0 keeps an unsplit copy of the student: checkpoints and the final student are
gathered into it (``parallel/student_state.py``), so a checkpoint is the whole student whatever
the layout, and any layout can resume it.
"""

from __future__ import annotations

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
        teacher = self._teacher_logits(ids, mask)
        self.temperature = temperature
        self.loss_sums.clear()
        loss = self.split_student.forward_backward(ids, shifted, teacher, mask, grad_scale=1.0 / accum)
        sums = self._reported_sums()
        count = max(float(sums[2]), 1.0)
        return loss, {"kd": float(sums[0]) / count, "ce": float(sums[1]) / count, "logits": loss}

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> None:
        from ..parallel.student_state import clip_grad_norm

        with self.parallel.guard("the gradient norm"):
            clip_grad_norm(self.split_student, self.full_layout, max_norm)

    def save(self, step: int, phase: Phase, temperature: float, state: CheckpointState) -> Path | None:
        # Every rank takes part in the gathers; rank 0 writes the whole student.
        residuals = None
        if self.parallel.compression is not None:
            # Every rank's error-feedback residuals (of its own shard), by world rank.
            from ..parallel.compression import gather_residuals

            residuals = gather_residuals(self.parallel.compression, self._compressed_params())
        gathered = self._gather(state.optimizer)
        if gathered is None:
            return None
        assert self.template is not None
        return state.write(
            step=step,
            phase=phase,
            temperature=temperature,
            model=self.template,
            optimizer=gathered.optimizer_view(),
            extra={"compression.safetensors": residuals} if residuals is not None else None,
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
        if self.parallel.compression is not None:
            from ..parallel.compression import restore_residuals

            restore_residuals(
                self.parallel.compression,
                self._compressed_params(),
                state.manager.load_extra(info, "compression.safetensors"),
            )

    def finish(self, optimizer: torch.optim.Optimizer) -> None:
        """The outputs (student/, the INT8 artifact, evaluation) are written by rank 0 from its
        unsplit copy; the gather is collective, so every rank does it."""
        self._gather(optimizer)

    def final_student(self) -> nn.Module:
        assert self.template is not None, "only the writer holds the whole student"
        return self.template

    # ---- internals -----------------------------------------------------------------------------
    def _compressed_params(self) -> list[nn.Parameter]:
        """The parameters the top-k hook sees (DDP's: this rank's trainable shards), in order."""
        return [p for p in self.split_student.named_params.values() if p.requires_grad]

    def _token_loss(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ParallelStudent's TokenLoss: runs on the ranks that hold the LM head (the last
        pipeline stage), at the step's temperature; keeps the KD/CE sums for the report."""
        loss, sums = token_objective(student, teacher, labels, temperature=self.temperature, settings=self.settings)
        self.loss_sums.append(sums)
        return loss

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
