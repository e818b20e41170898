"""Loading a file of either kind: the `kind` field says which model checks it."""

from __future__ import annotations

from pathlib import Path

from .job import KIND, DistillationJob, FieldError, JobValidationError, parse_job, read_document
from .schedule import SCHEDULE_KIND, DistillationSchedule, parse_schedule

KINDS = (KIND, SCHEDULE_KIND)


def load_resource(path: str | Path) -> DistillationJob | DistillationSchedule:
    """Read and validate a DistillationJob or DistillationSchedule YAML file."""
    doc = read_document(path)
    # A file without `kind` is a job, as parse_job's default says.
    kind = doc.get("kind", KIND) if isinstance(doc, dict) else None
    if not isinstance(doc, dict):
        return parse_job(doc, str(path))
    if kind == KIND:
        return parse_job(doc, str(path))
    if kind == SCHEDULE_KIND:
        return parse_schedule(doc, str(path))
    raise JobValidationError(
        str(path), [FieldError("kind", f"got {kind!r}; expected one of {', '.join(map(repr, KINDS))}")]
    )
