"""The training loop: stages in order, each with its objectives, then the QAT phase.

One ``Trainer`` owns a run: it loads the models and data, builds the aux modules (hidden-state
projections, attention-transfer factors) for every stage up front so the optimizer's parameter
set never changes between stages, resumes from the newest verified checkpoint, and runs optimizer
steps with gradient accumulation. How a micro-batch runs and how the student is saved depends on
the flow (``flows/single.py``: one whole student per process, under DDP with several data ranks;
``flows/model_parallel.py``: a student split by tensor/pipeline parallelism); the teacher's side
of a micro-batch is ``targets.py``, the logits objective ``objective.py``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill.api import DistillationJob
from kdistill.api.failures import ExitCode

from .aux_modules import build_aux
from .batching import collate
from .checkpoint import CheckpointInfo, CheckpointManager
from .errors import TrainerError
from .evaluate import EvalResult, evaluate
from .fence import Fence
from .flows import CheckpointState, TrainingFlow
from .flows.model_parallel import ModelParallelFlow
from .flows.single import SingleProcessFlow
from .fused_ops import fuse_activations
from .metrics import TrainerMetrics
from .models import load_models
from .on_policy import OnPolicyBatches, has_on_policy_stage
from .on_policy_cross import TokenBridge
from .optim import build_optimizer, first_moment, freeze_variance_step, in_group_order, update_scale
from .options import RunOptions, StepReport
from .remote_targets import RemoteTargetSource, check_remote_layout, peek_next, teacher_url
from .schedules import temperature_at
from .sequence_stage import SequenceBatches, has_sequence_stage, model_context
from .stages import Phase, build_plan, phase_at, total_steps
from .stages import temperature as plan_temperature
from .targets import CacheStore, TeacherTargetSource
from .teacher_service import TeacherService
from .training_data import load_training_data

log = logging.getLogger(__name__)

__all__ = ["RunOptions", "StepReport", "Trainer"]

EVAL_BATCH_SIZE = 32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _SigtermFlag:
    """SIGTERM sets a flag the loop checks between steps: the step finishes, a checkpoint is
    written, and the run exits with ExitCode.PREEMPTED."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _SigtermFlag:
        with contextlib.suppress(ValueError):  # not the main thread: the caller handles signals
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    def __init__(self, job: DistillationJob, opts: RunOptions) -> None:
        self.job = job
        self.spec = job.spec
        self.opts = opts
        self.device = opts.device
        self.task = self.spec.task
        self.metrics = TrainerMetrics()
        # The gang attempt's fence: raised before anything is read, so that an older attempt's later
        # saves and outputs are refused (fence.py).
        self.fence = Fence.from_env(opts.output.checkpoints)
        self.fence.raise_to_mine()
        self.ckpt = CheckpointManager(opts.output.checkpoints, self.spec.checkpoint.keep, self.fence)
        self.qat_prepared = False
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.resumed_from: int | None = None
        self.last_checkpoint: tuple[int, float] | None = None
        self._full_teacher: nn.Module | None = None
        self._served: TeacherService | None = None  # the served teacher's client, opened once
        self._setup()

    def event(self, name: str, **fields: Any) -> None:
        """Log a run event and hand it to the caller's ``on_event``."""
        log.info("%s %s", name, fields)
        if self.opts.on_event is not None:
            self.opts.on_event(name, fields)

    # ---- setup ---------------------------------------------------------------------------------
    def _setup(self) -> None:
        spec = self.spec
        seed_everything(spec.distillation.seed)
        # Joins the process group first (a rank that cannot reach its peers fails fast), and
        # checks the spec's parallelism before any model is loaded.
        from .parallel.runtime import ParallelRuntime

        self.parallel = ParallelRuntime.create(spec, self.device)
        # A served teacher (remote_targets.py): no teacher weights in this process.
        self.teacher_url = teacher_url(spec)
        check_remote_layout(self.teacher_url, self.parallel)
        self._place_models()
        # Splits the student in place (and fills a meta-device one with this rank's slices).
        split_flow = self._split_flow() if self.parallel.model_parallel else None
        self._load_data()
        self.plan = build_plan(spec, self._qat_split() if spec.quantization.mode == "qat-int8" else None)
        self.total = total_steps(self.plan)
        self.flow: TrainingFlow = self._build_flow(split_flow)
        self.optimizer, self.scheduler = self._build_optimizer()
        self._train_collate = self._packed_collate() or self._cross_tokenizer_collate()
        self.sequence = self._sequence_batches() if has_sequence_stage(self.plan) else None
        self.on_policy = self._on_policy_batches() if has_on_policy_stage(self.plan) else None

    def _place_models(self) -> None:
        """The teacher (this rank's stages of it) and the student on the device, and the tokenizers."""
        # A split student with weights on disk stays on the meta device until each rank has cut
        # its piece and read only that (parallel/meta_load.py).
        models = load_models(
            self.spec,
            self.opts.base_dir,
            remote=self.teacher_url is not None,
            meta_student=self.parallel.model_parallel,
        )
        # Fused kernels for Python-composed activations (same function, rounding-level
        # differences; nothing saved changes): see fused_ops.
        for model in (models.teacher, models.student):
            if model is not None:
                fuse_activations(model)
        self.models = models
        self.teacher = (
            self.parallel.prepare_teacher(models.teacher).to(self.device) if models.teacher is not None else None
        )
        self.student = models.student if models.student_source is not None else models.student.to(self.device)
        self.tokenizer = models.tokenizer  # the teacher's
        # The student's tokenizer: the teacher's, unless the student brought its own.
        self.student_tokenizer = models.student_tokenizer or models.tokenizer
        self.pad_id = int(self.student_tokenizer.pad_token_id)

    def _split_flow(self) -> ModelParallelFlow:
        return ModelParallelFlow(
            self.spec,
            self.student,
            self.teacher,
            self.parallel,
            pad_id=self.pad_id,
            device=self.device,
            is_writer=self.opts.is_writer,
            source=self.models.student_source,
            student_dir=self.opts.output.student,
        )

    def _build_flow(self, split_flow: ModelParallelFlow | None) -> TrainingFlow:
        """The aux modules (projections) of the plan's objectives, the teacher cache, and the flow
        that trains with them: the split one, or the single-process one."""
        spec = self.spec
        self.aux, self.pairs = build_aux(
            spec,
            self.plan,
            self.student,
            self.teacher,
            self.parallel,
            self.pad_id,
            self.device,
            student_qkv_dims=split_flow.student_qkv_dims if split_flow is not None else None,
        )
        # A served teacher shares the student's vocabulary (checked at start): its size sizes the cache.
        vocab_model = self.teacher if self.teacher is not None else self.student
        self.cache = CacheStore.from_spec(spec, vocab_model, self.opts.output.teacher_cache)
        if split_flow is not None:
            split_flow.use_aux(self.aux, self.pairs)
            split_flow.cache = self.cache
            return split_flow
        return SingleProcessFlow(
            spec,
            self.student,
            self.aux,
            self.pairs,
            self._target_source(),
            self.parallel,
            device=self.device,
            is_writer=self.opts.is_writer,
        )

    def _packed_collate(self) -> Any:
        """Packed training batches through the fused head and loss where the job allows it
        (packed_step.py); None keeps padded batches."""
        if self.teacher is None:  # a served teacher: no teacher head for the packed rows
            return None
        from .packed_step import PackedLogitsStep, packed_step_applies

        flow = self.flow
        if not isinstance(flow, SingleProcessFlow) or self.models.cross_tokenizer:
            return None
        if not packed_step_applies(self.spec, self.plan, self.parallel, self.student, self.teacher):
            return None
        from functools import partial

        from .packing import pack_or_pad

        flow.packed = PackedLogitsStep(self.spec, self.student, self.teacher, self.cache)
        return partial(pack_or_pad, max_len=self.spec.data.max_seq_length)

    def _sequence_batches(self) -> SequenceBatches:
        """The sequence stages' data: the teacher's completions, generated in ``train()``."""
        return SequenceBatches(
            self.spec,
            self.plan,
            self.student_tokenizer,
            self.pad_id,
            output=self.opts.output.generated,
            base_dir=self.opts.base_dir,
            rank=self.opts.rank,
            world=self.opts.world,
            data_rank=self.parallel.data_rank,
            teacher=self._teacher_service,
            teacher_context=(self.tokenizer, context) if (context := model_context(self.teacher)) else None,
        )

    def _on_policy_batches(self) -> OnPolicyBatches:
        """The on-policy stages: the student samples, the teacher scores its tokens."""
        assert isinstance(self.flow, SingleProcessFlow)  # the API refuses on-policy with a split student
        return OnPolicyBatches(
            self.spec,
            self.plan,
            student=self.student,
            forward=self.flow.forward_module,
            tokenizer=self.student_tokenizer,
            pad_id=self.pad_id,
            device=self.device,
            base_dir=self.opts.base_dir,
            data_rank=self.parallel.data_rank,
            teacher=self._teacher_service,
            bridge=self._token_bridge() if self.models.cross_tokenizer else None,
        )

    def _token_bridge(self) -> TokenBridge:
        """A student with its own tokenizer: on-policy sends the teacher text (on_policy_cross.py)."""
        vocab = int(self.student.get_output_embeddings().weight.shape[0])
        bridge = TokenBridge(self.student_tokenizer, self.tokenizer, vocab)
        self.event("on-policy-tokenizers", sharedTokens=bridge.shared_tokens)
        return bridge

    def _teacher_service(self) -> TeacherService:
        """The teacher behind the text interface: the served one (one client for the run, checked
        against the trainer's tokens when it is opened), or the in-process one as LocalTeacher."""
        if self.teacher_url is not None:
            if self._served is None:
                from .remote_targets import check_served_tokens, open_teacher

                self._served = open_teacher(self.teacher_url, self.spec)
                # On-policy reads the teacher's scores by token id too (teacher ids mapped through
                # this tokenizer when the student has its own, on_policy_cross.py).
                needs_same = any({"logits", "on-policy"} & set(p.objectives) for p in self.plan)
                self.teacher_same_tokens = check_served_tokens(
                    self._served, self.tokenizer, self.teacher_url, needs_same
                )
                self.event("served-teacher", url=self.teacher_url, sameTokens=self.teacher_same_tokens)
            return self._served
        from .local_teacher import LocalTeacher

        assert self.teacher is not None
        return LocalTeacher(self.teacher, self.tokenizer)

    def _target_source(self) -> Any:
        """The teacher's targets per micro-batch: from the served teacher, or from the one here."""
        if self.teacher_url is None:
            return TeacherTargetSource(self.teacher, self.parallel, self.task, self.pairs, self.cache)
        from .remote_targets import remote_top_k

        vocab = int(self.student.config.vocab_size)
        return RemoteTargetSource(self._teacher_service(), remote_top_k(self.spec, vocab), vocab, self.cache)

    def _prefetch_next(self, collate: Any) -> None:
        """With a served teacher, ask for the next micro-batch's scores now, so that the teacher
        computes them while the student steps on this one."""
        source = getattr(self.flow, "targets", None)
        if isinstance(source, RemoteTargetSource):
            positions = peek_next(self.sampler)
            source.prefetch(collate([self.train_examples[p] for p in positions], self.pad_id, self.task))

    def _cross_tokenizer_collate(self) -> Any:
        """Logits KD for a student with its own tokenizer: each batch also carries the teacher's
        tokens and the aligned positions (cross_tokenizer.py); None when it does not apply."""
        setting = self.spec.distillation.cross_tokenizer
        if not self.models.cross_tokenizer or setting is None or self.train_cross is None:
            return None
        if not any("logits" in p.objectives for p in self.plan):
            return None
        from functools import partial

        from .cross_tokenizer import CrossTokenizerKD, VocabularyProjection, collate_with_teacher

        assert isinstance(self.flow, SingleProcessFlow)  # models.check_cross_tokenizer refuses a split student
        # models.cross_tokenizer_problems refuses crossTokenizer logits with a served teacher.
        assert self.teacher is not None
        projection = None
        if setting.method == "byte-span":
            projection = VocabularyProjection.from_tokenizers(
                self.student_tokenizer,
                self.tokenizer,
                int(self.student.get_output_embeddings().weight.shape[0]),
                int(self.teacher.get_output_embeddings().weight.shape[0]),
            ).to(self.device)
            self.event(
                "cross-tokenizer", method=setting.method, exactTokens=projection.exact, droppedTokens=projection.dropped
            )
        else:
            self.event("cross-tokenizer", method=setting.method)
        self.flow.cross = CrossTokenizerKD(setting.method, self.spec.distillation.loss, projection)
        return partial(collate_with_teacher, cross=self.train_cross, teacher_pad=self.teacher_pad)

    @staticmethod
    def _qat_split() -> Any:
        from .quantization import qat_phase_split

        return qat_phase_split

    def _load_data(self) -> None:
        cross = self.models.cross_tokenizer
        data = load_training_data(
            self.spec,
            self.teacher,
            self.student_tokenizer,
            self.opts.base_dir,
            self.parallel.data_rank,
            teacher_tokenizer=self.tokenizer if cross else None,
        )
        self.eval_bytes = data.eval_bytes
        # A student with its own tokenizer: the teacher's side of training and eval examples.
        self.train_cross = data.cross
        self.teacher_eval_examples = data.teacher_eval if cross else data.eval
        self.teacher_eval_bytes = data.teacher_eval_bytes if cross else data.eval_bytes
        self.teacher_pad = int(self.tokenizer.pad_token_id)
        self.label_map = data.label_map
        self.train_examples = data.train
        self.eval_examples = data.eval
        self.micro_batch = data.micro_batch
        self.sampler = data.sampler
        self._sampler_iter: Iterator[list[int]] = iter(self.sampler)
        # Builds a padded batch from examples; a benchmark may wrap it to count positions.
        self._collate = collate

    def _named_trainables(self) -> list[tuple[str, nn.Parameter]]:
        named = [(f"student.{n}", p) for n, p in self.flow.named_parameters()]
        named += [(f"aux.{n}", p) for n, p in self.aux.named_parameters() if p.requires_grad]
        return named

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        optimizer, scheduler = build_optimizer(
            self._named_trainables(),
            self.spec.distillation,
            self.total,
            foreach=self.flow.foreach_optimizer,
            freeze_variance_at=self._freeze_variance_at(),
            grad_is_momentum=self._grad_is_momentum(),
        )
        hook = self.parallel.compression
        if hook is not None and self.spec.parallelism.gradient_compression.selection == "update":
            # Top-k ranks entries by the step AdamW would take for them (optim.update_scale).
            hook.selection_scale = update_scale(optimizer)
        if hook is not None and hook.momentum > 0:
            # Each rank's momentum continues AdamW's first moment of the dense warm-up.
            hook.momentum_source = first_moment(optimizer)
        return optimizer, scheduler

    def _grad_is_momentum(self) -> Callable[[torch.Tensor], bool] | None:
        """Under momentum compression: whether a parameter's reduced gradient of the step just
        run is the mean of the ranks' sent momenta (the hook compressed it as a momentum)."""
        hook = self.parallel.compression
        if hook is None or hook.momentum == 0:
            return None
        return lambda p: hook.last_compressed and id(p) in hook.momenta

    def _freeze_variance_at(self) -> int | None:
        """With top-k compression (and freezeVariance), the optimizer step from which the hook
        compresses: AdamW's second moment is frozen there (optim.FrozenVarianceAdamW)."""
        hook = self.parallel.compression
        if hook is None or not self.spec.parallelism.gradient_compression.freeze_variance:
            return None
        return freeze_variance_step(hook.warmup_steps, self.spec.distillation.gradient_accumulation_steps)

    def _checkpoint_state(self) -> CheckpointState:
        return CheckpointState(
            manager=self.ckpt,
            aux=self.aux,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            sampler=self.sampler,
            meta={"tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds},
        )

    # ---- QAT -----------------------------------------------------------------------------------
    def _enter_fake_quant(self) -> None:
        """Swap the student's Linear layers for fake-quantized ones, keeping optimizer state."""
        from .quantization import remap_optimizer_state

        before = dict(self._named_trainables())
        self.flow.enter_fake_quant()
        self.qat_prepared = True
        after = dict(self._named_trainables())
        if set(before) == set(after) and all(before[n] is after[n] for n in before):
            return
        # The wrappers hold new Parameter objects: rebuild the optimizer and move the state by name.
        old_optimizer, old_schedule = self.optimizer, self.scheduler.state_dict()
        self.optimizer, self.scheduler = self._build_optimizer()
        remap_optimizer_state(
            old_optimizer,
            [n for n, _ in in_group_order(list(before.items()))],
            self.optimizer,
            [n for n, _ in in_group_order(list(after.items()))],
        )
        self.scheduler.load_state_dict(old_schedule)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _resume(self) -> int:
        env = self.parallel.env
        info: CheckpointInfo | None = self.ckpt.latest((env.rank, env.world_size), self.parallel)
        if info is None:
            return 0
        if info.step > self.total:
            raise TrainerError(
                ExitCode.CHECKPOINT_INCOMPATIBLE,
                f"checkpoint {info.path} is at step {info.step} but the plan has {self.total}",
            )
        # A checkpoint taken after the fake-quant phase began holds the wrapped model's state.
        if any(p.kind == "qat-fake-quant" and p.start < info.step for p in self.plan):
            self._enter_fake_quant()
        self.flow.restore(info, self._checkpoint_state())
        self.sampler.load_state_dict(info.sampler)
        self._sampler_iter = iter(self.sampler)
        self.tokens_seen = int(info.meta.get("tokens_seen", 0))
        self.train_seconds = float(info.meta.get("train_seconds", 0.0))
        self.resumed_from = info.step
        self.last_checkpoint = (info.step, info.path.stat().st_mtime)
        self.event("resumed", step=info.step, checkpoint=str(info.path))
        return info.step

    def _save_checkpoint(self, step: int, phase: Phase, temperature: float) -> str | None:
        started = time.perf_counter()
        path = self.flow.save(step, phase, temperature, self._checkpoint_state())
        if path is None:
            return None
        seconds = time.perf_counter() - started
        self.metrics.checkpoint_seconds.observe(seconds)
        self.last_checkpoint = (step, time.time())
        self.event("checkpoint", step=step, path=str(path), seconds=round(seconds, 3))
        return str(path)

    # ---- the loop ------------------------------------------------------------------------------
    def _next_batch(self, phase: Phase) -> dict[str, torch.Tensor]:
        if self.sequence is not None and "sequence" in phase.objectives:
            return {k: v.to(self.device) for k, v in self.sequence.next_batch().items()}
        positions = next(self._sampler_iter)
        collate = self._train_collate or self._collate
        batch = collate([self.train_examples[p] for p in positions], self.pad_id, self.task)
        self._prefetch_next(collate)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _accumulate(self, step: int, phase: Phase, temperature: float) -> tuple[float, dict[str, float], int]:
        """Forward and backward of the step's micro-batches: mean loss, mean parts, tokens."""
        accum = self.spec.distillation.gradient_accumulation_steps
        tokens = 0
        parts_sum: dict[str, float] = {}
        loss_sum = 0.0
        if self.on_policy is not None and "on-policy" in phase.objectives:
            loss_sum, parts_sum, tokens = self.on_policy.accumulate(accum)
        else:
            for _ in range(accum):
                batch = self._next_batch(phase)
                loss_value, parts = self.flow.micro_step(batch, phase, temperature, accum)
                tokens += int(batch["attention_mask"].sum())
                loss_sum += loss_value / accum
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / accum
        if not math.isfinite(loss_sum):
            raise TrainerError(ExitCode.INTERNAL, f"loss is {loss_sum} at step {step + 1} ({phase.name})")
        parts_sum["total"] = loss_sum
        return loss_sum, parts_sum, tokens

    def _step(self, step: int, phase: Phase, params: list[nn.Parameter]) -> StepReport:
        """One optimizer step; returns its report (without the checkpoint, which comes after)."""
        temperature = plan_temperature(self.spec, self.plan, step, temperature_at)
        started = time.perf_counter()
        loss, parts, tokens = self._accumulate(step, phase, temperature)
        # DDP reduced the student's gradients; the aux modules are reduced here.
        self.parallel.average_grads(list(self.aux.parameters()))
        max_norm = self.spec.distillation.max_grad_norm
        hook = self.parallel.compression
        # A top-k step's reduced gradient is sparse, with entries carrying many steps of residual:
        # its norm says nothing about this step's size. The hook clipped each rank's local
        # gradient before compressing it instead (DGC's local clipping).
        if max_norm > 0 and not (hook is not None and hook.last_compressed):
            self.flow.clip_grad_norm(params, max_norm)
        lr_before = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        if hook is not None and self.spec.parallelism.gradient_compression.freeze_variance:
            # What a residual owes is lr * mass: keep it whole across the schedule's change.
            hook.follow_learning_rate(lr_before, float(self.scheduler.get_last_lr()[0]))
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        self.tokens_seen += tokens
        lr = float(self.optimizer.param_groups[0]["lr"])
        tps = tokens / seconds if seconds > 0 else 0.0
        self.metrics.record_step(
            step=step + 1,
            parts=parts,
            temperature=temperature,
            tokens_per_second=tps,
            step_seconds=seconds,
            learning_rate=lr,
        )
        return StepReport(step + 1, self.total, phase.name, loss, parts, temperature, lr, tps, seconds)

    def _announce_plan(self, start: int) -> None:
        """The stages ahead, before the first step: progress views draw one bar per stage."""
        stages = [{"name": p.name, "kind": p.kind, "start": p.start, "steps": p.steps} for p in self.plan]
        self.event("plan", totalSteps=self.total, startStep=start, stages=stages)

    def train(self) -> None:
        start = self._resume()
        if self.sequence is not None:  # the teacher writes its completions before any step
            self.event("generated", **self.sequence.ready(start))
        if self.on_policy is not None:
            self.event("on-policy-ready", **self.on_policy.ready(start))
        self._announce_plan(start)
        self.student.train()
        every = self.spec.checkpoint.every_steps
        params = [p for _, p in self._named_trainables()]
        with _SigtermFlag() as sigterm:
            for step in range(start, self.total):
                self.parallel.seed_step(self.spec.distillation.seed, step)
                phase = phase_at(self.plan, step)
                if phase.kind == "qat-fake-quant" and not self.qat_prepared:
                    self._enter_fake_quant()
                    params = [p for _, p in self._named_trainables()]
                    self.event("qat-fake-quant", step=step)
                report = self._step(step, phase, params)
                # Collective: saves are collective, so every rank must stop at the same step.
                stopping = self.parallel.agree_stop(sigterm.raised)
                if report.step % every == 0 or stopping:
                    report.checkpoint = self._save_checkpoint(report.step, phase, report.temperature)
                if self.opts.on_step is not None:
                    self.opts.on_step(report)
                if stopping and report.step < self.total:
                    why = "SIGTERM" if sigterm.raised else "a peer rank's stop"
                    raise TrainerError(
                        ExitCode.PREEMPTED,
                        f"stopped at step {report.step} of {self.total} after {why}; checkpoint written",
                    )
        self.flow.finish(self.optimizer)

    def close(self) -> None:
        """Release the served teacher's client (its connections and threads); the run is over."""
        if self._served is not None:
            self._served.close()

    # ---- after training ------------------------------------------------------------------------
    def eval_batches(self, teacher: bool = False) -> list[dict[str, torch.Tensor]]:
        """Eval batches in the student's tokens, or the teacher's (``teacher``); causal-lm
        batches carry ``scored_bytes`` for bits per byte."""
        if teacher:
            chosen, scored, pad = self.teacher_eval_examples, self.teacher_eval_bytes, self.teacher_pad
        else:
            chosen, scored, pad = self.eval_examples, self.eval_bytes, self.pad_id
        examples = sorted(chosen, key=lambda e: len(e.input_ids))
        batches = []
        for i in range(0, len(examples), EVAL_BATCH_SIZE):
            part = examples[i : i + EVAL_BATCH_SIZE]
            batch = self._collate(part, pad, self.task)
            if scored and all(e.index in scored for e in part):
                batch["scored_bytes"] = torch.tensor([scored[e.index] for e in part], dtype=torch.long)
            batches.append(batch)
        return batches

    def teacher_for_eval(self) -> nn.Module:
        """The whole teacher: a split teacher holds one stage here, so rank 0 reloads it."""
        if not self.parallel.split_teacher:
            return self.teacher
        if self._full_teacher is None:
            teacher = load_models(self.spec, self.opts.base_dir).teacher
            assert teacher is not None  # a split teacher is a local one
            self._full_teacher = teacher.to(self.device)
        return self._full_teacher

    def evaluate_model(self, model: nn.Module, device: torch.device | None = None) -> EvalResult | None:
        """A student (float or INT8) on the eval set in the student's tokens."""
        if not self.eval_examples:
            return None
        return self._comparable(evaluate(model, self.eval_batches(), self.task, device or self.device))

    def evaluate_teacher(self) -> EvalResult | None:
        """The teacher on the eval set in its own tokens; a served teacher scores them over HTTP."""
        if not self.teacher_eval_examples:
            return None
        if self.teacher_url is not None:
            from .remote_targets import evaluate_remote

            return self._comparable(evaluate_remote(self._teacher_service(), self.eval_batches(teacher=True)))
        result = evaluate(self.teacher_for_eval(), self.eval_batches(teacher=True), self.task, self.device)
        return self._comparable(result)

    def _comparable(self, result: EvalResult) -> EvalResult:
        """Perplexities of different tokenizers do not compare: such runs are scored in bits per byte."""
        return result.by_bits_per_byte() if self.models.cross_tokenizer else result

    def save_student(self, out_dir: Path) -> Path:
        """The full-precision student at ``out_dir`` with the student's tokenizer: the split
        flow's streamed folder published there, or the whole student written by save_pretrained."""
        from .outputs import publish_student, save_student

        streamed = getattr(self.flow, "streamed", None)
        if streamed is not None:
            return publish_student(streamed, self.student_tokenizer, out_dir)
        return save_student(self.full_precision_student(), self.student_tokenizer, out_dir)

    def full_precision_student(self) -> nn.Module:
        """The trained student with any fake-quant wrappers removed (float weights)."""
        student = self.flow.final_student()
        # The split flow's final student is read back from its folder: plain float layers already.
        if not self.qat_prepared or getattr(self.flow, "streamed", None) is not None:
            return student
        from .quantization import strip_fake_quant

        return strip_fake_quant(copy.deepcopy(student))

    def quantized_student(self) -> nn.Module | None:
        mode = self.spec.quantization.mode
        if mode == "none":
            return None
        from . import quantization

        # Converted in place, not copied: the float student is already written and scored, and a
        # copy would hold the whole student twice on the writer.
        model = self.flow.final_student().cpu().eval()
        if mode == "qat-int8":
            return quantization.convert_qat_to_int8(model)
        return quantization.quantize_ptq_int8(model)
