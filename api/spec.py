"""The `DistillationJob` spec (kdistill.io/v1alpha1) as pydantic models.

This module is the single source of truth: the CRD in ``crds/`` and the reference in
``docs/api.md`` are generated from it. Field descriptions become the CRD's descriptions.
Every cross-field rule exists twice, once as a pydantic validator and once as the CEL rule
beside it in ``cel_rules``; tests/spec_table.py holds the table that keeps them in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from .base import FLOAT_TOLERANCE, ApiModel, CelRule
from .uris import HF_CEL, PVC_CEL, check_source_uri


class Cel:
    """Annotated marker: a CEL rule on a scalar field (pydantic ignores it; the CRD uses it)."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        self.message = message


SourceUri = Annotated[
    str,
    Field(min_length=1, max_length=1024),
    AfterValidator(check_source_uri),
    Cel(*PVC_CEL),
    Cel(*HF_CEL),
]
DnsName = Annotated[str, Field(max_length=63, pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$")]
Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")]
# Kubernetes objects passed through to the pod spec as they are (resources, env, volumes, ...).
KubeObject = dict[str, Any]

Task = Literal["causal-lm", "sequence-classification"]
DType = Literal["float32", "bfloat16", "float16"]
Objective = Literal["hidden", "attention", "logits", "sequence", "on-policy"]
# Objectives that train on text written at run time (by the teacher or the student); each stands
# alone in its stage, and only causal-LM jobs run them.
GENERATIVE_OBJECTIVES = ("sequence", "on-policy")
# Objectives that need the teacher's inner states, so a teacher behind HTTP cannot serve them.
FEATURE_OBJECTIVES = ("hidden", "attention")


class TeacherBatching(ApiModel):
    max_batch_size: int = Field(64, ge=1, le=4096, description="Requests per batch.")
    max_batch_tokens: int = Field(16384, ge=1, le=10_000_000, description="Padded tokens per batch.")
    max_wait_ms: int = Field(10, ge=0, le=60_000, description="Longest wait of the oldest queued request.")


class TeacherServe(ApiModel):
    enabled: bool = Field(
        False,
        description="Run the teacher as its own Deployment and Service (<job>-teacher) running kdistill "
        "serve; the workers reach it over HTTP and load no teacher weights. Locally, kdistill run "
        "starts a kdistill serve process.",
    )
    replicas: int = Field(1, ge=1, le=1000, description="Teacher server replicas.")
    gpus_per_replica: int = Field(1, ge=0, le=16, description="nvidia.com/gpu per teacher pod; 0 runs on CPU.")
    resources: KubeObject = Field(default_factory=dict, description="Teacher container resources.")
    batching: TeacherBatching = Field(default_factory=TeacherBatching, description="The teacher server's batching.")


class Teacher(ApiModel):
    model: SourceUri | None = Field(
        None,
        description="Teacher model: a path, pvc://CLAIM/PATH or hf://REPO[@REV]. Loaded with "
        "transformers Auto classes, weights through safetensors. Optional when endpoint is set.",
    )
    dtype: DType = Field("float32", description="Precision the teacher runs in.")
    trust_remote_code: bool = Field(
        False, description="Allow model code shipped with the checkpoint to run. Off unless asked for."
    )
    token_secret: str = Field("", max_length=253, description="Name of a Secret holding HF_TOKEN, for hf:// sources.")
    endpoint: str = Field(
        "",
        max_length=1024,
        pattern=r"^(https?://[^\s/]+(/[^\s]*)?)?$",
        description="URL of an OpenAI-compatible server that already runs the teacher (kdistill serve, "
        "vLLM, TGI), e.g. another job's http://JOB-teacher:8080; the workers load no teacher weights.",
    )
    serve: TeacherServe = Field(default_factory=TeacherServe, description="Run the teacher as a service.")

    cel_rules: ClassVar = (
        CelRule(
            "has(self.model) || size(self.endpoint) > 0",
            "teacher.model is required unless teacher.endpoint names a running teacher",
        ),
        CelRule(
            "!self.serve.enabled || (has(self.model) && size(self.endpoint) == 0)",
            "teacher.serve.enabled serves teacher.model: set model and leave endpoint empty",
        ),
    )

    @model_validator(mode="after")
    def _one_teacher(self) -> Teacher:
        if self.model is None and not self.endpoint:
            raise ValueError("teacher.model is required unless teacher.endpoint names a running teacher")
        if self.serve.enabled and (self.model is None or self.endpoint):
            raise ValueError("teacher.serve.enabled serves teacher.model: set model and leave endpoint empty")
        return self

    @property
    def remote(self) -> bool:
        """True when the workers reach the teacher over HTTP instead of loading it."""
        return bool(self.endpoint) or self.serve.enabled


class FromTeacher(ApiModel):
    num_layers: int = Field(
        ge=1,
        le=1024,
        description="Layers of the student. Alone, it keeps evenly spaced teacher layers and copies "
        "their weights (as DistilBERT does).",
    )
    hidden_size: int | None = Field(
        None, ge=8, le=65536, description="A smaller width gives a fresh init of the same architecture."
    )
    num_attention_heads: int | None = Field(
        None, ge=1, le=1024, description="Attention heads of the student; default: the teacher's."
    )

    cel_rules: ClassVar = (
        CelRule(
            "!has(self.hiddenSize) || !has(self.numAttentionHeads) || self.hiddenSize % self.numAttentionHeads == 0",
            "hiddenSize must be divisible by numAttentionHeads",
        ),
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> FromTeacher:
        heads, width = self.num_attention_heads, self.hidden_size
        if heads is not None and width is not None and width % heads:
            raise ValueError(f"hiddenSize must be divisible by numAttentionHeads (got {width} and {heads})")
        return self


class Student(ApiModel):
    model: SourceUri | None = Field(
        None,
        description="An explicit student checkpoint. With another tokenizer than the teacher's, "
        "distill with sequence or on-policy, or set distillation.crossTokenizer for logits "
        "(checked at start).",
    )
    from_teacher: FromTeacher | None = Field(
        None, description="Derive the student from the teacher instead of loading one."
    )

    cel_rules: ClassVar = (
        CelRule(
            "has(self.model) != has(self.fromTeacher)",
            "exactly one of student.model and student.fromTeacher must be set",
        ),
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Student:
        if (self.model is None) == (self.from_teacher is None):
            raise ValueError("exactly one of student.model and student.fromTeacher must be set")
        return self


class Sampling(ApiModel):
    strategy: Literal["uniform", "stratified"] = Field(
        "uniform",
        description="stratified draws each batch from head/torso/tail frequency tiers in the given shares.",
    )
    head: float = Field(0.7, ge=0.0, le=1.0, description="Share of each batch from the head tier.")
    torso: float = Field(0.2, ge=0.0, le=1.0, description="Share of each batch from the torso tier.")
    tail: float = Field(0.1, ge=0.0, le=1.0, description="Share of each batch from the tail tier.")

    cel_rules: ClassVar = (
        CelRule(
            f"self.strategy != 'stratified' || "
            f"(self.head + self.torso + self.tail - 1.0 <= {FLOAT_TOLERANCE} && "
            f"1.0 - (self.head + self.torso + self.tail) <= {FLOAT_TOLERANCE})",
            "head + torso + tail must equal 1 for stratified sampling",
        ),
    )

    @model_validator(mode="after")
    def _shares_sum_to_one(self) -> Sampling:
        total = self.head + self.torso + self.tail
        if self.strategy == "stratified" and abs(total - 1.0) > FLOAT_TOLERANCE:
            raise ValueError(f"head + torso + tail must equal 1 for stratified sampling (got {total:g})")
        return self


class UncertaintyWeighting(ApiModel):
    enabled: bool = Field(
        False,
        description="Weight samples by teacher confidence: w = 1 - (H/Hmax)^beta, normalised over the batch.",
    )
    beta: float = Field(0.5, gt=0.0, le=100.0, description="Exponent of the normalised entropy.")


class RunData(ApiModel):
    """What a DistillationSchedule writes into each run's job: where the run's data comes from.

    Before training, the trainer writes the run's fresh and replayed training examples to
    data.train, the newest partitions' eval examples to data.eval, and eval-old.jsonl (the older
    partitions' eval examples) and plan.json beside data.train (trainer/run_data.py). A gang
    restart finds plan.json and trains on the same examples, even after newer partitions arrive.
    """

    partitions: SourceUri = Field(
        description="The schedule's partition folder: one subfolder each with train.jsonl and eval.jsonl, "
        "newest last by name."
    )
    window: int = Field(1, ge=1, le=10_000, description="The newest partitions that form the fresh data.")
    replay_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of the training examples drawn from older partitions."
    )
    replay_partitions: int = Field(7, ge=1, le=10_000, description="How many older partitions the replay draws from.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds the replay draw, with run.")
    run: str = Field(min_length=1, max_length=253, description="The run's name; seeds the replay draw.")
    champion: SourceUri | None = Field(
        None,
        description="The served student's output folder (holding student-int8/): the trainer scores it on the "
        "same eval data, for the schedule's promotion gate.",
    )


class Data(ApiModel):
    train: SourceUri = Field(description='Training data: JSON lines {"text": ..., "label": ...}.')
    eval: SourceUri | None = Field(None, description="Evaluation data, same format. Required when serving is enabled.")
    text_field: str = Field("text", min_length=1, max_length=128, description="JSON key of the text.")
    label_field: str = Field(
        "label",
        max_length=128,
        description="JSON key of the label; required (non-empty) for sequence-classification.",
    )
    prompt_field: str = Field(
        "prompt",
        min_length=1,
        max_length=128,
        description="JSON key of the prompt, for the sequence and on-policy objectives; lines "
        "without it use the start of their text.",
    )
    max_seq_length: int = Field(512, ge=8, le=131072, description="Longer texts are truncated.")
    max_bad_fraction: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Bad lines (not JSON, missing field, unknown label) are reported and skipped; "
        "the run stops only if more than this fraction is bad.",
    )
    sampling: Sampling = Field(default_factory=Sampling, description="How batches are drawn.")
    uncertainty_weighting: UncertaintyWeighting = Field(
        default_factory=UncertaintyWeighting, description="Per-sample weights from teacher entropy."
    )
    run_data: RunData | None = Field(
        None,
        description="Set by a DistillationSchedule: the trainer writes data.train and data.eval (plain paths in "
        "its file system) from the schedule's partitions before training.",
    )

    cel_rules: ClassVar = (
        CelRule(
            "!has(self.runData) || (has(self.eval) && !self.train.contains('://') && !self.eval.contains('://'))",
            "with runData, data.train and data.eval must be plain paths: the trainer writes both",
        ),
    )

    @model_validator(mode="after")
    def _run_data_paths(self) -> Data:
        if self.run_data is not None and (self.eval is None or "://" in self.train or "://" in self.eval):
            raise ValueError("with runData, data.train and data.eval must be plain paths: the trainer writes both")
        return self


class Temperature(ApiModel):
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear",
        description="Runs once over all distillation stages, start to end. QAT uses end.",
    )
    start: float = Field(5.0, gt=0.0, le=1000.0, description="Temperature at the first step.")
    end: float = Field(1.0, gt=0.0, le=1000.0, description="Temperature at the last distillation step.")


class Stage(ApiModel):
    name: str = Field(
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Unique stage name (DNS-1123 label).",
    )
    steps: int = Field(gt=0, le=10_000_000, description="Optimizer steps in this stage.")
    objectives: list[Objective] = Field(
        min_length=1,
        max_length=3,
        description="hidden: hidden-state MSE through projections; attention: low-rank attention "
        "transfer; logits: KD loss plus hard-label CE; sequence: CE on completions the teacher "
        "writes; on-policy: divergence to the teacher on completions the student samples. "
        "sequence and on-policy each stand alone in their stage.",
    )
    attention_rank: int = Field(16, ge=1, le=4096, description="Rank of the attention-transfer factors.")

    cel_rules: ClassVar = (
        CelRule(
            "self.objectives.all(o, self.objectives.exists_one(p, p == o))",
            "objectives must not repeat",
        ),
        CelRule(
            "size(self.objectives) == 1 || !self.objectives.exists(o, o == 'sequence' || o == 'on-policy')",
            "sequence and on-policy each stand alone in their stage",
        ),
    )

    @model_validator(mode="after")
    def _unique_objectives(self) -> Stage:
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError("objectives must not repeat")
        if len(self.objectives) > 1 and set(self.objectives) & set(GENERATIVE_OBJECTIVES):
            raise ValueError(f"sequence and on-policy each stand alone in their stage (got {self.objectives})")
        return self


class LayerPair(ApiModel):
    student: int = Field(ge=0, le=4096, description="Student layer index.")
    teacher: int = Field(ge=0, le=4096, description="Teacher layer index.")


class TeacherCache(ApiModel):
    enabled: bool = Field(
        False,
        description="Compute teacher top-k logits once, store them on the checkpoint volume and reuse them.",
    )
    top_k: int = Field(64, ge=1, le=1_000_000, description="Logits kept per token.")


class Generation(ApiModel):
    samples_per_prompt: int = Field(1, ge=1, le=64, description="Completions the teacher writes per prompt.")
    max_new_tokens: int = Field(256, ge=1, le=131072, description="Longest completion.")
    temperature: float = Field(0.7, ge=0.0, le=100.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")


class OnPolicy(ApiModel):
    lambda_: float = Field(
        1.0,
        alias="lambda",
        ge=0.0,
        le=1.0,
        description="Fraction of batches whose completions the student samples; the rest use the dataset's text.",
    )
    beta: float = Field(
        1.0, ge=0.0, le=1.0, description="Generalised JSD between teacher and student: 0 forward KL, 1 reverse KL."
    )
    max_new_tokens: int = Field(128, ge=1, le=131072, description="Longest completion the student samples.")
    top_k: int = Field(
        64, ge=1, le=1024, description="Teacher log-probs per student token; the rest form a tail bucket."
    )
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="The student's sampling temperature.")


class CrossTokenizer(ApiModel):
    method: Literal["uld", "byte-span"] = Field(
        description="How logits KD matches a student whose tokenizer differs from the teacher's: uld "
        "(Universal Logit Distillation: sorted probability vectors) or byte-span (tokens aligned by "
        "their byte offsets in the text)."
    )


def _default_stages() -> list[Stage]:
    return [Stage(name="output", steps=1000, objectives=["logits"])]


class Distillation(ApiModel):
    loss: Literal["forward-kl", "reverse-kl", "jsd"] = Field(
        "forward-kl", description="Divergence between temperature-softened teacher and student."
    )
    alpha: float = Field(
        0.7, ge=0.0, le=1.0, description="Weight of the distillation term; 1-alpha goes to hard-label CE."
    )
    temperature: Temperature = Field(default_factory=Temperature, description="Temperature schedule.")
    stages: list[Stage] = Field(
        default_factory=_default_stages,
        min_length=1,
        max_length=16,
        description="Run in order, each with its own objectives.",
    )
    layer_map: list[LayerPair] = Field(
        default_factory=list,
        max_length=1024,
        description="Student→teacher layer pairs for hidden/attention objectives; empty: evenly spaced.",
    )
    teacher_cache: TeacherCache = Field(default_factory=TeacherCache, description="Teacher logit cache.")
    generation: Generation = Field(
        default_factory=Generation, description="How the teacher writes completions (objective sequence)."
    )
    on_policy: OnPolicy = Field(default_factory=OnPolicy, description="Objective on-policy (GKD / MiniLLM family).")
    cross_tokenizer: CrossTokenizer | None = Field(
        None, description="Used by logits when the student's vocabulary differs from the teacher's."
    )
    batch_size: int = Field(
        32,
        ge=1,
        le=1_000_000,
        description="Global batch of one optimizer step, over data ranks and accumulation.",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=10_000, description="Micro-batches per step.")
    learning_rate: float = Field(5.0e-4, gt=0.0, le=10.0, description="Peak learning rate (cosine decay).")
    warmup_steps: int = Field(100, ge=0, le=10_000_000, description="Linear warm-up steps.")
    weight_decay: float = Field(0.01, ge=0.0, le=10.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6, description="Gradient clipping; 0 turns it off.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of every random generator.")

    cel_rules: ClassVar = (
        CelRule(
            "self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
            "stage names must be unique",
        ),
    )

    @model_validator(mode="after")
    def _unique_stage_names(self) -> Distillation:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique (repeated: {', '.join(dupes)})")
        return self

    @property
    def distill_steps(self) -> int:
        return sum(s.steps for s in self.stages)


class Quantization(ApiModel):
    mode: Literal["none", "ptq-int8", "qat-int8"] = Field(
        "qat-int8",
        description="none keeps full precision; ptq-int8 quantizes after training; qat-int8 adds a QAT phase.",
    )
    qat_steps: int = Field(200, ge=0, le=10_000_000, description="Steps of the QAT phase (qat-int8).")
    reduced_precision_fraction: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Share of the QAT phase run in bf16/fp16 before INT8 fake quantization.",
    )

    cel_rules: ClassVar = (
        CelRule("self.mode != 'qat-int8' || self.qatSteps > 0", "qatSteps must be > 0 when mode is qat-int8"),
    )

    @model_validator(mode="after")
    def _qat_needs_steps(self) -> Quantization:
        if self.mode == "qat-int8" and self.qat_steps <= 0:
            raise ValueError("qatSteps must be > 0 when mode is qat-int8")
        return self

    @property
    def phase_steps(self) -> int:
        return self.qat_steps if self.mode == "qat-int8" else 0


class StudentParallelism(ApiModel):
    data: int = Field(1, ge=1, le=4096, description="Data-parallel replicas (DDP).")
    tensor: int = Field(1, ge=1, le=64, description="Tensor-parallel shards (DTensor).")
    pipeline: int = Field(1, ge=1, le=64, description="Pipeline stages (torch.distributed.pipelining).")


DEFAULT_RAMP_SHARE = 0.25  # of the job's steps, when rampSteps is unset


class GradientCompression(ApiModel):
    top_k: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of gradient entries sent per step (0.01 = 99% compression), with "
        "error feedback; 0 turns compression off.",
    )
    warmup_steps: int = Field(
        10,
        ge=0,
        le=10_000_000,
        description="Uncompressed steps first; with freezeVariance they estimate AdamW's second moment.",
    )
    ramp_steps: int | None = Field(
        None,
        ge=0,
        le=10_000_000,
        description="Steps after the warm-up over which the kept fraction decays exponentially from "
        "rampFrom to topK, counted like warmupSteps in micro-batches; unset: 25% of the job's "
        "micro-batches (its steps times gradientAccumulationSteps).",
    )
    ramp_from: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Fraction of gradient entries sent at the ramp's start (1 = all of them); a topK "
        "above it is sent throughout. Unset: the densest start that keeps the whole run within "
        "byteBudget.",
    )
    byte_budget: float = Field(
        0.05,
        gt=0.0,
        le=1.0,
        description="Share of plain all-reduce's bytes the whole run may send (0.05: 20x fewer), "
        "spent on the ramp when rampFrom is unset: the ramp starts at the densest fraction that fits. "
        "It does not shorten the warm-up or lower topK; a run whose warm-up and topK alone exceed "
        "it ramps from topK and logs a warning.",
    )
    freeze_variance: bool = Field(
        True,
        description="Freeze AdamW's second moment of matrices when compression starts (1-bit Adam): "
        "compressed, error-fed gradients arrive as spikes that would otherwise shrink every update.",
    )
    selection: Literal["update", "magnitude"] = Field(
        "update",
        description="Which entries top-k keeps: 'update' ranks them by the step AdamW would take for "
        "them (gradient plus residual over the root of AdamW's second moment), 'magnitude' by the "
        "gradient plus residual alone.",
    )
    compress: Literal["momentum", "gradient"] = Field(
        "momentum",
        description="What top-k sends for matrices: 'momentum' has each rank fold its gradient into its own "
        "momentum (AdamW's beta1) and send top-k of momentum plus residual, which AdamW applies as its first "
        "moment with the frozen variance (needs freezeVariance); 'gradient' sends top-k of gradient plus "
        "residual into AdamW's momentum.",
    )

    cel_rules: ClassVar = (
        CelRule(
            "self.topK == 0.0 || self.compress != 'momentum' || self.freezeVariance",
            "compress: momentum needs freezeVariance: true (set compress: gradient for a moving variance)",
        ),
    )

    def ramp_for(self, micro_batches: int) -> int:
        """The ramp's length in the hook's steps (micro-batches, as warmupSteps counts them):
        rampSteps, or 25% of the job's ``micro_batches`` when unset, so that the ramp's share of
        the bytes stays the same whatever the run's length."""
        if self.ramp_steps is not None:
            return self.ramp_steps
        return math.ceil(DEFAULT_RAMP_SHARE * micro_batches)

    @model_validator(mode="after")
    def _momentum_needs_frozen_variance(self) -> GradientCompression:
        if self.top_k > 0 and self.compress == "momentum" and not self.freeze_variance:
            raise ValueError(
                "compress: momentum needs freezeVariance: true (set compress: gradient for a moving variance)"
            )
        return self


_CEL_WORLD = "(self.nodes * (self.gpusPerNode == 0 ? 1 : self.gpusPerNode))"


class Parallelism(ApiModel):
    nodes: int = Field(1, ge=1, le=1024, description="Worker pods.")
    gpus_per_node: int = Field(
        1, ge=0, le=16, description="Processes (GPUs) per pod; 0 means one CPU process with gloo."
    )
    teacher_pipeline_stages: int = Field(
        1, ge=1, le=1024, description="The teacher is split by layers over this many ranks."
    )
    student: StudentParallelism = Field(
        default_factory=StudentParallelism, description="Its product must equal the world size."
    )
    gradient_compression: GradientCompression = Field(
        default_factory=GradientCompression, description="Top-k gradient compression."
    )

    cel_rules: ClassVar = (
        CelRule(
            f"self.student.data * self.student.tensor * self.student.pipeline == {_CEL_WORLD}",
            "student.data * student.tensor * student.pipeline must equal the world size nodes * max(gpusPerNode, 1)",
        ),
        CelRule(
            f"{_CEL_WORLD} % self.teacherPipelineStages == 0",
            "teacherPipelineStages must divide the world size nodes * max(gpusPerNode, 1)",
        ),
    )

    @property
    def procs_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @model_validator(mode="after")
    def _mesh_fits_world(self) -> Parallelism:
        s = self.student
        if s.data * s.tensor * s.pipeline != self.world_size:
            raise ValueError(
                f"student.data * student.tensor * student.pipeline "
                f"({s.data}*{s.tensor}*{s.pipeline} = {s.data * s.tensor * s.pipeline}) must equal "
                f"the world size nodes * max(gpusPerNode, 1) = {self.world_size}"
            )
        if self.world_size % self.teacher_pipeline_stages:
            raise ValueError(
                f"teacherPipelineStages ({self.teacher_pipeline_stages}) must divide the world size "
                f"nodes * max(gpusPerNode, 1) = {self.world_size}"
            )
        return self


class CheckpointVolume(ApiModel):
    claim_name: DnsName | None = Field(None, description="An existing PersistentVolumeClaim.")
    storage_class_name: str | None = Field(
        None, max_length=253, description="With size: the operator creates the PVC in this class."
    )
    size: Quantity | None = Field(None, description="With storageClassName: size of the PVC to create.")

    cel_rules: ClassVar = (
        CelRule(
            "has(self.claimName) != has(self.size)",
            "set exactly one of claimName (an existing PVC) or size (the operator creates one)",
        ),
        CelRule(
            "!has(self.claimName) || !has(self.storageClassName)",
            "storageClassName goes with size, not with claimName",
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> CheckpointVolume:
        if (self.claim_name is None) == (self.size is None):
            raise ValueError("set exactly one of claimName (an existing PVC) or size (the operator creates one)")
        if self.claim_name is not None and self.storage_class_name is not None:
            raise ValueError("storageClassName goes with size, not with claimName")
        return self


class Checkpoint(ApiModel):
    every_steps: int = Field(200, ge=1, le=10_000_000, description="Checkpoint interval in steps.")
    keep: int = Field(3, ge=1, le=1000, description="Newest checkpoints kept.")
    volume: CheckpointVolume | None = Field(
        None,
        description="Where checkpoints and outputs live in the cluster (ReadWriteMany when nodes > 1).",
    )


class FailurePolicy(ApiModel):
    max_restarts: int = Field(3, ge=0, le=1000, description="Gang restarts before the job fails.")
    backoff_seconds: int = Field(30, ge=0, le=86400, description="Wait before a restart; doubles with each restart.")
    pending_timeout_seconds: int = Field(
        600,
        ge=1,
        le=604800,
        description="Pods Pending longer than this (unschedulable, image pull errors) fail the job.",
    )


class PodTemplate(ApiModel):
    image: str | None = Field(None, max_length=1024, description="Worker image; default: the operator's trainer image.")
    resources: KubeObject = Field(
        default_factory=dict,
        description="Container resources; nvidia.com/gpu: gpusPerNode is added when gpusPerNode > 0.",
    )
    env: list[KubeObject] = Field(default_factory=list, description="Extra environment variables.")
    volumes: list[KubeObject] = Field(default_factory=list, description="Extra pod volumes.")
    volume_mounts: list[KubeObject] = Field(default_factory=list, description="Extra volume mounts.")
    image_pull_secrets: list[KubeObject] = Field(default_factory=list, description="Image pull secrets.")
    service_account_name: str = Field(
        "", max_length=253, description="Default: a per-job ServiceAccount the operator creates."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[KubeObject] = Field(default_factory=list, description="Pod tolerations.")
    affinity: KubeObject = Field(default_factory=dict, description="Pod affinity.")
    priority_class_name: str = Field("", max_length=253, description="Pod priorityClassName.")
    scheduler_name: str = Field("", max_length=253, description="e.g. volcano or a coscheduling scheduler, for gangs.")
    shm_size: Quantity = Field("1Gi", description="Size of /dev/shm for dataloaders and NCCL.")


class Autoscaling(ApiModel):
    min_replicas: int = Field(0, ge=0, le=10000, description="HPA minimum replicas.")
    max_replicas: int = Field(0, ge=0, le=10000, description="An HPA is created when > 0.")

    cel_rules: ClassVar = (
        CelRule(
            "self.maxReplicas == 0 || self.maxReplicas >= self.minReplicas",
            "maxReplicas must be >= minReplicas when autoscaling is on",
        ),
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.max_replicas and self.max_replicas < self.min_replicas:
            raise ValueError("maxReplicas must be >= minReplicas when autoscaling is on")
        return self


class QualityGate(ApiModel):
    min_retention: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Student metric / teacher metric on eval (of the served artifact); below it, no rollout.",
    )


class Batching(ApiModel):
    max_batch_size: int = Field(64, ge=1, le=4096, description="Requests per batch.")
    max_batch_tokens: int = Field(8192, ge=1, le=10_000_000, description="Padded tokens per batch.")
    max_wait_ms: int = Field(10, ge=0, le=60_000, description="Longest wait of the oldest queued request.")
    max_queue: int = Field(
        1024, ge=1, le=1_000_000, description="Queued requests beyond this get 429 with Retry-After."
    )


# An http(s) URL with a host; the server appends the protocol's path (/v1/completions, ...).
ENDPOINT_PATTERN = r"^https?://[^\s/]+(/[^\s]*)?$"


class Fallback(ApiModel):
    """Cascade serving: the student answers what it is confident about, the teacher the rest."""

    endpoint: str = Field(
        min_length=1,
        max_length=1024,
        pattern=ENDPOINT_PATTERN,
        description="Base URL of the teacher's server, e.g. http://JOB-teacher:8080: kdistill serve, or for "
        "causal LMs any OpenAI-compatible server (vLLM, TGI). The student's server appends the request's "
        "own path (/v1/completions, /v1/chat/completions, /v1/classify), so give it without /v1.",
    )
    min_confidence: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="The student answers when its confidence reaches this, else the request goes to the "
        "teacher. Classification: the top class probability. Causal LM: exp(mean log-prob of the generated "
        "tokens), the per-token geometric-mean probability (0.6 means a mean log-prob >= ln 0.6 = -0.51). "
        "0 never forwards.",
    )
    timeout_seconds: float = Field(
        30.0,
        gt=0.0,
        le=600.0,
        description="The whole teacher call, connection included; past it the request gets 504 (or the "
        "student's answer, with onTeacherError student).",
    )
    model: str = Field(
        "",
        max_length=256,
        description="The model field sent to the teacher (vLLM and hosted APIs require their served name); "
        "empty sends none, which kdistill serve accepts.",
    )
    on_teacher_error: Literal["fail", "student"] = Field(
        "fail",
        description="When the teacher fails or times out: fail answers 502 / 504; student answers with the "
        "student's own answer, marked as a fallback error.",
    )
    max_in_flight: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Teacher requests open at once per server replica; more wait for a connection, "
        "within timeoutSeconds.",
    )


class Serving(ApiModel):
    enabled: bool = Field(True, description="Roll the INT8 student out as a Deployment.")
    name: DnsName = Field("", description="Default <job>-serving; jobs that share a name roll into one Deployment.")
    replicas: int = Field(1, ge=0, le=10000, description="Server replicas.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Optional HPA.")
    image: str | None = Field(None, max_length=1024, description="Default: the operator's server image.")
    port: int = Field(8080, ge=1, le=65535, description="HTTP port.")
    resources: KubeObject = Field(default_factory=dict, description="Server container resources.")
    quality_gate: QualityGate = Field(default_factory=QualityGate, description="Rollout gate.")
    batching: Batching = Field(default_factory=Batching, description="Dynamic batching.")
    fallback: Fallback | None = Field(
        None,
        description="Cascade serving: forward what the student is not confident about to the teacher's "
        "endpoint. Absent: the student answers everything.",
    )


# A split student (tensor or pipeline parallel) runs logits KD and hidden/attention transfer of a
# causal LM or a decoder sequence classifier (each mapped layer's term is computed on the stage
# that holds it; a classifier's last stage pools and scores), with QAT, the teacher cache and
# entropy weighting; the features below need the whole model.
# SPLIT_STUDENT_RULES is the one table of these rules: the CRD's CEL rules are generated from it,
# DistillationJobSpec's validator checks it, and the trainer's start-up check
# (trainer/parallel/runtime.check_model_parallel) refuses what it lists for specs that bypassed the API.
_CEL_SPLIT_STUDENT = "(self.parallelism.student.tensor > 1 || self.parallelism.student.pipeline > 1)"
SPLIT_STUDENT = "a split student (parallelism.student tensor > 1 or pipeline > 1)"


@dataclass(frozen=True)
class SplitStudentRule:
    cel: str  # true when a split student can run the spec (CEL over the spec object)
    allows: Callable[[DistillationJobSpec], bool]  # the same test in Python
    why: str  # what a split student cannot do, and what to do instead
    found: Callable[[DistillationJobSpec], str] | None = None  # what the spec asked for, for the message

    def problem(self, spec: DistillationJobSpec) -> str | None:
        if self.allows(spec):
            return None
        return f"{self.why} ({self.found(spec)})" if self.found else self.why


_SPLIT_OBJECTIVES = {"logits", "hidden", "attention"}


def _objectives(spec: DistillationJobSpec) -> set[str]:
    return {o for stage in spec.distillation.stages for o in stage.objectives}


SPLIT_STUDENT_RULES: tuple[SplitStudentRule, ...] = (
    SplitStudentRule(
        "self.distillation.stages.all(s, s.objectives.all(o, o == 'logits' || o == 'hidden' || o == 'attention'))",
        lambda spec: _objectives(spec) <= _SPLIT_OBJECTIVES,
        "distills with the logits, hidden and attention objectives only (no sequence or on-policy)",
        lambda spec: f"objectives {sorted(_objectives(spec) - _SPLIT_OBJECTIVES)}",
    ),
)


def split_student_problems(spec: DistillationJobSpec) -> list[str]:
    """Why a split student cannot run `spec` (empty: it can, or the student is not split)."""
    st = spec.parallelism.student
    if st.tensor == 1 and st.pipeline == 1:
        return []
    return [p for rule in SPLIT_STUDENT_RULES if (p := rule.problem(spec)) is not None]


class DistillationJobSpec(ApiModel):
    task: Task = Field(description="causal-lm or sequence-classification.")
    teacher: Teacher = Field(description="The model to distill from.")
    student: Student = Field(description="Exactly one of model and fromTeacher.")
    data: Data = Field(description="Training and evaluation data.")
    distillation: Distillation = Field(default_factory=Distillation, description="How to distill.")
    quantization: Quantization = Field(default_factory=Quantization, description="Progressive quantization.")
    parallelism: Parallelism = Field(default_factory=Parallelism, description="Process layout.")
    checkpoint: Checkpoint = Field(default_factory=Checkpoint, description="Checkpointing.")
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, description="Restarts.")
    template: PodTemplate = Field(default_factory=PodTemplate, description="Worker pod settings.")
    serving: Serving = Field(default_factory=Serving, description="Inference rollout.")
    suspend: bool = Field(False, description="true deletes the worker pods and keeps checkpoints.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=31_536_000, description="Delete a finished job's training objects after this."
    )

    # Fields whose change would invalidate the run; enforced by CEL transition rules.
    IMMUTABLE: ClassVar[tuple[str, ...]] = (
        "task",
        "teacher",
        "student",
        "data",
        "distillation",
        "quantization",
        "parallelism",
        "checkpoint",
    )

    cel_rules: ClassVar = (
        CelRule(
            "self.task != 'sequence-classification' || size(self.data.labelField) > 0",
            "data.labelField is required for sequence-classification",
        ),
        CelRule(
            "!self.serving.enabled || has(self.data.eval)",
            "data.eval is required when serving.enabled, because the quality gate needs it",
        ),
        CelRule(
            "self.distillation.batchSize % (self.parallelism.student.data * "
            "self.distillation.gradientAccumulationSteps) == 0",
            "distillation.batchSize must be divisible by parallelism.student.data * "
            "distillation.gradientAccumulationSteps",
        ),
        CelRule(
            "!has(self.student.fromTeacher) || has(self.teacher.model)",
            "student.fromTeacher derives the student from teacher.model: set it, or give student.model",
        ),
        CelRule(
            "self.task == 'causal-lm' || !self.distillation.stages.exists(s, s.objectives.exists("
            "o, o == 'sequence' || o == 'on-policy'))",
            "the sequence and on-policy objectives train causal-LM students only",
        ),
        CelRule(
            "!(self.teacher.serve.enabled || size(self.teacher.endpoint) > 0) || "
            "(self.task == 'causal-lm' && self.parallelism.teacherPipelineStages == 1 && "
            "!self.distillation.stages.exists(s, s.objectives.exists(o, o == 'hidden' || o == 'attention')))",
            "a served teacher (teacher.endpoint or teacher.serve) scores causal-LM tokens only: no hidden or "
            "attention objectives, no sequence-classification, parallelism.teacherPipelineStages 1",
        ),
        *(
            CelRule(f"!{_CEL_SPLIT_STUDENT} || {rule.cel}", f"{SPLIT_STUDENT} {rule.why}")
            for rule in SPLIT_STUDENT_RULES
        ),
    )

    @model_validator(mode="after")
    def _cross_section_rules(self) -> DistillationJobSpec:
        if self.task == "sequence-classification" and not self.data.label_field:
            raise ValueError("data.labelField is required for sequence-classification")
        if self.serving.enabled and self.data.eval is None:
            raise ValueError("data.eval is required when serving.enabled, because the quality gate needs it")
        per_step = self.parallelism.student.data * self.distillation.gradient_accumulation_steps
        if self.distillation.batch_size % per_step:
            raise ValueError(
                f"distillation.batchSize ({self.distillation.batch_size}) must be divisible by "
                f"parallelism.student.data * distillation.gradientAccumulationSteps ({per_step})"
            )
        if self.student.from_teacher is not None and self.teacher.model is None:
            raise ValueError(
                "student.fromTeacher derives the student from teacher.model: set it, or give student.model"
            )
        if self.task != "causal-lm" and _objectives(self) & set(GENERATIVE_OBJECTIVES):
            raise ValueError(f"the sequence and on-policy objectives train causal-LM students only (task {self.task})")
        self._served_teacher_rules()
        self._split_student_rules()
        return self

    def _served_teacher_rules(self) -> None:
        """A teacher behind HTTP returns log-probs of tokens, nothing from inside the model."""
        if not self.teacher.remote:
            return
        problems = []
        if self.task != "causal-lm":
            problems.append(f"task {self.task}")
        if self.parallelism.teacher_pipeline_stages != 1:
            problems.append(f"parallelism.teacherPipelineStages {self.parallelism.teacher_pipeline_stages}")
        if features := sorted(_objectives(self) & set(FEATURE_OBJECTIVES)):
            problems.append(f"objectives {features}")
        if problems:
            raise ValueError(
                "a served teacher (teacher.endpoint or teacher.serve) scores causal-LM tokens only: no hidden "
                "or attention objectives, no sequence-classification, parallelism.teacherPipelineStages 1 "
                f"(got {', '.join(problems)})"
            )

    def _split_student_rules(self) -> None:
        """What the loop cannot run with a tensor/pipeline-split student: static facts of the
        spec, so the API rejects them before any pod starts."""
        problems = split_student_problems(self)
        if problems:
            st = self.parallelism.student
            raise ValueError(
                f"{SPLIT_STUDENT} (here tensor={st.tensor}, pipeline={st.pipeline}) " + "; ".join(problems)
            )

    @property
    def total_steps(self) -> int:
        return self.distillation.distill_steps + self.quantization.phase_steps

    @property
    def compression_ramp_steps(self) -> int:
        """The top-k density ramp's length in the hook's steps (micro-batches) for this job."""
        micro_batches = self.total_steps * self.distillation.gradient_accumulation_steps
        return self.parallelism.gradient_compression.ramp_for(micro_batches)
