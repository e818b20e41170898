"""The typed DistillationJob API (kdistill.io/v1alpha1). Imports pydantic only."""

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
from .spec import DistillationJobSpec
from .status import PHASES, TRAINER_STATUS_FIELDS, DistillationJobStatus
from .uris import SourceUri, parse_source_uri, pvc_claims

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PHASES",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "TRAINER_STATUS_FIELDS",
    "VERSION",
    "DistillationJob",
    "DistillationJobSpec",
    "DistillationJobStatus",
    "FieldError",
    "JobValidationError",
    "SourceUri",
    "load_job",
    "parse_job",
    "parse_source_uri",
    "pvc_claims",
]
