"""The single-process flow: one whole student per process, replicated under DDP when the job has
several data ranks (a world of one runs it as is).

Every objective runs here: logits KD (live teacher or teacher cache, optional entropy
weighting), hidden-state and attention transfer through the aux modules, QAT's reduced-precision
and fake-quant phases, and top-k gradient compression of the DDP all-reduce.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode

from ..checkpoint import CheckpointInfo
from ..errors import TrainerError
from ..losses import hard_label_ce
from ..objective import LogitsSettings, logits_objective, trained_rows
from ..sequence_objective import completion_ce
from ..stages import Phase
from ..targets import TeacherTargets, TeacherTargetSource, row_head_parts
from .base import Batch, CheckpointState


def logits_settings(spec: DistillationJobSpec) -> LogitsSettings:
    weighting = spec.data.uncertainty_weighting
    return LogitsSettings(
        divergence=spec.distillation.loss,
        alpha=spec.distillation.alpha,
        entropy_beta=weighting.beta if weighting.enabled else None,
    )


@dataclass
class _StudentOutputs:
    out: Any  # the model's output (hidden_states; logits unless the row head ran)
    rows: torch.Tensor | None  # causal-lm logits at the trained rows, from the row head
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class SingleProcessFlow:
    def __init__(
        self,
        spec: DistillationJobSpec,
        student: nn.Module,
        aux: nn.ModuleDict,
        pairs: list[tuple[int, int]],
        targets: TeacherTargetSource,
        parallel: Any,  # ParallelRuntime
        *,
        device: torch.device,
        is_writer: bool,
    ) -> None:
        self.device = device
        self.task = spec.task
        self.settings = logits_settings(spec)
        self.student = student
        self.aux = aux
        self.pairs = pairs
        self.targets = targets
        self.parallel = parallel
        self.is_writer = is_writer
        # What runs the student forward: DDP over the data ranks (same parameter objects).
        self.forward_module = parallel.wrap_student(student)
        # Set by the loop when every micro-batch is packed (packed_step.py); None: padded batches.
        self.packed: Any = None
        # Set by the loop for a student with its own tokenizer (cross_tokenizer.CrossTokenizerKD).
        self.cross: Any = None

    # ---- the interface -------------------------------------------------------------------------
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]

    @property
    def foreach_optimizer(self) -> bool | None:
        return None

    def micro_step(self, batch: Batch, phase: Phase, temperature: float, accum: int) -> tuple[float, dict[str, float]]:
        loss, parts = self.micro_loss(batch, phase, temperature)
        (loss / accum).backward()
        return float(loss.detach()), parts

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def save(self, step: int, phase: Phase, temperature: float, state: CheckpointState) -> Path | None:
        extra = None
        if self.parallel.compression is not None:
            # Every rank's error-feedback residuals, gathered to rank 0: a resume continues with the
            # unsent gradient mass instead of dropping it (collective, so before the writer check).
            from ..parallel.compression import gather_residuals

            gathered = gather_residuals(self.parallel.compression, self._compressed_params())
            extra = {"compression.safetensors": gathered} if gathered is not None else None
        if not self.is_writer:
            return None
        return state.write(
            step=step, phase=phase, temperature=temperature, model=self.student, optimizer=state.optimizer, extra=extra
        )

    def restore(self, info: CheckpointInfo, state: CheckpointState) -> None:
        if info.sharded:
            self._restore_sharded(info, state)
            return
        state.manager.restore(
            info, model=self.student, aux=state.aux, optimizer=state.optimizer, scheduler=state.scheduler
        )
        if self.parallel.compression is not None:
            from ..parallel.compression import restore_residuals

            restore_residuals(
                self.parallel.compression,
                self._compressed_params(),
                state.manager.load_extra(info, "compression.safetensors"),
            )

    def _restore_sharded(self, info: CheckpointInfo, state: CheckpointState) -> None:
        """A checkpoint a split student's ranks wrote (``parallel/sharded_checkpoint.py``): every
        process reads the whole student out of their shards."""
        from ..parallel import sharded_checkpoint

        held = sharded_checkpoint.whole_held(self.student)
        expected = {h.key[len(sharded_checkpoint.STUDENT) :] for h in held}
        try:
            sharded_checkpoint.restore(info.path, state, held, expected, guard=self.parallel.guard)
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise TrainerError(
                ExitCode.CHECKPOINT_INCOMPATIBLE, f"checkpoint {info.path} does not fit this student: {exc}"
            ) from None
        if self.parallel.compression is not None:
            sharded_checkpoint.restore_residuals(info.path, self.parallel.compression, self._compressed_params())

    def finish(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to gather: every process holds the whole student."""

    def final_student(self) -> nn.Module:
        return self.student

    # ---- QAT -----------------------------------------------------------------------------------
    def enter_fake_quant(self) -> None:
        """Swap the student's Linear layers for fake-quantized ones, in place."""
        from ..quantization import prepare_qat

        prepare_qat(self.student)
        # DDP holds the old Linear parameters: wrap the fake-quant student again.
        self.forward_module = self.parallel.wrap_student(self.student)

    # ---- one micro-batch -----------------------------------------------------------------------
    def _compressed_params(self) -> list[nn.Parameter]:
        """The parameters the top-k hook sees (DDP's: the student's trainable ones), in order."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def _autocast(self, phase: Phase) -> contextlib.AbstractContextManager[Any]:
        if phase.kind != "qat-reduced":
            return contextlib.nullcontext()
        from ..quantization import reduced_precision_autocast

        return reduced_precision_autocast(self.device)

    def micro_loss(self, batch: Batch, phase: Phase, temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The stage's loss on one micro-batch (its objectives weigh equally) and its parts."""
        if self.packed is not None and "pack_index" in batch:
            return self.packed.micro_loss(batch, temperature)
        objectives = set(phase.objectives)
        if "sequence" in objectives:  # CE on teacher-written completions: no teacher in the step
            return completion_ce(
                self.forward_module(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
            )
        if self.cross is not None and "logits" in objectives:  # the only objective it allows
            return self._cross_tokenizer_loss(batch, phase, temperature)
        targets = self.targets.for_batch(batch, objectives, self._autocast(phase))
        student = self._student_forward(batch, objectives, self._autocast(phase))
        losses: dict[str, torch.Tensor] = {}
        parts: dict[str, float] = {}
        if "logits" in objectives:
            losses["logits"], parts = self._logits_loss(batch, student, targets, temperature)
        mask = batch["attention_mask"]
        if "hidden" in objectives:
            assert targets.hidden is not None
            losses["hidden"] = self.aux["hidden"](student.out.hidden_states, targets.hidden, mask)
        if "attention" in objectives:
            assert targets.qkv is not None
            s_qkv = [student.qkv[s] for s, _ in self.pairs]
            t_qkv = [targets.qkv[t] for _, t in self.pairs]
            losses["attention"] = self.aux[f"attention_r{phase.attention_rank}"](s_qkv, t_qkv, mask)
        for name, value in losses.items():
            parts[name] = float(value.detach())
        loss = torch.stack(list(losses.values())).mean()
        return loss, parts

    def _student_forward(self, batch: Batch, objectives: set[str], autocast: Any) -> _StudentOutputs:
        from ..qkv_capture import QKVCapture

        need_qkv = "attention" in objectives
        s_layers = [s for s, _ in self.pairs] if need_qkv else []
        capture = QKVCapture(self.student, s_layers) if need_qkv else contextlib.nullcontext()
        # The row-only head needs the plain module: DDP must see its own forward to sync gradients.
        parts = (
            row_head_parts(self.student)
            if self.task == "causal-lm" and self.forward_module is self.student and "logits" in objectives
            else None
        )
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "output_hidden_states": "hidden" in objectives,
        }
        rows = None
        with autocast, capture as cap:
            if parts is not None:
                backbone, head = parts
                out = backbone(**inputs)
                rows = head(out.last_hidden_state[:, :-1][trained_rows(batch["labels"])])
            else:
                out = self.forward_module(**inputs)
        return _StudentOutputs(out, rows, cap.qkv if cap is not None else {})

    def _logits_loss(
        self, batch: Batch, student: _StudentOutputs, targets: TeacherTargets, temperature: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        if student.rows is not None:
            rows = student.rows.float()
        elif self.task == "causal-lm":
            rows = student.out.logits.float()[:, :-1][trained_rows(labels)]
        else:
            rows = student.out.logits.float()
        return logits_objective(rows, labels, targets, task=self.task, temperature=temperature, settings=self.settings)

    def _cross_tokenizer_loss(
        self, batch: Batch, phase: Phase, temperature: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``alpha * KD + (1 - alpha) * CE`` for a student with its own tokenizer: KD (uld or
        byte-span) at the positions aligned by bytes, CE on the student's own tokens."""
        labels = batch["labels"]
        rows, s_pos, t_pos = batch["align_row"], batch["align_student"], batch["align_teacher"]
        with self._autocast(phase):
            logits = self.forward_module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits.float()
        teacher_rows = self._teacher_rows(batch, rows, t_pos, phase)
        kd = self.cross(logits[rows, s_pos], teacher_rows, temperature)
        valid = trained_rows(labels)
        ce = hard_label_ce(logits[:, :-1][valid], labels[:, 1:][valid])
        # No aligned position in this micro-batch: the KD term is 0 (still attached to the graph).
        kd_mean = kd.sum() / max(int(kd.numel()), 1)
        alpha = self.settings.alpha
        loss = alpha * kd_mean + (1.0 - alpha) * ce.mean()
        return loss, {"kd": float(kd_mean.detach()), "ce": float(ce.detach().mean()), "logits": float(loss.detach())}

    def _teacher_rows(self, batch: Batch, rows: torch.Tensor, positions: torch.Tensor, phase: Phase) -> torch.Tensor:
        """The teacher's logits at the aligned positions of its own tokens, in inference mode
        (through the output head on those rows only where the architecture allows it)."""
        teacher = self.targets.teacher
        ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
        parts = row_head_parts(teacher)
        with torch.inference_mode(), self._autocast(phase):
            if parts is not None:
                backbone, head = parts
                hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
                out = head(hidden[rows, positions])
            else:
                out = teacher(input_ids=ids, attention_mask=mask).logits[rows, positions]
        # Inference tensors cannot enter autograd graphs.
        return out.float().clone()
