"""The `DistillationSchedule` (kdistill.io/v1alpha1): DistillationJobs on a cron, over fresh data.

A schedule creates a job from `jobTemplate` at each run time, fills the job's training and eval
data from a folder of partitions (the newest `window` as fresh data, a `replay` share drawn from
older ones), and promotes the finished student only if it passes `promotion.gate`.

The job template is a DistillationJob spec in which `data.train` and `data.eval` are left out:
each run fills them. pydantic validates it as a DistillationJobSpec with placeholders in those
two fields, so every rule of the job applies with its own field path under
`spec.jobTemplate.spec`. The CRD embeds the DistillationJob spec schema with `data.train` not
required and one rule dropped: the one that asks for `data.eval` when serving is on (a run
always has eval data). Like api/spec.py, every rule here exists as a pydantic check and as the
CEL rule beside it; tests/schedule_table.py keeps them in step.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, Field, ValidationError, field_serializer, model_validator

from .base import ApiModel
from .cron import CRON_PATTERN, CronError, parse_cron, zone
from .job import (
    API_VERSION,
    DEFAULT_NAMESPACE,
    FieldError,
    JobValidationError,
    ObjectMeta,
    errors_from_validation,
    read_document,
)
from .spec import Cel, DistillationJobSpec, SourceUri

SCHEDULE_KIND: Final = "DistillationSchedule"
SCHEDULE_PLURAL = "distillationschedules"
SCHEDULE_SINGULAR = "distillationschedule"
SCHEDULE_SHORT_NAMES = ["dsch"]

# What a template's data.train and data.eval hold while pydantic checks the template; each run
# replaces both with the files it writes.
FILLED_PER_RUN: Final = "filled-per-run"
# Job names are <schedule>-<unix minutes> (at most 8 digits for centuries): the schedule's name
# leaves room for them within a DNS label.
MAX_NAME_LENGTH = 52
# An IANA zone name; whether it exists is checked by pydantic (zoneinfo), not by the API server.
TIME_ZONE_PATTERN = r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$"


def _check_cron(value: str) -> str:
    try:
        parse_cron(value)
    except CronError as exc:
        raise ValueError(f"not a cron schedule: {exc}") from None
    return value


def _check_zone(value: str) -> str:
    zone(value)
    return value


# pydantic checks a schedule and a zone by parsing them, which says more than a failed pattern;
# the API server, which cannot, gets the patterns as CEL rules with the same meaning in words.
CRON_MESSAGE = (
    "not a cron schedule: five fields (minute 0-59, hour 0-23, day of month 1-31, month 1-12 or jan-dec, "
    "day of week 0-7 or sun-sat), each *, N, N-M or a list of them with an optional /STEP, or a macro "
    "such as @daily"
)
Schedule = Annotated[
    str,
    Field(min_length=1, max_length=256),
    AfterValidator(_check_cron),
    Cel(f"self.matches(r'{CRON_PATTERN}')", CRON_MESSAGE),
]
TimeZone = Annotated[
    str,
    Field(min_length=1, max_length=64),
    AfterValidator(_check_zone),
    Cel(f"self.matches(r'{TIME_ZONE_PATTERN}')", "not a time zone name: an IANA name such as UTC or Europe/Berlin"),
]


class Replay(ApiModel):
    fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of each run's training examples drawn from older partitions, against forgetting; "
        "the rest is fresh data.",
    )
    partitions: int = Field(
        7, ge=1, le=10_000, description="How many partitions before the window the replay draws from (the newest ones)."
    )


class ScheduleData(ApiModel):
    partitions: SourceUri = Field(
        description="A folder of partitions, one subfolder each holding train.jsonl and eval.jsonl; "
        "sorted by name, newest last (dated names such as 2026-11-30 sort so)."
    )
    window: int = Field(1, ge=1, le=10_000, description="The newest partitions that form each run's fresh data.")
    replay: Replay = Field(default_factory=Replay, description="Older data mixed into each run.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds the replay draw, with the run's time.")


class Gate(ApiModel):
    min_retention: float = Field(
        0.9, gt=0.0, le=1.0, description="The challenger's metric over the teacher's, on the newest eval data."
    )
    must_beat_serving: bool = Field(
        True, description="The challenger must score at least the served student on the newest eval data."
    )
    tolerance: float = Field(
        0.005, ge=0.0, le=1.0, description="How far below the served student a challenger may score and still pass."
    )
    max_forgetting: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="Largest relative loss of quality against the served student on the older partitions' eval data.",
    )


class Canary(ApiModel):
    weight: int = Field(10, ge=1, le=99, description="Percent of the traffic the challenger serves.")
    analysis_seconds: int = Field(600, ge=1, le=86_400, description="How long the canary is judged.")
    max_error_rate: float = Field(0.01, ge=0.0, le=1.0, description="Largest share of failed requests.")
    max_p99_ms: float = Field(300.0, gt=0.0, le=600_000.0, description="Largest p99 latency in milliseconds.")


class Promotion(ApiModel):
    gate: Gate = Field(default_factory=Gate, description="Champion against challenger.")
    canary: Canary = Field(default_factory=Canary, description="The challenger beside the champion, then promoted.")


class TemplateMeta(ApiModel):
    labels: dict[str, str] = Field(default_factory=dict, description="Labels of each job.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of each job.")


class JobTemplate(ApiModel):
    metadata: TemplateMeta = Field(default_factory=TemplateMeta, description="Labels and annotations of each job.")
    spec: DistillationJobSpec = Field(
        description="A DistillationJob spec without data.train and data.eval, which each run fills."
    )

    @model_validator(mode="before")
    @classmethod
    def _placeholders(cls, value: Any) -> Any:
        """Fill data.train/eval for the check (they must be absent: a run's data replaces them)."""
        if not isinstance(value, dict) or not isinstance(value.get("spec"), dict):
            return value
        spec = dict(value["spec"])
        data = spec.get("data", {})
        if not isinstance(data, dict):
            return value
        # An empty string counts as left out, as it does for the API server (size(self) == 0).
        given = [k for k in ("train", "eval") if data.get(k) not in (None, "", FILLED_PER_RUN)]
        if given:
            raise ValueError(
                f"spec.data.{given[0]}: leave data.train and data.eval out of a schedule's job template; "
                "each run fills them from data.partitions"
            )
        spec["data"] = {**data, "train": FILLED_PER_RUN, "eval": FILLED_PER_RUN}
        return {**value, "spec": spec}

    @field_serializer("spec")
    def _without_placeholders(self, spec: DistillationJobSpec) -> dict[str, Any]:
        wire = spec.model_dump(by_alias=True, mode="json", exclude_none=True)
        for key in ("train", "eval"):
            wire["data"].pop(key, None)
        return wire

    def job_spec(self, train: str, eval: str) -> DistillationJobSpec:
        """The spec of one run: the template with the run's data."""
        wire = self.spec.model_dump(by_alias=True, mode="json", exclude_none=True)
        wire["data"].update(train=train, eval=eval)
        return DistillationJobSpec.model_validate(wire)


class DistillationScheduleSpec(ApiModel):
    schedule: Schedule = Field(
        description='When runs start: five cron fields ("0 3 * * *") or a macro such as @daily, in timeZone.'
    )
    time_zone: TimeZone = Field("UTC", description="The IANA time zone the schedule's wall-clock times are in.")
    suspend: bool = Field(False, description="true starts no new runs; running ones go on.")
    concurrency_policy: Literal["Forbid", "Replace"] = Field(
        "Forbid",
        description="A run due while another is active: Forbid skips it, Replace deletes the active one first.",
    )
    starting_deadline_seconds: int | None = Field(
        None,
        ge=1,
        le=31_536_000,
        description="A run missed (the operator was down) starts only if it is at most this late; "
        "unset: however late. Several missed runs start once, for the latest.",
    )
    successful_jobs_history_limit: int = Field(3, ge=0, le=1000, description="Succeeded jobs kept.")
    failed_jobs_history_limit: int = Field(1, ge=0, le=1000, description="Failed jobs kept.")
    data: ScheduleData = Field(description="Where each run's data comes from.")
    warm_start: Literal["none", "lastPromoted"] = Field(
        "none",
        description="lastPromoted starts each run's student from the promoted student's full-precision weights.",
    )
    promotion: Promotion = Field(default_factory=Promotion, description="When a run's student replaces the served one.")
    job_template: JobTemplate = Field(description="The DistillationJob each run creates.")


class ScheduleMeta(ObjectMeta):
    name: str = Field(
        max_length=MAX_NAME_LENGTH,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Schedule name; jobs are named <name>-<unix minutes>.",
    )


class PromotedRef(ApiModel):
    job: str = Field(description="The job whose student is served.")
    version: int = Field(ge=1, description="Counts promotions, 1 for the first.")
    retention: float | None = Field(None, description="Its retention when it was promoted.")


class HistoryEntry(ApiModel):
    job: str = Field(description="The run's job.")
    time: str | None = Field(None, description="When the decision was made (RFC 3339).")
    version: int | None = Field(None, description="The version it was promoted as; unset when refused.")
    retention: float | None = Field(None, description="Challenger metric over teacher metric, newest eval data.")
    serving_metric: float | None = Field(None, description="The served student's metric on the newest eval data.")
    challenger_metric: float | None = Field(None, description="The challenger's metric on the newest eval data.")
    forgetting: float | None = Field(None, description="Relative loss against the served student on older eval data.")
    promoted: bool = Field(description="Whether the run's student replaced the served one.")
    reason: str = Field(description="Why, with the figures.")


class CanaryStatus(ApiModel):
    job: str = Field(description="The challenger's run.")
    version: int = Field(ge=1, description="The version it is promoted as if the canary passes.")
    state: Literal["Starting", "Analysing", "Promoting"] = Field(
        description="Starting (its pods not ready yet), Analysing (judged on its servers' metrics), "
        "Promoting (the stable Deployment rolls to its model)."
    )
    start_time: str = Field(description="When the canary Deployment was created (RFC 3339).")
    analysis_start_time: str | None = Field(None, description="When its pods were all ready (RFC 3339).")
    replicas: int = Field(ge=1, description="Canary pods beside the champion's.")
    share: float = Field(ge=0.0, le=1.0, description="The canary's share of the pods, hence of the traffic.")
    gate: str = Field(description="The promotion gate's reason, with its figures.")
    retention: float | None = Field(None, description="The gate's retention of the challenger.")
    serving_metric: float | None = Field(None, description="The champion's metric on the newest eval data.")
    challenger_metric: float | None = Field(None, description="The challenger's metric on the newest eval data.")
    forgetting: float | None = Field(None, description="The gate's forgetting figure.")
    verdict: str | None = Field(None, description="The latest analysis, with its figures.")


class DistillationScheduleStatus(ApiModel):
    last_schedule_time: str | None = Field(None, description="The run time of the newest job created (RFC 3339).")
    last_successful_time: str | None = Field(None, description="When the newest succeeded job finished.")
    active: list[str] = Field(default_factory=list, description="Names of the running jobs.")
    promoted: PromotedRef | None = Field(None, description="The student being served.")
    history: list[HistoryEntry] = Field(default_factory=list, description="Each finished run's decision, newest last.")
    canary: CanaryStatus | None = Field(None, description="The challenger being judged beside the champion.")
    observed_generation: int | None = Field(None, description="Spec generation last acted on.")


class DistillationSchedule(ApiModel):
    api_version: Literal["kdistill.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["DistillationSchedule"] = SCHEDULE_KIND
    metadata: ScheduleMeta
    spec: DistillationScheduleSpec
    status: DistillationScheduleStatus | None = None

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or DEFAULT_NAMESPACE


_PLACEHOLDER_MESSAGE = re.compile(r"^spec\.data\.(train|eval): ")


def _errors(exc: ValidationError) -> list[FieldError]:
    out = []
    for err in errors_from_validation(exc):
        # The template's own check names its field inside the message; move it into the path.
        match = _PLACEHOLDER_MESSAGE.match(err.message)
        if match and err.path.endswith("jobTemplate"):
            out.append(FieldError(f"{err.path}.spec.data.{match.group(1)}", err.message[match.end() :]))
        else:
            out.append(err)
    return out


def parse_schedule(obj: Any, source: str = "<schedule>") -> DistillationSchedule:
    """Validate a schedule given as a dict; raise JobValidationError listing every problem."""
    if not isinstance(obj, dict):
        raise JobValidationError(source, [FieldError("(root)", "a schedule must be a YAML mapping")])
    try:
        return DistillationSchedule.model_validate(obj)
    except ValidationError as exc:
        raise JobValidationError(source, _errors(exc)) from None


def load_schedule(path: str | Path) -> DistillationSchedule:
    """Read and validate a schedule YAML file."""
    return parse_schedule(read_document(path), str(path))
