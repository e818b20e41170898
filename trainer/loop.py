"""The training loop: stages in order, each with its objectives, then the QAT phase.

One ``Trainer`` owns a run: it loads the models and data, builds the aux modules (hidden-state
projections, attention-transfer factors) for every stage up front so the optimizer's parameter
set never changes between stages, resumes from the newest verified checkpoint, and runs optimizer
steps with gradient accumulation. The math lives in losses/weighting/hidden_transfer/
attention_transfer, the data in data/sampling/batching/teacher_cache, quantization in
quantization/artifact; this module only wires them together.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill.api import DistillationJob
from kdistill.api.failures import ExitCode

from .checkpoint import CheckpointInfo, CheckpointManager
from .errors import TrainerError
from .evaluate import EvalResult, evaluate, retention
from .fused_ops import fuse_activations
from .metrics import TrainerMetrics
from .models import Models, load_models
from .outputs import OutputLayout
from .stages import Phase, build_plan, phase_at, total_steps
from .stages import temperature as plan_temperature

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 32
# KD losses see at most this many logits (rows x vocab) per chunk: 64 MiB of fp32. Below it the
# whole batch is one chunk and nothing is recomputed in the backward; above it (large
# vocabularies) rows are chunked and checkpointed.
LOSS_CHUNK_ELEMENTS = 1 << 24
# Causal LMs whose logits are exactly output_head(backbone(x)): for these the head runs only on
# the rows that are trained on (no padding, no last position), not on every position.
ROW_HEAD_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})


@dataclass
class StepReport:
    step: int  # optimizer steps done
    total_steps: int
    stage: str
    loss: float
    parts: dict[str, float]
    temperature: float
    learning_rate: float
    tokens_per_second: float
    step_seconds: float
    checkpoint: str | None = None


@dataclass
class RunOptions:
    output: OutputLayout
    base_dir: Path
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    on_step: Callable[[StepReport], None] | None = None
    on_event: Callable[[str, dict[str, Any]], None] | None = None
    # Stop (as if preempted) after this many steps; used by tests that interrupt a run.
    stop_after: int | None = None
    evaluate: bool = True

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


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


def bucket_logits(values: torch.Tensor, logsumexp: torch.Tensor | None) -> torch.Tensor:
    """Top-k logits plus one tail bucket holding the rest of the teacher's mass, as logits.

    Used for entropy weighting from cached teacher outputs: the entropy is then over k+1 buckets.
    """
    if logsumexp is None:
        return values
    top = torch.logsumexp(values, dim=-1)
    # log(exp(lse) - exp(top)) = lse + log1p(-exp(top - lse)), clamped where rounding left no tail.
    gap = (top - logsumexp).clamp(max=-1e-6)
    tail = logsumexp + torch.log1p(-torch.exp(gap))
    return torch.cat([values, tail.unsqueeze(-1)], dim=-1)


def row_head_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, output head) when logits at chosen rows may be computed as head(backbone(x)[rows])."""
    if getattr(model.config, "model_type", None) not in ROW_HEAD_MODEL_TYPES:
        return None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings()
    if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Module):
        return None
    return backbone, head


@dataclass
class _Targets:
    """Teacher outputs for one micro-batch, reduced to what the phase's objectives need."""

    logits: torch.Tensor | None = None  # [B,L,V] or [B,C]
    logit_rows: torch.Tensor | None = None  # causal-lm: [N,V] at the trained rows only
    top_values: torch.Tensor | None = None  # cache: [B,L,k] or [B,1,k]
    top_indices: torch.Tensor | None = None
    logsumexp: torch.Tensor | None = None
    hidden: tuple[torch.Tensor, ...] | None = None
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


class Trainer:
    def __init__(self, job: DistillationJob, opts: RunOptions) -> None:
        self.job = job
        self.spec = job.spec
        self.opts = opts
        self.device = opts.device
        self.task = self.spec.task
        self.metrics = TrainerMetrics()
        self.ckpt = CheckpointManager(opts.output.checkpoints, self.spec.checkpoint.keep)
        self.qat_prepared = False
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.resumed_from: int | None = None
        self.last_checkpoint: tuple[int, float] | None = None
        self._setup()

    # ---- setup ---------------------------------------------------------------------------------
    def _event(self, name: str, **fields: Any) -> None:
        log.info("%s %s", name, fields)
        if self.opts.on_event is not None:
            self.opts.on_event(name, fields)

    def _setup(self) -> None:
        spec = self.spec
        seed_everything(spec.distillation.seed)
        # Joins the process group first (a rank that cannot reach its peers fails fast), and
        # checks the spec's parallelism before any model is loaded.
        from .parallel.runtime import ParallelRuntime

        self.parallel = ParallelRuntime.create(spec, self.device)
        models: Models = load_models(spec, self.opts.base_dir)
        # Fused kernels for Python-composed activations (same function, rounding-level
        # differences; nothing saved changes): see fused_ops.
        for model in (models.teacher, models.student):
            fuse_activations(model)
        self.models = models
        self.teacher = self.parallel.prepare_teacher(models.teacher).to(self.device)
        self.student = models.student.to(self.device)
        self.mp: Any = None  # ParallelStudent when the student is tensor/pipeline parallel
        if self.parallel.model_parallel:
            self._split_student()
        self.tokenizer = models.tokenizer
        self.pad_id = int(self.tokenizer.pad_token_id)
        self._load_data()
        self.plan = build_plan(spec, self._qat_split() if spec.quantization.mode == "qat-int8" else None)
        self.total = total_steps(self.plan)
        self.aux = self._build_aux()
        self.optimizer, self.scheduler = self._build_optimizer()
        self.cache = self._build_cache()
        # What runs the student forward: DDP over the data ranks (same parameter objects).
        self.student_forward = self.mp.module if self.mp is not None else self.parallel.wrap_student(self.student)

    def _split_student(self) -> None:
        """Tensor/pipeline-parallel student: rank 0 keeps an unsplit copy to gather checkpoints
        into; every rank records the unsplit parameter layout, then splits its student in place."""
        from .parallel.student_state import FullLayout

        self.mp_full = FullLayout.of(self.student)
        self.mp_template = copy.deepcopy(self.student) if self.opts.is_writer else None
        self.mp = self.parallel.parallelize_student(self.student, self._mp_token_loss)
        self._mp_temperature = 1.0
        self._mp_parts: list[torch.Tensor] = []

    def _qat_split(self) -> Callable[[int, float], tuple[int, int]]:
        from .quantization import qat_phase_split

        return qat_phase_split

    def _load_data(self) -> None:
        from .batching import collate
        from .data import DataError, build_label_map, read_jsonl, tokenize_examples
        from .sampling import BatchSampler, assign_tiers
        from .sources import resolve_source

        spec, d = self.spec, self.spec.data
        base = self.opts.base_dir
        train_path = resolve_source(d.train, base)
        eval_path = resolve_source(d.eval, base) if d.eval else None
        label_field = d.label_field if self.task == "sequence-classification" else None
        label_map: dict[str, int] | None = None
        if label_field:
            label_map = self._teacher_label_map()
            if label_map is None:
                try:
                    label_map = build_label_map(*(p for p in (train_path, eval_path) if p), label_field=label_field)
                except DataError as exc:
                    raise TrainerError(ExitCode.BAD_DATA, str(exc)) from None
            n_labels = int(self.teacher.config.num_labels)
            if len(label_map) != n_labels:
                raise TrainerError(
                    ExitCode.BAD_SPEC,
                    f"the data has {len(label_map)} labels but the teacher classifies into {n_labels}",
                )
        self.label_map = label_map

        def read(path: Path) -> list[Any]:
            try:
                rows = read_jsonl(
                    path,
                    text_field=d.text_field,
                    label_field=label_field,
                    label_to_id=label_map,
                    max_bad_fraction=d.max_bad_fraction,
                )
            except DataError as exc:
                raise TrainerError(ExitCode.BAD_DATA, str(exc)) from None
            if not rows:
                raise TrainerError(ExitCode.BAD_DATA, f"{path}: no usable examples")
            return tokenize_examples(rows, self.tokenizer, d.max_seq_length)

        self.train_examples = read(train_path)
        self.eval_examples = read(eval_path) if eval_path else []
        s = d.sampling
        shares = (s.head, s.torso, s.tail)
        tiers = (
            assign_tiers(self.train_examples, self.task, shares=(s.head, s.torso))
            if s.strategy == "stratified"
            else None
        )
        dist = spec.distillation
        data_ranks = spec.parallelism.student.data
        self.micro_batch = dist.batch_size // (data_ranks * dist.gradient_accumulation_steps)
        self.sampler = BatchSampler(
            self.train_examples,
            dist.batch_size // dist.gradient_accumulation_steps,
            strategy=s.strategy,
            tiers=tiers,
            shares=shares,
            seed=dist.seed,
            bucket_by_length=True,
            rank=self.parallel.data_rank,
            world=data_ranks,
        )
        self._sampler_iter: Iterator[list[int]] = iter(self.sampler)
        self._collate = collate

    def _teacher_label_map(self) -> dict[str, int] | None:
        """The teacher's own label names, unless they are transformers' placeholders (LABEL_0...)."""
        id2label = getattr(self.teacher.config, "id2label", None) or {}
        names = {int(i): str(n) for i, n in id2label.items()}
        if not names or all(n == f"LABEL_{i}" for i, n in names.items()):
            return None
        return {n: i for i, n in names.items()}

    def _objectives(self) -> set[str]:
        return {o for p in self.plan for o in p.objectives}

    def _layer_pairs(self) -> list[tuple[int, int]]:
        from .hidden_transfer import resolve_layer_map

        explicit = [(p.student, p.teacher) for p in self.spec.distillation.layer_map] or None
        try:
            return resolve_layer_map(
                int(self.student.config.num_hidden_layers), int(self.teacher.config.num_hidden_layers), explicit
            )
        except ValueError as exc:
            raise TrainerError(ExitCode.BAD_SPEC, f"distillation.layerMap: {exc}") from None

    @torch.no_grad()
    def _probe_qkv_dims(self, model: nn.Module, layers: list[int]) -> tuple[int, int, int]:
        from .qkv_capture import QKVCapture

        was = model.training
        model.eval()
        ids = torch.full((1, 4), self.pad_id, dtype=torch.long, device=self.device)
        try:
            with QKVCapture(model, layers) as cap:
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
            q, k, v = cap.qkv[layers[0]]
        except ValueError as exc:
            raise TrainerError(ExitCode.BAD_SPEC, f"attention transfer: {exc}") from None
        finally:
            model.train(was)
        return int(q.shape[-1]), int(k.shape[-1]), int(v.shape[-1])

    def _build_aux(self) -> nn.ModuleDict:
        aux = nn.ModuleDict()
        objectives = self._objectives()
        if not objectives & {"hidden", "attention"}:
            self.pairs: list[tuple[int, int]] = []
            return aux
        self.pairs = self._layer_pairs()
        # Aux modules are initialised from their own seed so that adding one does not shift the
        # student's or the data's random streams.
        torch.manual_seed(self.spec.distillation.seed + 1)
        if "hidden" in objectives:
            from .hidden_transfer import HiddenStateTransfer

            aux["hidden"] = HiddenStateTransfer(
                int(self.student.config.hidden_size), int(self.teacher.config.hidden_size), self.pairs
            )
        if "attention" in objectives:
            from .attention_transfer import LowRankAttentionTransfer

            s_dims = self._probe_qkv_dims(self.student, [s for s, _ in self.pairs])
            # A split teacher holds one stage: it knows its q/k/v widths without the other blocks.
            t_dims = (
                self.parallel.teacher.qkv_dims
                if self.parallel.split_teacher
                else self._probe_qkv_dims(self.teacher, [t for _, t in self.pairs])
            )
            for rank in sorted({p.attention_rank for p in self.plan if "attention" in p.objectives}):
                aux[f"attention_r{rank}"] = LowRankAttentionTransfer(
                    s_dims, t_dims, rank, self.pairs, seed=self.spec.distillation.seed
                )
        torch.manual_seed(self.spec.distillation.seed)
        return aux.to(self.device)

    def _named_trainables(self) -> list[tuple[str, nn.Parameter]]:
        source = (
            self.mp.named_params.items() if getattr(self, "mp", None) is not None else self.student.named_parameters()
        )
        named = [(f"student.{n}", p) for n, p in source if p.requires_grad]
        named += [(f"aux.{n}", p) for n, p in self.aux.named_parameters() if p.requires_grad]
        return named

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        from .schedules import lr_multiplier

        d = self.spec.distillation
        named = self._named_trainables()
        # No weight decay on biases and norms (1-D parameters), as usual for transformers.
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": d.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=d.learning_rate,
            betas=(0.9, 0.999),
            eps=1e-8,
            # DTensor shards and plain tensors cannot share one foreach kernel call.
            foreach=False if getattr(self, "mp", None) is not None else None,
        )
        total, warmup = self.total, d.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, warmup, total))
        return opt, sched

    def _build_cache(self) -> Any:
        tc = self.spec.distillation.teacher_cache
        if not tc.enabled:
            return None
        from .teacher_cache import TeacherCache

        vocab = int(self.teacher.config.vocab_size) if self.task == "causal-lm" else int(self.teacher.config.num_labels)
        self.cache_k = min(tc.top_k, vocab)
        return TeacherCache(self.opts.output.teacher_cache, self.cache_k, vocab)

    # ---- QAT hooks -----------------------------------------------------------------------------
    def _enter_fake_quant(self) -> None:
        """Swap the student's Linear layers for fake-quantized ones, keeping optimizer state."""
        from .quantization import prepare_qat

        before = dict(self._named_trainables())
        prepare_qat(self.student)
        after = dict(self._named_trainables())
        self.qat_prepared = True
        # DDP holds the old Linear parameters: wrap the fake-quant student again.
        self.student_forward = self.parallel.wrap_student(self.student)
        if set(before) == set(after) and all(before[n] is after[n] for n in before):
            return
        # The wrappers hold new Parameter objects: rebuild the optimizer and move the state by name.
        old_state = self.optimizer.state_dict()
        old_sched = self.scheduler.state_dict()
        old_names = [n for n, _ in self._split_by_decay(before)]
        self.optimizer, self.scheduler = self._build_optimizer()
        new_names = [n for n, _ in self._split_by_decay(after)]
        index_of = {n: i for i, n in enumerate(old_names)}
        remapped = {"param_groups": self.optimizer.state_dict()["param_groups"], "state": {}}
        for new_i, name in enumerate(new_names):
            old_i = index_of.get(name)
            if old_i is not None and old_i in old_state["state"]:
                remapped["state"][new_i] = old_state["state"][old_i]
        for group, old_group in zip(remapped["param_groups"], old_state["param_groups"], strict=True):
            group["lr"] = old_group["lr"]
            group["initial_lr"] = old_group.get("initial_lr", group.get("initial_lr"))
        self.optimizer.load_state_dict(remapped)
        self.scheduler.load_state_dict(old_sched)

    @staticmethod
    def _split_by_decay(named: dict[str, nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
        items = list(named.items())
        return [(n, p) for n, p in items if p.ndim >= 2] + [(n, p) for n, p in items if p.ndim < 2]

    def _autocast(self, phase: Phase) -> contextlib.AbstractContextManager[Any]:
        if phase.kind != "qat-reduced":
            return contextlib.nullcontext()
        from .quantization import reduced_precision_autocast

        return reduced_precision_autocast(self.device)

    # ---- one micro-batch -----------------------------------------------------------------------
    def _teacher_targets(self, batch: dict[str, torch.Tensor], phase: Phase, autocast: Any) -> _Targets:
        objs = set(phase.objectives)
        need_hidden = "hidden" in objs
        need_attn = "attention" in objs
        need_logits = "logits" in objs
        out = _Targets()
        ids = batch["example_ids"].tolist()
        cached = None
        if need_logits and self.cache is not None:
            cached = self.cache.lookup(ids)
        need_forward = need_hidden or need_attn or (need_logits and cached is None)
        # A split teacher's forward is collective: its group runs it if any member needs it.
        need_forward = self.parallel.any_needs_teacher(need_forward)
        if need_forward and self.parallel.split_teacher:
            from .parallel.teacher_pipeline import TeacherRequest

            got = self.parallel.teacher.forward(
                batch["input_ids"],
                batch["attention_mask"],
                TeacherRequest(
                    logits=need_logits,
                    hidden=tuple(t + 1 for _, t in self.pairs) if need_hidden else (),
                    qkv=tuple(t for _, t in self.pairs) if need_attn else (),
                ),
            )
            if need_hidden:
                # Only the mapped layers travel; HiddenStateTransfer reads index t + 1 of the tuple.
                out.hidden = tuple(
                    got.hidden[i].float() if i in got.hidden else None  # type: ignore[misc]
                    for i in range(self.parallel.teacher.num_layers + 1)
                )
            if need_attn:
                out.qkv = {layer: tuple(x.float() for x in qkv) for layer, qkv in got.qkv.items()}  # type: ignore[misc]
            if got.logits is not None:
                if self.cache is None:
                    out.logits = got.logits
                else:
                    cached = self._store_in_cache(ids, got.logits, batch["attention_mask"])
        elif need_forward:
            from .qkv_capture import QKVCapture

            t_layers = [t for _, t in self.pairs] if need_attn else []
            cap_ctx = QKVCapture(self.teacher, t_layers) if need_attn else contextlib.nullcontext()
            parts = row_head_parts(self.teacher) if self.task == "causal-lm" and self.cache is None else None
            with torch.inference_mode(), autocast, cap_ctx as cap:
                if parts is not None:
                    backbone, head = parts
                    t_out = backbone(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        output_hidden_states=need_hidden,
                    )
                    if need_logits:
                        out.logit_rows = head(t_out.last_hidden_state[:, :-1][self._valid(batch)]).float().clone()
                else:
                    t_out = self.teacher(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        output_hidden_states=need_hidden,
                    )
            # Inference tensors cannot enter autograd graphs; clone the ones the losses keep.
            if need_hidden:
                out.hidden = tuple(h.float().clone() for h in t_out.hidden_states)
            if need_attn:
                out.qkv = {layer: tuple(x.float().clone() for x in qkv) for layer, qkv in cap.qkv.items()}
            if need_logits and out.logit_rows is None:
                logits = t_out.logits.float().clone()
                if self.cache is None:
                    out.logits = logits
                else:
                    cached = self._store_in_cache(ids, logits, batch["attention_mask"])
        if cached is not None:
            out.top_values, out.top_indices, out.logsumexp = cached.values, cached.indices, cached.logsumexp
        return out

    @staticmethod
    def _valid(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Causal-lm rows that are trained on: row i predicts token i+1, padding predicts nothing."""
        return batch["labels"][:, 1:] != -100

    def _store_in_cache(self, ids: list[int], logits: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        if logits.dim() == 2:  # classification: one "token" per sample
            logits = logits.unsqueeze(1)
            lengths = [1] * logits.shape[0]
        else:
            lengths = attention_mask.sum(dim=1).tolist()
        lse = torch.logsumexp(logits, dim=-1)
        values, indices = logits.topk(self.cache_k, dim=-1)
        self.cache.store(ids, values.half().cpu(), indices.cpu(), [int(n) for n in lengths], lse.cpu())
        # Train on exactly what a later epoch (or a resumed run) will read back.
        again = self.cache.lookup(ids)
        if again is None:
            raise TrainerError(ExitCode.INTERNAL, "the teacher cache lost an entry it just stored")
        return again

    def _micro_loss(
        self, batch: dict[str, torch.Tensor], phase: Phase, temperature: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from .losses import hard_label_ce, kd_divergence, kd_objective, topk_kd_divergence
        from .qkv_capture import QKVCapture
        from .weighting import sample_entropy_weights

        objs = set(phase.objectives)
        autocast = self._autocast(phase)
        targets = self._teacher_targets(batch, phase, self._autocast(phase))
        need_attn = "attention" in objs
        s_layers = [s for s, _ in self.pairs] if need_attn else []
        cap_ctx = QKVCapture(self.student, s_layers) if need_attn else contextlib.nullcontext()
        # The row-only head needs the plain module: DDP must see its own forward to sync gradients.
        parts = (
            row_head_parts(self.student)
            if self.task == "causal-lm" and self.student_forward is self.student and "logits" in objs
            else None
        )
        s_rows_fast = None
        with autocast, cap_ctx as cap:
            if parts is not None:
                backbone, head = parts
                s_out = backbone(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states="hidden" in objs,
                )
                s_rows_fast = head(s_out.last_hidden_state[:, :-1][self._valid(batch)])
            else:
                s_out = self.student_forward(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states="hidden" in objs,
                )
        mask = batch["attention_mask"]
        losses: dict[str, torch.Tensor] = {}
        parts: dict[str, float] = {}
        if "logits" in objs:
            d = self.spec.distillation
            labels = batch["labels"]
            if self.task == "causal-lm":
                valid = self._valid(batch)
                s_rows = s_rows_fast.float() if s_rows_fast is not None else s_out.logits.float()[:, :-1][valid]
                label_rows = labels[:, 1:][valid]

                def rows(t: torch.Tensor) -> torch.Tensor:
                    return t[:, :-1][valid]
            else:
                valid = None
                s_rows, label_rows = s_out.logits.float(), labels

                def rows(t: torch.Tensor) -> torch.Tensor:
                    return t[:, 0] if t.dim() == 3 else t

            weights = None
            chunk = max(256, LOSS_CHUNK_ELEMENTS // s_rows.shape[-1])
            if targets.logit_rows is not None:
                assert valid is not None
                kd = kd_divergence(s_rows, targets.logit_rows, d.loss, temperature, chunk_rows=chunk)
                entropy_src = None
                if self.spec.data.uncertainty_weighting.enabled:
                    # Entropy weighting is per sample: lay the rows back out as [B, L-1, V].
                    entropy_src = targets.logit_rows.new_zeros((*valid.shape, targets.logit_rows.shape[-1]))
                    entropy_src[valid] = targets.logit_rows
            elif targets.logits is not None:
                t_full = targets.logits
                kd = kd_divergence(s_rows, rows(t_full), d.loss, temperature, chunk_rows=chunk)
                entropy_src = t_full[:, :-1] if self.task == "causal-lm" else t_full
            else:
                assert targets.top_values is not None and targets.top_indices is not None
                lse = targets.logsumexp
                kd = topk_kd_divergence(
                    s_rows,
                    rows(targets.top_values),
                    rows(targets.top_indices),
                    d.loss,
                    temperature,
                    chunk_rows=chunk,
                    teacher_logsumexp=rows(lse) if lse is not None else None,
                )
                entropy_src = None
                if self.spec.data.uncertainty_weighting.enabled:  # only weighting reads the buckets
                    buckets = bucket_logits(targets.top_values, lse)
                    entropy_src = buckets[:, :-1] if self.task == "causal-lm" else buckets[:, 0]
            uw = self.spec.data.uncertainty_weighting
            if uw.enabled:
                assert entropy_src is not None
                w_sample = sample_entropy_weights(entropy_src, uw.beta, valid.float() if valid is not None else None)
                weights = w_sample[:, None].expand_as(valid)[valid] if valid is not None else w_sample
            ce = hard_label_ce(s_rows, label_rows)
            losses["logits"] = kd_objective(kd, ce, d.alpha, weights=weights)
            parts["kd"] = float(kd.detach().mean())
            parts["ce"] = float(ce.detach().mean())
        if "hidden" in objs:
            assert targets.hidden is not None
            losses["hidden"] = self.aux["hidden"](s_out.hidden_states, targets.hidden, mask)
        if "attention" in objs:
            assert targets.qkv is not None
            s_qkv = [cap.qkv[s] for s, _ in self.pairs]
            t_qkv = [targets.qkv[t] for _, t in self.pairs]
            losses["attention"] = self.aux[f"attention_r{phase.attention_rank}"](s_qkv, t_qkv, mask)
        for name, value in losses.items():
            parts[name] = float(value.detach())
        # Objectives of a stage weigh equally.
        loss = torch.stack(list(losses.values())).mean()
        return loss, parts

    # ---- one micro-batch, model-parallel student --------------------------------------------------
    def _mp_token_loss(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token alpha*KD + (1-alpha)*CE at the step's temperature (ParallelStudent's TokenLoss).

        Runs on the ranks that hold the LM head (the last pipeline stage); labels are already
        shifted (position i is scored against token i+1) and -100 where nothing is predicted.
        """
        from .losses import hard_label_ce, kd_divergence

        d = self.spec.distillation
        vocab = student.shape[-1]
        s_rows, t_rows, y = student.float().reshape(-1, vocab), teacher.float().reshape(-1, vocab), labels.reshape(-1)
        chunk = max(256, LOSS_CHUNK_ELEMENTS // vocab)
        kd = kd_divergence(s_rows, t_rows, d.loss, self._mp_temperature, chunk_rows=chunk)
        ce = hard_label_ce(s_rows, y, chunk_rows=chunk)
        valid = (y != -100).to(torch.float64)
        self._mp_parts.append(
            torch.stack([(kd.detach().double() * valid).sum(), (ce.detach().double() * valid).sum(), valid.sum()]).cpu()
        )
        return (d.alpha * kd + (1.0 - d.alpha) * ce).view_as(labels)

    def _mp_micro_step(
        self, batch: dict[str, torch.Tensor], temperature: float, accum: int
    ) -> tuple[float, dict[str, float]]:
        """Forward and backward of one micro-batch through the split student; returns the global
        mean loss and its KD/CE parts (the same numbers a single process reports).

        Teacher targets: the ranks that compute the loss (the last pipeline stage, every tensor
        peer there) run the teacher on their own rows and hand the logits to the schedule as the
        loss target; earlier stages never run the teacher. A split teacher's forward is collective,
        so then every rank takes part.
        """
        import torch.distributed as dist

        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if self.parallel.layout.pipeline > 1:
            # One pipeline schedule per batch shape: round lengths up to a multiple of 16 (right
            # padding is ignored by causal attention and by the loss) so few shapes occur.
            pad = -ids.shape[1] % 16
            if pad:
                ids = torch.nn.functional.pad(ids, (0, pad), value=self.pad_id)
                mask = torch.nn.functional.pad(mask, (0, pad), value=0)
                labels = torch.nn.functional.pad(labels, (0, pad), value=-100)
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        teacher = None
        if self.parallel.split_teacher:
            teacher = self.parallel.teacher_logits(ids, mask)
        elif self.mp.is_last_stage:
            with torch.inference_mode():
                teacher = self.teacher(input_ids=ids, attention_mask=mask).logits.float()
            teacher = teacher.clone()
        self._mp_temperature = temperature
        self._mp_parts.clear()
        loss = self.mp.forward_backward(ids, shifted, teacher, mask, grad_scale=1.0 / accum)
        # KD/CE parts for the report: summed over the data ranks' loss ranks (tensor 0 only),
        # from the real micro-batches (the last calls; shape inference calls come first).
        parts_t = torch.zeros(3, dtype=torch.float64)
        if self.mp.is_last_stage and self.mp.coords["tensor"] == 0 and self.mp.last_loss_calls:
            parts_t = torch.stack(self._mp_parts[-self.mp.last_loss_calls :]).sum(0)
        if self.parallel.distributed:
            with self.parallel.guard("the loss report"):
                parts_t = parts_t.to(self.device)
                dist.all_reduce(parts_t)
        count = max(float(parts_t[2]), 1.0)
        return loss, {"kd": float(parts_t[0]) / count, "ce": float(parts_t[1]) / count, "logits": loss}

    def _mp_gather(self) -> Any:
        """Collective: the whole student's state on rank 0 (GatheredState), None elsewhere."""
        from .parallel.student_state import gather_state, load_into_template

        with self.parallel.guard("gathering the student"):
            state = gather_state(self.mp, self.optimizer, self.mp_full)
        if state is not None:
            load_into_template(self.mp_template, state.weights)
        return state

    def _mp_restore(self, info: CheckpointInfo) -> None:
        """Every rank reads the whole-student checkpoint and keeps its own shard of it."""
        from safetensors.torch import load_file

        from .checkpoint import restore_rng
        from .parallel.student_state import load_state

        weights = load_file(str(info.path / "model.safetensors"))
        opt_state = torch.load(info.path / "optimizer.pt", weights_only=True)
        try:
            load_state(self.mp, self.optimizer, self.mp_full, weights, opt_state)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise TrainerError(
                ExitCode.CHECKPOINT_INCOMPATIBLE, f"checkpoint {info.path} does not fit this student: {exc}"
            ) from None
        self.scheduler.load_state_dict(torch.load(info.path / "scheduler.pt", weights_only=True))
        restore_rng(torch.load(info.path / "rng.pt", weights_only=True))

    # ---- the loop ------------------------------------------------------------------------------
    def _next_batch(self) -> dict[str, torch.Tensor]:
        positions = next(self._sampler_iter)
        batch = self._collate([self.train_examples[p] for p in positions], self.pad_id, self.task)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _resume(self) -> int:
        info: CheckpointInfo | None = self.ckpt.latest()
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
        if self.mp is not None:
            self._mp_restore(info)
        else:
            self.ckpt.restore(
                info, model=self.student, aux=self.aux, optimizer=self.optimizer, scheduler=self.scheduler
            )
        if self.parallel.compression is not None:
            from .parallel.compression import restore_residuals

            restore_residuals(
                self.parallel.compression,
                self._compressed_params(),
                self.ckpt.load_extra(info, "compression.safetensors"),
            )
        self.sampler.load_state_dict(info.sampler)
        self._sampler_iter = iter(self.sampler)
        self.tokens_seen = int(info.meta.get("tokens_seen", 0))
        self.train_seconds = float(info.meta.get("train_seconds", 0.0))
        self.resumed_from = info.step
        self.last_checkpoint = (info.step, info.path.stat().st_mtime)
        self._event("resumed", step=info.step, checkpoint=str(info.path))
        return info.step

    def _compressed_params(self) -> list[nn.Parameter]:
        """The parameters the top-k hook sees (DDP's: the student's trainable ones), in order."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def _save_checkpoint(self, step: int, phase: Phase, temperature: float) -> str | None:
        started = time.perf_counter()
        model, optimizer = self.student, self.optimizer
        if self.mp is not None:
            # Every rank takes part in the gather; rank 0 writes the whole student.
            state = self._mp_gather()
            if state is not None:
                model, optimizer = self.mp_template, state.optimizer_view()
        extra = None
        if self.parallel.compression is not None:
            # Every rank's error-feedback residuals, gathered to rank 0: a resume continues with the
            # unsent gradient mass instead of dropping it (collective, so before the writer check).
            from .parallel.compression import gather_residuals

            gathered = gather_residuals(self.parallel.compression, self._compressed_params())
            extra = {"compression.safetensors": gathered} if gathered is not None else None
        if not self.opts.is_writer:
            return None
        path = self.ckpt.save(
            step=step,
            stage=phase.name,
            temperature=temperature,
            model=model,
            aux=self.aux,
            optimizer=optimizer,
            scheduler=self.scheduler,
            sampler=self.sampler.state_dict(),
            meta={"tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds},
            extra=extra,
        )
        seconds = time.perf_counter() - started
        self.metrics.checkpoint_seconds.observe(seconds)
        self.last_checkpoint = (step, time.time())
        self._event("checkpoint", step=step, path=str(path), seconds=round(seconds, 3))
        return str(path)

    def train(self) -> None:
        start = self._resume()
        self.student.train()
        accum = self.spec.distillation.gradient_accumulation_steps
        every = self.spec.checkpoint.every_steps
        max_norm = self.spec.distillation.max_grad_norm
        params = [p for _, p in self._named_trainables()]
        with _SigtermFlag() as sigterm:
            for step in range(start, self.total):
                self.parallel.seed_step(self.spec.distillation.seed, step)
                phase = phase_at(self.plan, step)
                if phase.kind == "qat-fake-quant" and not self.qat_prepared:
                    self._enter_fake_quant()
                    params = [p for _, p in self._named_trainables()]
                    self._event("qat-fake-quant", step=step)
                temperature = plan_temperature(self.spec, self.plan, step, self._temperature_fn())
                started = time.perf_counter()
                tokens = 0
                parts_sum: dict[str, float] = {}
                loss_sum = 0.0
                for _ in range(accum):
                    batch = self._next_batch()
                    if self.mp is not None:
                        loss_value, parts = self._mp_micro_step(batch, temperature, accum)
                    else:
                        loss, parts = self._micro_loss(batch, phase, temperature)
                        (loss / accum).backward()
                        loss_value = float(loss.detach())
                    tokens += int(batch["attention_mask"].sum())
                    loss_sum += loss_value / accum
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v / accum
                if not math.isfinite(loss_sum):
                    raise TrainerError(ExitCode.INTERNAL, f"loss is {loss_sum} at step {step + 1} ({phase.name})")
                # DDP reduced the student's gradients; the aux modules are reduced here.
                self.parallel.average_grads(list(self.aux.parameters()))
                if max_norm > 0 and self.mp is not None:
                    from .parallel.student_state import clip_grad_norm

                    with self.parallel.guard("the gradient norm"):
                        clip_grad_norm(self.mp, self.mp_full, max_norm)
                elif max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - started
                self.train_seconds += seconds
                self.tokens_seen += tokens
                done = step + 1
                lr = float(self.optimizer.param_groups[0]["lr"])
                tps = tokens / seconds if seconds > 0 else 0.0
                parts_sum["total"] = loss_sum
                self.metrics.record_step(
                    step=done,
                    parts=parts_sum,
                    temperature=temperature,
                    tokens_per_second=tps,
                    step_seconds=seconds,
                    learning_rate=lr,
                )
                asked = self.opts.stop_after is not None and done >= self.opts.stop_after
                # Collective: saves are collective, so every rank must stop at the same step.
                stopping = self.parallel.agree_stop(sigterm.raised or asked)
                ckpt_path = None
                if done % every == 0 or stopping:
                    ckpt_path = self._save_checkpoint(done, phase, temperature)
                if self.opts.on_step is not None:
                    self.opts.on_step(
                        StepReport(
                            done, self.total, phase.name, loss_sum, parts_sum, temperature, lr, tps, seconds, ckpt_path
                        )
                    )
                if stopping and done < self.total:
                    why = "SIGTERM" if sigterm.raised else "stop_after" if asked else "a peer rank's stop"
                    raise TrainerError(
                        ExitCode.PREEMPTED, f"stopped at step {done} of {self.total} after {why}; checkpoint written"
                    )
        if self.mp is not None:
            # The outputs (student/, the INT8 artifact, evaluation) are written by rank 0 from
            # its unsplit copy; the gather is collective, so every rank does it here.
            self._mp_gather()

    @staticmethod
    def _temperature_fn() -> Callable[..., float]:
        from .schedules import temperature_at

        return temperature_at

    # ---- after training ------------------------------------------------------------------------
    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        examples = sorted(self.eval_examples, key=lambda e: len(e.input_ids))
        out = []
        for i in range(0, len(examples), EVAL_BATCH_SIZE):
            batch = self._collate(examples[i : i + EVAL_BATCH_SIZE], self.pad_id, self.task)
            out.append(batch)
        return out

    def teacher_for_eval(self) -> nn.Module:
        """The whole teacher: a split teacher holds one stage here, so rank 0 reloads it."""
        if not self.parallel.split_teacher:
            return self.teacher
        if getattr(self, "_full_teacher", None) is None:
            self._full_teacher = load_models(self.spec, self.opts.base_dir).teacher.to(self.device)
        return self._full_teacher

    def evaluate_model(self, model: nn.Module, device: torch.device | None = None) -> EvalResult | None:
        if not self.eval_examples:
            return None
        return evaluate(model, self.eval_batches(), self.task, device or self.device)

    def full_precision_student(self) -> nn.Module:
        """The trained student with any fake-quant wrappers removed (float weights)."""
        if self.mp is not None:
            return self.mp_template  # rank 0's unsplit copy, gathered at the end of train()
        if not self.qat_prepared:
            return self.student
        from .quantization import strip_fake_quant

        return strip_fake_quant(copy.deepcopy(self.student))

    def quantized_student(self) -> nn.Module | None:
        mode = self.spec.quantization.mode
        if mode == "none":
            return None
        from . import quantization

        cpu_copy = copy.deepcopy(self.mp_template if self.mp is not None else self.student).cpu().eval()
        if mode == "qat-int8":
            return quantization.convert_qat_to_int8(cpu_copy)
        return quantization.quantize_ptq_int8(cpu_copy)


def score(teacher: EvalResult | None, student: EvalResult | None) -> dict[str, Any]:
    if teacher is None or student is None:
        return {}
    return {
        "metric": teacher.metric,
        "teacher": teacher.value,
        "student": student.value,
        "retention": retention(teacher.metric, teacher.value, student.value),
    }
