"""The model-parallel flow: the student split over ranks by tensor and/or pipeline parallelism
(``parallel/student.py``), replicated over the data ranks.

It trains the logits, hidden and attention objectives of causal LMs and of decoder sequence
classifiers (class logits, pooled on the last pipeline stage, scored as a one-position sequence;
what ``parallel.runtime.check_model_parallel`` admits), from the live teacher or the teacher cache,
optionally entropy-weighted, through QAT's reduced-precision and fake-quant phases
(``parallel/student_qat.py``); the hidden/attention terms are computed on the stage that owns
each mapped student block (``parallel/split_features.py``).

A student with weights on disk arrives on the meta device (``models.load_models`` with
``meta_student``) and each rank reads only its own slices (``parallel/meta_load.py``).
Checkpoints are sharded: every rank writes its own part and reads back only what it holds, under
any layout (``parallel/sharded_checkpoint.py``); gathered checkpoints (a single process's) still
load. The final student is streamed to rank 0's output folder tensor by tensor
(``parallel/student_save.py``); the writer reads it back from there for INT8 conversion and
evaluation. No rank holds an unsplit copy of the student while it trains.
"""

from __future__ import annotations

import contextlib
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


def _release_shards(ps: Any) -> None:
    """Frees the storage of the split student's plain parameters, each left an empty tensor of
    its dtype (DTensor shards keep theirs: their local tensor cannot be swapped this way)."""
    from torch.distributed.tensor import DTensor

    for p in ps.named_params.values():
        if not isinstance(p, DTensor):
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


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
        source: Any = None,  # parallel.meta_load.WeightSource of a meta-device student
        student_dir: Path | None = None,  # the writer's final student folder (outputs.OutputLayout.student)
    ) -> None:
        """Records the unsplit parameter layout, then splits ``student`` in place (a meta-device
        student is filled with this rank's slices of ``source`` once cut)."""
        from ..parallel.meta_load import is_meta_model
        from ..parallel.student_state import FullLayout

        if is_meta_model(student) and source is None:
            raise ValueError("a meta-device student needs the weight source it is read from")

        self.settings = logits_settings(spec)
        self.task = spec.task
        self.teacher = teacher
        self.parallel = parallel
        self.pad_id = pad_id
        self.device = device
        self.is_writer = is_writer
        self.full_layout = FullLayout.of(student)
        self.config = student.config
        # Student code is never trusted, except a fromTeacher student of the teacher's architecture.
        self.trust = spec.teacher.trust_remote_code and spec.student.from_teacher is not None
        self.source = source
        self.student_dir = student_dir if is_writer else None
        self._final: nn.Module | None = None
        # Attention transfer sizes its student projections by the q/k/v widths of a block, which
        # only the unsplit student can be probed for (a stage may not own the mapped blocks).
        self.student_qkv_dims: tuple[int, int, int] | None = None
        if any("attention" in stage.objectives for stage in spec.distillation.stages):
            if source is not None:
                from ..parallel.meta_load import meta_qkv_dims

                self.student_qkv_dims = meta_qkv_dims(student)
            else:
                from ..aux_modules import probe_qkv_dims

                self.student_qkv_dims = probe_qkv_dims(student, [0], pad_id, device)
        self.aux: nn.ModuleDict = nn.ModuleDict()
        self.pairs: list[tuple[int, int]] = []
        self.features: Any = None
        self._mask_count = torch.zeros(())  # the global attention-mask count of the micro-step
        self.temperature = 1.0  # the current step's, read by the token loss
        self.loss_sums: list[torch.Tensor] = []  # per loss call: [KD sum, CE sum, valid tokens]
        # The teacher cache (targets.CacheStore), set by the loop once it exists; None: off.
        self.cache: Any = None
        materialize = None
        if source is not None:
            from ..parallel.meta_load import StudentMaterializer

            materialize = StudentMaterializer(
                source,
                device=device,
                tensor=parallel.layout.tensor,
                tensor_rank=parallel.layout.coords(parallel.env.rank)["tensor"],
                aliases=self.full_layout.aliases,
            )
        self.split_student = parallel.parallelize_student(student, self._token_loss, materialize)
        self.reads = materialize.reads if materialize is not None else []

    def use_aux(self, aux: nn.ModuleDict, pairs: list[tuple[int, int]]) -> None:
        """The run's aux modules (hidden projections, attention factors), replicated on every rank."""
        self.aux, self.pairs = aux, pairs
        if len(aux) > 0:
            self.features = self.split_student.use_features(aux, pairs)

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
        if self.task == "causal-lm":
            shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        else:  # one label per sample, scored as a one-position sequence
            shifted = labels.reshape(-1, 1)
        objectives = set(phase.objectives)
        use_logits = "logits" in objectives
        features = self._set_objectives(phase, objectives, mask, accum)
        with self._autocast(phase):
            if self.cache is not None and use_logits:
                # The cache holds the logits' top-k; hidden/attention pieces still come live.
                teacher = self._cached_teacher(batch["example_ids"].tolist(), ids, mask)
                targets = self._teacher_targets(ids, mask, False, features)[1] if features is not None else {}
            else:
                teacher, targets = self._teacher_targets(ids, mask, use_logits, features)
        weights = None
        if teacher is not None and self.settings.entropy_beta is not None:
            # The token's sample weight travels as one more channel of the teacher's side.
            weights = self._token_weights(teacher, shifted)
            teacher = torch.cat([teacher, weights.unsqueeze(-1).to(teacher.dtype)], dim=-1)
        self.temperature = temperature
        self.loss_sums.clear()
        ps = self.split_student
        ps.logits_weight = 1.0 / len(objectives) if use_logits else 0.0
        logits_loss = ps.forward_backward(
            ids,
            shifted,
            teacher,
            mask,
            grad_scale=1.0 / accum,
            targets=targets,
            autocast=lambda: self._autocast(phase),
            token_weights=weights,
        )
        sums = self._reported_sums()
        values: dict[str, float] = {}
        parts: dict[str, float] = {}
        if use_logits:
            count = max(float(sums[2]), 1.0)
            parts = {"kd": float(sums[0]) / count, "ce": float(sums[1]) / count}
            values["logits"] = logits_loss
        tokens = max(float(sums[5]), 1.0)
        if "hidden" in objectives:
            values["hidden"] = float(sums[3]) / tokens
        if "attention" in objectives:
            values["attention"] = float(sums[4]) / tokens
        parts.update(values)
        # The single-process loss: the mean of the phase's objectives.
        return sum(values.values()) / len(values), parts

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> None:
        from ..parallel.student_state import clip_grad_norm

        with self.parallel.guard("the gradient norm"):
            aux_grads = [p.grad for p in self.aux.parameters() if p.grad is not None]
            clip_grad_norm(self.split_student, self.full_layout, max_norm, extra=aux_grads)

    def save(self, step: int, phase: Phase, temperature: float, state: CheckpointState) -> Path | None:
        """Collective: every rank writes its own part (``parallel/sharded_checkpoint.py``)."""
        from ..parallel import sharded_checkpoint

        compression = self.parallel.compression
        return sharded_checkpoint.save(
            state,
            sharded_checkpoint.student_held(self.split_student, self.full_layout, for_save=True),
            step=step,
            stage=phase.name,
            temperature=temperature,
            guard=self.parallel.guard,
            compression=compression,
            compressed=self._compressed_params() if compression is not None else None,
        )

    def restore(self, info: CheckpointInfo, state: CheckpointState) -> None:
        """Every rank reads its own shard: of a sharded checkpoint only the chunks it needs, of a
        gathered one (the whole student, as a single process or an earlier version wrote it)
        the whole files."""
        try:
            if info.sharded:
                self._restore_sharded(info, state)
            else:
                self._restore_gathered(info, state)
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise TrainerError(
                ExitCode.CHECKPOINT_INCOMPATIBLE, f"checkpoint {info.path} does not fit this student: {exc}"
            ) from None

    def _restore_sharded(self, info: CheckpointInfo, state: CheckpointState) -> None:
        from ..parallel import sharded_checkpoint

        held = sharded_checkpoint.student_held(self.split_student, self.full_layout, for_save=False)
        expected = set(self.full_layout.shapes)
        sharded_checkpoint.restore(info.path, state, held, expected, guard=self.parallel.guard)
        if self.parallel.compression is not None:
            sharded_checkpoint.restore_residuals(info.path, self.parallel.compression, self._compressed_params())

    def _restore_gathered(self, info: CheckpointInfo, state: CheckpointState) -> None:
        from safetensors.torch import load_file, load_model

        from ..checkpoint import restore_rng
        from ..parallel.student_state import load_state

        weights = load_file(str(info.path / "model.safetensors"))
        opt_state = torch.load(info.path / "optimizer.pt", weights_only=True)
        load_model(state.aux, str(info.path / "aux.safetensors"))
        load_state(self.split_student, state.optimizer, self.full_layout, weights, opt_state, self._aux_params())
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
        """Streams the trained student into the writer's staging folder (``streamed``), tensor by
        tensor; collective, so every rank does it. The run is over and the writer next reads the
        whole student back for conversion and evaluation, so AdamW's moments are dropped first
        and the shards' storage once they are streamed: nothing runs the split student after."""
        from ..parallel.student_save import stream_student

        optimizer.state.clear()

        staging = self.streamed
        if staging is not None:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
        with self.parallel.guard("streaming the student"):
            stream_student(self.split_student, self.full_layout, staging, self.config)
        _release_shards(self.split_student)

    @property
    def streamed(self) -> Path | None:
        """The writer's staging folder of the streamed student (published by ``outputs.publish_student``):
        one per process, so that a superseded attempt still streaming cannot mix its files in."""
        if self.student_dir is None:
            return None
        import os

        return self.student_dir.with_name(f"{self.student_dir.name}.streaming-{os.getpid()}")

    def final_student(self) -> nn.Module:
        """The writer's whole student, read back from the published folder: plain float layers
        (the fake quantizers live in the split student only), which INT8 conversion quantizes as
        it does the unsplit QAT student. Conversion and evaluation need it whole on the writer."""
        assert self.student_dir is not None, "only the writer holds the whole student"
        if self._final is None:
            from ..models import _load_pretrained

            self._final = _load_pretrained(self.student_dir, self.task, torch.float32, self.trust, "final student")
            self._final.to(self.device)
        return self._final

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
    def _compressed_params(self) -> list[nn.Parameter]:
        """The parameters the top-k hook sees (DDP's: this rank's trainable shards), in order."""
        return [p for p in self.split_student.named_params.values() if p.requires_grad]

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
                if self.task == "causal-lm":  # a classifier's labels are one per sample
                    labels = torch.nn.functional.pad(labels, (0, pad), value=IGNORE_INDEX)
        return ids, mask, labels

    def _cached_teacher(self, example_ids: list[int], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """With the teacher cache, the packed top-k entry (``token_objective``) of every token on the
        ranks that compute the loss (None elsewhere).

        tensor rank 0 of each loss rank's tensor group looks the batch up, runs
        the teacher on a miss and stores its top-k, then hands the entry to its tensor peers:
        one writer per batch, and every peer trains on exactly what the cache gives back."""
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
        # A classifier's entry is one position per sample, as its labels are.
        positions = ids.shape[1] if self.task == "causal-lm" else 1
        packed = torch.zeros(ids.shape[0], positions, 2 * k + 1, device=self.device)
        if keeper:
            assert cached is not None
            length = min(cached.values.shape[1], positions)
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

    def _set_objectives(self, phase: Phase, objectives: set[str], mask: torch.Tensor, accum: int) -> Any:
        """Tell this rank's hidden/attention terms what the micro-step trains and how to scale it
        (the data degree over the global attention-mask count, as the logits' token count);
        returns them, or None when the phase trains neither."""
        features = self.features
        if features is None or not objectives & {"hidden", "attention"}:
            if features is not None:
                features.step.hidden = features.step.attention = False
            self._mask_count = torch.zeros(())
            return None
        import torch.distributed as dist

        count = mask.sum().to(torch.float64).to(self.device)
        layout = self.parallel.layout
        if layout.data > 1:
            with self.parallel.guard("the mask count"):
                dist.all_reduce(count, group=self.parallel.mesh["data"].get_group())
        self._mask_count = count.cpu()
        step = features.step
        step.hidden = "hidden" in objectives
        step.attention = "attention" in objectives
        step.attention_key = f"attention_r{phase.attention_rank}"
        step.weight = 1.0 / len(objectives)
        step.scale = float(layout.data) / max(float(count.item()), 1.0) / accum
        return features

    def _teacher_targets(
        self, ids: torch.Tensor, mask: torch.Tensor, use_logits: bool, features: Any
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Teacher logits where the loss is computed (the last pipeline stage, every tensor peer
        there) and the teacher pieces of this rank's hidden/attention terms (the stage owning each
        mapped block). A rank that needs nothing never runs the teacher. A split teacher's forward
        is collective, so then every rank takes part with the same request."""
        want_hidden, want_qkv = features.wanted() if features is not None else ([], [])
        need_logits = use_logits and self.split_student.is_last_stage
        if self.parallel.split_teacher:
            from ..parallel.teacher_pipeline import TeacherRequest

            step = features.step if features is not None else None
            request = TeacherRequest(
                logits=use_logits,
                hidden=tuple(sorted({t + 1 for _, t in self.pairs})) if step is not None and step.hidden else (),
                qkv=tuple(sorted({t for _, t in self.pairs})) if step is not None and step.attention else (),
            )
            got = self.parallel.teacher.forward(ids, mask, request)
            logits, hidden, qkv = got.logits, got.hidden, got.qkv
        elif need_logits or want_hidden or want_qkv:
            logits, hidden, qkv = self._local_teacher(ids, mask, need_logits, want_hidden, want_qkv)
        else:
            return None, {}
        targets = features.targets(mask, hidden, qkv) if features is not None else {}
        if need_logits and logits is not None and logits.dim() == 2:  # a classifier's [B, C]
            logits = logits.unsqueeze(1)
        return (logits if need_logits else None), targets

    def _local_teacher(
        self, ids: torch.Tensor, mask: torch.Tensor, logits: bool, hidden: list[int], qkv: list[int]
    ) -> tuple[
        torch.Tensor | None, dict[int, torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ]:
        from ..qkv_capture import QKVCapture

        with torch.inference_mode(), QKVCapture(self.teacher, qkv) as cap:
            out = self.teacher(input_ids=ids, attention_mask=mask, output_hidden_states=bool(hidden))
        # Inference tensors cannot enter autograd graphs: clone what the losses keep.
        return (
            out.logits.float().clone() if logits else None,
            {i: out.hidden_states[i].float().clone() for i in hidden},
            {layer: (q.float().clone(), k.float().clone(), v.float().clone()) for layer, (q, k, v) in cap.qkv.items()},
        )

    def _reported_sums(self) -> torch.Tensor:
        """KD/CE sums and token count summed over the data ranks' loss ranks (tensor 0 only),
        from the real micro-batches (the last calls; shape inference calls come first)."""
        import torch.distributed as dist

        sums = torch.zeros(6, dtype=torch.float64)
        ps = self.split_student
        if ps.is_last_stage and ps.coords["tensor"] == 0 and ps.last_loss_calls:
            sums[:3] = torch.stack(self.loss_sums[-ps.last_loss_calls :]).sum(0)
        if self.features is not None and ps.coords["tensor"] == 0 and self.features.reported:
            sums[3:5] = torch.stack(self.features.reported).sum(0)
        # The global mask count is known on every rank: counted once, on rank 0.
        if self.parallel.env.rank == 0:
            sums[5] = float(self._mask_count)
        if self.parallel.distributed:
            with self.parallel.guard("the loss report"):
                sums = sums.to(self.device)
                dist.all_reduce(sums)
        return sums

    def _aux_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.aux.named_parameters() if p.requires_grad]
