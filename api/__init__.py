"""The typed DistillationJob and DistillationSchedule API (kdistill.io/v1alpha1). Imports pydantic only."""

from .job import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    DistillationJob,
    FieldError,
    JobValidationError,
    load_job,
    parse_job,
)
from .resources import load_resource
from .schedule import (
    SCHEDULE_KIND,
    SCHEDULE_PLURAL,
    SCHEDULE_SHORT_NAMES,
    DistillationSchedule,
    DistillationScheduleSpec,
    DistillationScheduleStatus,
    load_schedule,
    parse_schedule,
)
from .spec import DistillationJobSpec
from .status import PHASES, TRAINER_STATUS_FIELDS, DistillationJobStatus
from .uris import SourceUri, parse_source_uri, pvc_claims

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PHASES",
    "PLURAL",
    "SCHEDULE_KIND",
    "SCHEDULE_PLURAL",
    "SCHEDULE_SHORT_NAMES",
    "SHORT_NAMES",
    "SINGULAR",
    "TRAINER_STATUS_FIELDS",
    "VERSION",
    "DistillationJob",
    "DistillationJobSpec",
    "DistillationJobStatus",
    "DistillationSchedule",
    "DistillationScheduleSpec",
    "DistillationScheduleStatus",
    "FieldError",
    "JobValidationError",
    "SourceUri",
    "load_job",
    "load_resource",
    "load_schedule",
    "parse_job",
    "parse_schedule",
    "parse_source_uri",
    "pvc_claims",
]
