"""The whole `DistillationJob` object and loading it from YAML with precise errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import Field, ValidationError
from pydantic_core import ErrorDetails

from .base import ApiModel
from .spec import DistillationJobSpec
from .status import DistillationJobStatus

# Final literals: the models' Literal fields take them as defaults.
API_VERSION: Final = "kdistill.io/v1alpha1"
GROUP, _, VERSION = API_VERSION.partition("/")
KIND: Final = "DistillationJob"
PLURAL = "distillationjobs"
SINGULAR = "distillationjob"
SHORT_NAMES = ["dj"]
DEFAULT_NAMESPACE = "default"


class ObjectMeta(ApiModel):
    """The part of metav1.ObjectMeta that matters to a job file; the rest passes through."""

    model_config = {**ApiModel.model_config, "extra": "allow"}

    name: str = Field(max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", description="Job name.")
    namespace: str | None = Field(None, description="Namespace.")


class DistillationJob(ApiModel):
    api_version: Literal["kdistill.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["DistillationJob"] = KIND
    metadata: ObjectMeta
    spec: DistillationJobSpec
    status: DistillationJobStatus | None = None

    @property
    def namespace(self) -> str:
        """The job's namespace; a job file without one lands in Kubernetes' default namespace."""
        return self.metadata.namespace or DEFAULT_NAMESPACE


class FieldError(ValueError):
    """One problem in a job, located by its dotted field path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class JobValidationError(ValueError):
    """Every problem found in a job, each with its field path."""

    def __init__(self, source: str, errors: list[FieldError]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {e.path}: {e.message}" for e in errors)
        super().__init__(f"{source}: {len(errors)} error(s)\n{lines}")


def _format_loc(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif str(part).startswith("function-after") or str(part) in ("str", "int", "float"):
            continue  # pydantic's internal validator names, not fields
        else:
            path += f".{part}" if path else str(part)
    return path or "(root)"


def _describe(err: ErrorDetails) -> str:
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown field (check the spelling against docs/api.md)"
    if err["type"] == "literal_error":
        return f"got {err['input']!r}; {msg[0].lower()}{msg[1:]}"
    if err["type"] == "missing":
        return "required field is missing"
    return msg


def errors_from_validation(exc: ValidationError) -> list[FieldError]:
    return [FieldError(_format_loc(tuple(e["loc"])), _describe(e)) for e in exc.errors()]


def parse_job(obj: Any, source: str = "<job>") -> DistillationJob:
    """Validate a job given as a dict; raise JobValidationError listing every problem."""
    if not isinstance(obj, dict):
        raise JobValidationError(source, [FieldError("(root)", "a job must be a YAML mapping")])
    try:
        return DistillationJob.model_validate(obj)
    except ValidationError as exc:
        raise JobValidationError(source, errors_from_validation(exc)) from None


def read_document(path: str | Path) -> Any:
    """The one YAML document of a file; JobValidationError if it cannot be read or is not one."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise JobValidationError(str(path), [FieldError("(file)", f"cannot read: {exc.strerror}")]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise JobValidationError(str(path), [FieldError("(file)", f"not valid YAML: {exc}")]) from None
    if len(docs) != 1:
        raise JobValidationError(str(path), [FieldError("(file)", f"expected one YAML document, found {len(docs)}")])
    return docs[0]


def load_job(path: str | Path) -> DistillationJob:
    """Read and validate a job YAML file."""
    return parse_job(read_document(path), str(path))
