"""The `DistillationJob` status: progress fields written by trainer rank 0, the rest by the operator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel

Phase = Literal["Queued", "Pending", "Running", "Restarting", "Deploying", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]

# Fields rank 0 patches through the status subresource; the operator owns every other field.
TRAINER_STATUS_FIELDS: tuple[str, ...] = (
    "stage",
    "step",
    "totalSteps",
    "progress",
    "loss",
    "tokensPerSecond",
    "lastCheckpoint",
    "productiveSeconds",
)


class CheckpointRef(ApiModel):
    step: int = Field(ge=0, description="Step of the newest complete checkpoint.")
    time: str = Field(description="When it was written (RFC 3339).")


class Metrics(ApiModel):
    teacher: float | None = Field(None, description="Teacher's eval metric.")
    student: float | None = Field(None, description="Served student's eval metric.")
    retention: float | None = Field(
        None, description="student / teacher (teacher / student for perplexity and bits-per-byte)."
    )
    metric: str | None = Field(
        None,
        description="accuracy, perplexity, or bits-per-byte (a causal-LM student with its own tokenizer).",
    )
    # A scheduled run (data.runData) also scores the served student (the champion) and the older
    # partitions' eval data, for its schedule's promotion gate.
    champion: float | None = Field(
        None, description="Scheduled runs: the served student's metric on the same eval data (the newest partitions)."
    )
    student_older: float | None = Field(
        None, description="Scheduled runs: this student's metric on the older partitions' eval data."
    )
    champion_older: float | None = Field(
        None, description="Scheduled runs: the served student's metric on the older partitions' eval data."
    )


TeacherState = Literal["Starting", "Ready", "Unavailable", "Stopped", "External"]


class TeacherStatus(ApiModel):
    state: TeacherState = Field(
        description="Starting (workers wait for it), Ready, Unavailable (a running gang waits for it to come "
        "back), Stopped (the job ended or is suspended; its objects are deleted) or External (teacher.endpoint)."
    )
    url: str = Field("", description="What the workers get in KDISTILL_TEACHER_URL.")
    replicas: int | None = Field(None, ge=0, description="Teacher replicas asked for (teacher.serve).")
    ready_replicas: int | None = Field(None, ge=0, description="Teacher replicas available now (teacher.serve).")


class DepartedWorker(ApiModel):
    attempt: int = Field(ge=0, description="The gang attempt the worker pod belonged to.")
    reason: str = Field(
        description="Why it went: its DisruptionTarget reason (e.g. EvictionByEvictionAPI, PreemptionByScheduler, "
        "DeletionByTaintManager) or status.reason (Evicted)."
    )
    phase: str = Field("", description="The pod's last phase.")
    exit_code: int | None = Field(None, description="The trainer container's exit code, if it had ended.")
    message: str = Field("", description="The trainer's termination message (shortened), if any.")


class Condition(ApiModel):
    type: str = Field(description="Condition type, e.g. Ready, Training, Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, description="Generation the condition is about.")


class DistillationJobStatus(ApiModel):
    phase: Phase | None = Field(None, description="Where the job is in its life.")
    stage: str | None = Field(
        None,
        description="Current stage (trainer); WaitingForTeacher while the operator holds the workers back until "
        "the served teacher is ready.",
    )
    step: int | None = Field(None, ge=0, description="Optimizer steps done (trainer).")
    total_steps: int | None = Field(None, ge=0, description="Stage steps plus qatSteps.")
    progress: str | None = Field(None, description='step / totalSteps as a percentage, e.g. "34%".')
    loss: float | None = Field(None, description="Latest training loss.")
    tokens_per_second: float | None = Field(None, description="Training throughput.")
    restarts: int | None = Field(None, ge=0, description="Gang restarts counted against maxRestarts.")
    evictions: int | None = Field(None, ge=0, description="Restarts caused by evictions/preemptions.")
    resumes: int | None = Field(
        None, ge=0, description="Resumes after spec.suspend was cleared; each starts a new gang attempt."
    )
    last_checkpoint: CheckpointRef | None = Field(None, description="Newest complete checkpoint.")
    attempt: int | None = Field(
        None,
        ge=0,
        description="The current gang attempt (restarts + evictions + resumes; KDISTILL_ATTEMPT of its workers): a "
        "rank of an older attempt cannot write a checkpoint, a status patch or a result.",
    )
    productive_seconds: float | None = Field(
        None,
        ge=0,
        description="Training seconds that count (trainer): the steps kept in the newest checkpoint and those "
        "since; work lost to a restart is not counted.",
    )
    departed_workers: dict[str, DepartedWorker] | None = Field(
        None,
        description="Operator memory of disrupted worker pods by replica index, written when the pod watch sees "
        "one evicted or preempted, so that a restarted operator still counts it as an eviction once the pod is gone.",
    )
    goodput: float | None = Field(
        None,
        ge=0,
        description="productiveSeconds over the wall seconds since startTime (until completionTime once finished).",
    )
    metrics: Metrics | None = Field(None, description="Eval metrics of teacher and served student.")
    endpoint: str | None = Field(None, description="URL of the serving Service.")
    teacher: TeacherStatus | None = Field(None, description="The served or external teacher the workers use.")
    conditions: list[Condition] = Field(default_factory=list, description="metav1.Condition style.")
    observed_generation: int | None = Field(None, description="Spec generation last acted on.")
    start_time: str | None = Field(None, description="When training first started.")
    completion_time: str | None = Field(None, description="When the job finished.")
