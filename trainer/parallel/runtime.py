"""What the training loop needs from parallelism, behind one object.

``ParallelRuntime.create`` joins the process group (torchrun's environment), checks that the
spec's parallelism is something the loop can run, and then offers:
- ``prepare_teacher``: the teacher split by layers over ``teacherPipelineStages`` ranks
  (``SplitTeacher``), or the plain teacher;
- ``teacher_logits``: the (collective) teacher forward for this rank's batch;
- ``wrap_student``: DDP over the data ranks, with the top-k compression hook when asked;
- ``any_needs_teacher``: a teacher group agrees whether to run the teacher at all (with a
  teacher cache one member may hit while another misses, and the split forward is collective).

A world of one makes every method a pass-through, so the single-process loop is unchanged.

With ``student.tensor > 1`` or ``student.pipeline > 1`` the loop runs a model-parallel student
(``parallelize_student``: ``student.py`` cuts, shards and wraps it over the device mesh, and
``student_state.py`` gathers and reshards its checkpoints). That path trains the logits objective
(KD + hard-label CE) and the hidden/attention objectives of causal LMs and of decoder sequence
classifiers, with QAT (``student_qat.py``), the teacher cache and entropy weighting;
``check_supported`` rejects at start, with BAD_SPEC, what it does not cover (the API's
SPLIT_STUDENT_RULES). Top-k gradient
compression runs on the data axis: as DDP's hook, or with pipeline stages after the step's
backward (``_compress_pipelined``), once the tied embedding/head parts are added.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode
from kdistill.api.spec import SPLIT_STUDENT_RULES

from ..errors import TrainerError
from ..optim import ADAM_BETA1
from .distributed import DistEnv, env_from, init_distributed, peer_guard
from .mesh import MeshLayout, layout_from_spec

log = logging.getLogger(__name__)


def check_supported(spec: DistillationJobSpec, layout: MeshLayout) -> None:
    """Reject, before any model is loaded, what the loop cannot run in parallel."""
    # The split teacher (teacher_pipeline.py) cuts GPT2 and Llama-family decoders, causal LMs and
    # sequence classifiers alike; another architecture is refused when the teacher is loaded.
    if layout.tensor > 1 or layout.pipeline > 1:
        check_model_parallel(spec, layout)


def check_model_parallel(spec: DistillationJobSpec, layout: MeshLayout) -> None:
    """What a tensor/pipeline-parallel student supports in the loop. The rules are the API's
    (api/spec.SPLIT_STUDENT_RULES); this refuses specs that bypassed the API."""
    where = f"parallelism.student tensor={layout.tensor} pipeline={layout.pipeline}"
    problems = [p for rule in SPLIT_STUDENT_RULES if (p := rule.problem(spec)) is not None]
    if problems:
        raise TrainerError(ExitCode.BAD_SPEC, f"{where} does not support: " + "; ".join(problems))


@dataclass
class ParallelRuntime:
    env: DistEnv
    layout: MeshLayout
    device: torch.device
    top_k: float = 0.0
    compression_warmup: int = 0
    compression_ramp: int | None = None  # None: as long as the warm-up
    compression_ramp_from: float | None = 1.0  # fraction sent at the ramp's start; None: from the budget
    compression_budget: float = 1.0  # share of plain all-reduce's bytes the run may send (rampFrom unset)
    compression_micro_batches: int = 0  # the job's hook steps, for the budget's plan
    compression_clip: float = 0.0  # local clipping on compressed steps (distillation.maxGradNorm)
    compression_momentum: float = 0.0  # AdamW's beta1 when top-k sends momentum (compress: momentum)
    accumulation: int = 1  # micro-batches per optimizer step
    teacher: Any = None  # SplitTeacher when the teacher is split
    teacher_group: Any = None  # process group of this rank's teacher stages
    compression: Any = None  # TopKState once the hook is installed
    # The student's trainable Parameters by name, as the top-k hook was last installed over them.
    compressed: dict[str, nn.Parameter] | None = None
    mesh: Any = None  # the student's (pipeline, data, tensor) DeviceMesh, model-parallel runs only

    @classmethod
    def create(cls, spec: DistillationJobSpec, device: torch.device, env: DistEnv | None = None) -> ParallelRuntime:
        env = env or env_from()
        layout = layout_from_spec(spec.parallelism)
        if env.world_size != layout.world_size:
            raise TrainerError(
                ExitCode.BAD_SPEC,
                f"the job asks for a world of {layout.world_size} processes (nodes * max(gpusPerNode, 1)) "
                f"but this process was started in a world of {env.world_size}",
            )
        check_supported(spec, layout)
        if env.distributed:
            init_distributed(env, prefer_gpu=device.type == "cuda")
        gc = spec.parallelism.gradient_compression
        rt = cls(
            env=env,
            layout=layout,
            device=device,
            top_k=gc.top_k,
            compression_warmup=gc.warmup_steps,
            compression_ramp=spec.compression_ramp_steps,
            compression_ramp_from=gc.ramp_from,
            compression_budget=gc.byte_budget,
            compression_micro_batches=spec.total_steps * spec.distillation.gradient_accumulation_steps,
            compression_clip=spec.distillation.max_grad_norm,
            compression_momentum=ADAM_BETA1 if gc.compress == "momentum" else 0.0,
            accumulation=spec.distillation.gradient_accumulation_steps,
        )
        if env.distributed and layout.teacher_stages > 1:
            # new_group is collective: every rank creates every teacher group in the same order.
            for first in range(0, layout.world_size, layout.teacher_stages):
                group = dist.new_group(list(range(first, first + layout.teacher_stages)))
                if env.rank in range(first, first + layout.teacher_stages):
                    rt.teacher_group = group
        if rt.model_parallel:
            from .mesh import build_device_mesh

            rt.mesh = build_device_mesh(layout, device.type)
        return rt

    @property
    def model_parallel(self) -> bool:
        """The student is split over ranks (tensor or pipeline parallel), not replicated."""
        return self.layout.tensor > 1 or self.layout.pipeline > 1

    @property
    def data_rank(self) -> int:
        """This rank's coordinate on the data dimension: which share of each global batch it reads."""
        return self.layout.coords(self.env.rank)["data"]

    def parallelize_student(self, student: nn.Module, token_loss: Any, materialize: Any = None) -> Any:
        """Cut (pipeline), shard (tensor) and wrap (data) the student in place: a ParallelStudent.
        ``materialize``: fills a meta-device student's pieces once cut (``meta_load.py``)."""
        from .student import parallelize_student

        # With pipeline stages DDP sees one backward per micro-batch in the first step and its
        # bucket rebuild then counts every parameter once per micro-batch and fails an internal
        # assert at the next step; find_unused_parameters=True switches that rebuild off.
        ddp_kwargs = {"find_unused_parameters": True} if self.layout.pipeline > 1 else None
        try:
            split = parallelize_student(
                student,
                self.layout,
                self.env.rank,
                self.mesh,
                token_loss,
                device=self.device,
                ddp_kwargs=ddp_kwargs,
                materialize=materialize,
            )
        except ValueError as exc:
            raise TrainerError(ExitCode.BAD_SPEC, f"parallelism.student: {exc}") from None
        if self.top_k > 0 and self.layout.data > 1 and self.layout.pipeline > 1:
            self.compression = self._compress_pipelined(split)
        elif self.top_k > 0 and self.layout.data > 1:
            # Top-k over the data axis only: DDP reduces each rank's own shard over its data
            # peers; tensor-parallel traffic is not compressed.
            from .compression import register_topk

            self.compression = register_topk(
                split.module,
                self.top_k,
                warmup_steps=self.compression_warmup,
                ramp_steps=self.compression_ramp,
                ramp_from=self.ramp_start(split.module.parameters()),
                process_group=self.mesh["data"].get_group(),
                clip_norm=self.compression_clip,
                momentum=self.compression_momentum,
                accumulation=self.accumulation,
            )
            self.compression.log_every = 10
        return split

    def ramp_start(self, params: Any) -> float:
        """The fraction top-k sends at the ramp's first step for the gradients of ``params``:
        rampFrom (or topK when that is larger), else the densest start whose planned bytes over the
        whole job stay within byteBudget (``compression_budget``). The plan depends on the shapes
        alone, which every rank of a data group shares, so the ranks agree without a message."""
        if self.compression_ramp_from is not None:
            return max(self.compression_ramp_from, self.top_k)
        from .compression import TopKState
        from .compression_budget import plan_ramp_from, shapes_of

        trainables = [p for p in params if p.requires_grad]
        local = [p.to_local() if hasattr(p, "to_local") else p for p in trainables]
        schedule = TopKState(
            fraction=self.top_k,
            warmup_steps=self.compression_warmup,
            ramp_steps=self.compression_ramp,
            momentum=self.compression_momentum,
            accumulation=self.accumulation,
        )
        plan = plan_ramp_from(
            schedule,
            shapes_of((t.numel() for t in local), (t.dim() <= 1 for t in local)),
            self.compression_micro_batches,
            self.compression_budget,
            element_size=local[0].element_size() if local else 4,
        )
        if not plan.within_budget:
            log.warning(
                "top-k compression: the warm-up and topK %s alone send 1/%.1f of plain all-reduce's "
                "bytes, more than byteBudget %s allows; the ramp starts at topK",
                self.top_k,
                plan.ratio,
                self.compression_budget,
            )
        log.info(
            "top-k compression: the ramp starts at %.4f over %s steps, planned 1/%.1f of plain "
            "all-reduce's bytes over the run (byteBudget %s)",
            plan.ramp_from,
            self.compression_ramp,
            plan.ratio,
            self.compression_budget,
        )
        return plan.ramp_from

    def _compress_pipelined(self, split: Any) -> Any:
        """Top-k for a pipelined student: DDP keeps each rank's own gradient (its reduction would
        run before the tied embedding/head parts are added) and ``ParallelStudent`` compresses the
        step's gradients over the data peers once its backward is done."""
        from .compression import TopKState, local_only_hook

        state = TopKState(
            fraction=self.top_k,
            warmup_steps=self.compression_warmup,
            ramp_steps=self.compression_ramp,
            ramp_from=self.ramp_start(split.module.parameters()),
            process_group=self.mesh["data"].get_group(),
            clip_norm=self.compression_clip,
            momentum=self.compression_momentum,
            accumulation=self.accumulation,
        )
        state.log_every = 10
        split.module.register_comm_hook(None, local_only_hook)
        split.compression = state
        return state

    @property
    def distributed(self) -> bool:
        return self.env.distributed

    @property
    def split_teacher(self) -> bool:
        return self.teacher is not None

    def prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """Keep only this rank's teacher stage when the teacher is split; returns the module."""
        if self.layout.teacher_stages == 1:
            return teacher
        from .teacher_pipeline import SplitTeacher

        try:
            self.teacher = SplitTeacher(
                teacher, self.layout.teacher_group(self.env.rank), self.env.rank, device=self.device
            )
        except ValueError as exc:
            raise TrainerError(ExitCode.BAD_SPEC, f"teacherPipelineStages: {exc}") from None
        log.info(
            "teacher stage %d/%d: layers %s, %.1f MiB of parameters",
            self.teacher.split.stage + 1,
            self.layout.teacher_stages,
            self.teacher.split.layers,
            self.teacher.param_bytes / 2**20,
        )
        return self.teacher.model

    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        return self.teacher.logits(input_ids, attention_mask)

    def any_needs_teacher(self, needs: bool) -> bool:
        """True on every member of a teacher group when any member needs the teacher forward."""
        if self.teacher_group is None:
            return needs
        flag = torch.tensor([1 if needs else 0], dtype=torch.int32)
        with peer_guard("the teacher-cache agreement"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.teacher_group)
        return bool(flag.item())

    def wrap_student(self, student: nn.Module) -> nn.Module:
        """DDP over the data ranks (parameters stay the student's own objects)."""
        if not self.distributed:
            return student
        from torch.nn.parallel import DistributedDataParallel as DDP

        # find_unused_parameters=True also switches off DDP's bucket rebuild after the first
        # step. A rebuild re-orders the gradient buffer, which changes gloo's summation order per
        # entry; a resumed run (whose first step is a first step again) would then round
        # differently from an uninterrupted one, and Adam amplifies that to visible weight
        # differences. With one fixed layout a restart reproduces the same weights.
        ddp = DDP(
            student, device_ids=[self.device.index] if self.device.type == "cuda" else None, find_unused_parameters=True
        )
        if self.top_k > 0:
            from .compression import register_topk, rehook

            trainables = {name: p for name, p in student.named_parameters() if p.requires_grad}
            if self.compression is not None and self.compressed is not None:
                # Wrapped again (QAT's fake quantizers): the hook's state carries on.
                rehook(self.compression, ddp, self.compressed, trainables)
                self.compressed = trainables
                return ddp
            self.compressed = trainables
            self.compression = register_topk(
                ddp,
                self.top_k,
                warmup_steps=self.compression_warmup,
                ramp_steps=self.compression_ramp,
                ramp_from=self.ramp_start(ddp.parameters()),
                clip_norm=self.compression_clip,
                momentum=self.compression_momentum,
                accumulation=self.accumulation,
            )
            self.compression.log_every = 10
        return ddp

    def seed_step(self, seed: int, step: int) -> None:
        """Seed torch's RNG (dropout) from (seed, step, rank) at the start of every step.

        Ranks draw different amounts of randomness (their batches differ in length), so their RNG
        states drift apart and a checkpoint of rank 0's state cannot restore the others. Seeding
        each step from its coordinates makes every step's randomness a function of where it is,
        so a restarted group repeats exactly what an uninterrupted one did. Single-process runs
        keep the checkpointed RNG stream and are left alone.
        """
        if self.distributed:
            # Tensor-parallel peers compute the same replicated activations: they share a stream.
            who = self.env.rank // self.layout.tensor
            torch.manual_seed(((seed * 1_000_003 + step) * 65_537 + who) % 2**63)

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """Average gradients of modules outside DDP (the loop's small aux projections)."""
        if self.model_parallel and self.distributed:
            self._reduce_split_aux_grads(params)
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not self.distributed or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        with peer_guard("the aux gradient all-reduce"):
            dist.all_reduce(flat)
        flat.div_(self.env.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _reduce_split_aux_grads(self, params: list[nn.Parameter]) -> None:
        """Aux gradients of a split student (split_features.py): a pair's projection gets its
        gradient only on the pipeline stage owning the pair's student block, identical on each
        tensor peer there, each data rank's scaled by the data degree (as DDP averages). So the
        world's sum divided by ``data * tensor`` is the single-process gradient. A parameter no
        rank produced a gradient for keeps None (AdamW then skips it, as in one process)."""
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        with peer_guard("the aux gradient flags"):
            dist.all_reduce(has, op=dist.ReduceOp.MAX)
        used = [p for p, flag in zip(params, has.tolist(), strict=True) if flag]
        if not used:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in used]
        flat = torch.cat([g.reshape(-1) for g in grads])
        with peer_guard("the aux gradient all-reduce"):
            dist.all_reduce(flat)
        flat.div_(self.layout.data * self.layout.tensor)
        offset = 0
        for p, g in zip(used, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def agree_stop(self, local: bool) -> bool:
        """True on every rank when any rank wants to stop after this step (SIGTERM).

        Checkpoint saves are collective (gathers of residuals, shards): if SIGTERM reached ranks
        at different steps, the one that stopped would wait in the gather for peers that went on
        training, until the collective timeout. One MAX all-reduce of a flag per step makes the
        decision shared, so every rank checkpoints at the same step and exits PREEMPTED. It costs
        a 4-byte collective per step, small next to the gradient all-reduce of the same step."""
        return self._reduce_flag(local, dist.ReduceOp.MAX, "the stop-flag all-reduce")

    def agree_sound(self, local: bool) -> bool:
        """True on every rank when every rank found its share of a checkpoint's files sound
        (``CheckpointManager.latest``): the ranks split the hashing and skip the same checkpoints."""
        return self._reduce_flag(local, dist.ReduceOp.MIN, "the checkpoint-verification all-reduce")

    def steps_of_first(self, steps: list[int]) -> list[int]:
        """Rank 0's ``steps`` on every rank: the checkpoint listing the group walks on resume
        (``CheckpointManager.latest``). Two broadcasts: the count, then the steps."""
        if not self.distributed:
            return steps
        count = torch.tensor([len(steps)], dtype=torch.int64, device=self.device)
        with peer_guard("the checkpoint-listing broadcast"):
            dist.broadcast(count, src=0)
            if not count.item():
                return []
            values = torch.tensor(steps if self.env.rank == 0 else [0] * int(count.item()), dtype=torch.int64)
            values = values.to(self.device)
            dist.broadcast(values, src=0)
        return [int(v) for v in values.tolist()]

    def _reduce_flag(self, local: bool, op: Any, what: str) -> bool:
        """``local`` reduced over the world with ``op`` (MAX: any rank, MIN: every rank)."""
        if not self.distributed:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=self.device)
        with peer_guard(what):
            dist.all_reduce(flag, op=op)
        return bool(flag.item())

    def guard(self, what: str) -> Any:
        return peer_guard(what)

    def shutdown(self) -> None:
        from .distributed import shutdown

        if self.distributed:
            shutdown()
