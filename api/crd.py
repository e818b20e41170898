"""Generate the CustomResourceDefinitions (DistillationJob, DistillationSchedule) from the pydantic models.

The schema is built by walking the models, not from pydantic's JSON schema, because a CRD
must be structural: no $ref, no anyOf for optionals, a type on every node. Defaults, enums,
bounds, descriptions and CEL rules come straight from the field declarations.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .base import ApiModel
from .job import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from .schedule import (
    MAX_NAME_LENGTH,
    SCHEDULE_KIND,
    SCHEDULE_PLURAL,
    SCHEDULE_SHORT_NAMES,
    SCHEDULE_SINGULAR,
    DistillationScheduleSpec,
    DistillationScheduleStatus,
)
from .spec import Cel, DistillationJobSpec
from .status import DistillationJobStatus

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Retention", "type": "number", "jsonPath": ".status.metrics.retention"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    # The Kueue LocalQueue a job waits in (phase Queued until its Workload is admitted).
    {"name": "Queue", "type": "string", "jsonPath": ".metadata.labels.kueue\\.x-k8s\\.io/queue-name"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _split_annotated(tp: Any) -> tuple[Any, list[Any]]:
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        inner, more = _split_annotated(base)
        return inner, [*more, *meta]
    return tp, []


def _apply_constraints(schema: dict[str, Any], metadata: list[Any]) -> None:
    for m in metadata:
        if isinstance(m, FieldInfo):
            _apply_constraints(schema, list(m.metadata))
            continue
        if isinstance(m, Cel):
            schema.setdefault("x-kubernetes-validations", []).append({"rule": m.rule, "message": m.message})
        elif isinstance(m, at.Ge):
            schema["minimum"] = m.ge
        elif isinstance(m, at.Gt):
            schema["minimum"] = m.gt
            schema["exclusiveMinimum"] = True
        elif isinstance(m, at.Le):
            schema["maximum"] = m.le
        elif isinstance(m, at.Lt):
            schema["maximum"] = m.lt
            schema["exclusiveMaximum"] = True
        elif isinstance(m, at.MinLen):
            schema["minItems" if schema.get("type") == "array" else "minLength"] = m.min_length
        elif isinstance(m, at.MaxLen):
            schema["maxItems" if schema.get("type") == "array" else "maxLength"] = m.max_length
        elif hasattr(m, "pattern") and m.pattern:
            schema["pattern"] = m.pattern


def type_schema(tp: Any) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of one Python type."""
    tp, metadata = _split_annotated(tp)
    # Optional fields are not marked nullable: the API server then prunes an explicit null, so
    # "null" and "absent" mean the same there, as they do in pydantic.
    tp, _ = _unwrap_optional(tp)
    tp, more = _split_annotated(tp)
    metadata += more
    origin = typing.get_origin(tp)
    schema: dict[str, Any]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        schema = model_schema(tp)
    elif origin is Literal:
        values = list(typing.get_args(tp))
        schema = {"type": "string", "enum": values}
    elif origin is list:
        (item,) = typing.get_args(tp)
        schema = {"type": "array", "items": type_schema(item)}
    elif origin is dict:
        _, value = typing.get_args(tp)
        if value is Any:
            schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        else:
            schema = {"type": "object", "additionalProperties": type_schema(value)}
    elif tp is bool:
        schema = {"type": "boolean"}
    elif tp is int:
        schema = {"type": "integer"}
    elif tp is float:
        schema = {"type": "number"}
    elif tp is str:
        schema = {"type": "string"}
    elif tp is Any:
        schema = {"x-kubernetes-preserve-unknown-fields": True}
    else:
        raise TypeError(f"no CRD schema for type {tp!r}")
    _apply_constraints(schema, metadata)
    return schema


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined or field.default is None:
        return None
    else:
        value = field.default
    if isinstance(value, ApiModel):
        # The whole defaulted object: the API server checks CEL rules against defaults too.
        return value.to_wire()
    if isinstance(value, list):
        return [v.to_wire() if isinstance(v, ApiModel) else v for v in value]
    return value


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        schema = type_schema(
            field.annotation if not field.metadata else typing.Annotated[field.annotation, *field.metadata]
        )
        if field.description:
            schema = {"description": field.description, **schema}
        default = _default(field)
        if default is not None:
            schema["default"] = default
        if field.is_required():
            required.append(key)
        properties[key] = schema
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    rules = [{"rule": r.rule, "message": r.message} for r in getattr(model, "cel_rules", ())]
    if rules:
        out["x-kubernetes-validations"] = rules
    return out


def spec_schema() -> dict[str, Any]:
    schema = model_schema(DistillationJobSpec)
    for key in DistillationJobSpec.IMMUTABLE:
        prop = schema["properties"][key]
        prop.setdefault("x-kubernetes-validations", []).append(
            {
                "rule": "self == oldSelf",
                "message": f"spec.{key} is immutable once the job is created; create a new job instead",
            }
        )
    return schema


# What the CEL rule on a template's data.train and data.eval says (pydantic says the same).
TEMPLATE_DATA_MESSAGE = (
    "leave data.train and data.eval out of a schedule's job template; each run fills them from data.partitions"
)
# The DistillationJob rule a template does not need: a run always has eval data.
_EVAL_FOR_SERVING = "!self.serving.enabled || has(self.data.eval)"


def job_template_spec_schema() -> dict[str, Any]:
    """The DistillationJob spec schema as a schedule's jobTemplate.spec: data.train and data.eval
    left out (each run fills them), data itself optional, and no immutable fields (a template
    changes for the runs to come)."""
    schema = model_schema(DistillationJobSpec)
    schema["required"] = [k for k in schema["required"] if k != "data"]
    schema["x-kubernetes-validations"] = [
        r for r in schema["x-kubernetes-validations"] if r["rule"] != _EVAL_FOR_SERVING
    ]
    data = schema["properties"]["data"]
    data["description"] = "Training and evaluation settings; data.train and data.eval are filled per run."
    # An absent data section is defaulted, so the job's rules that read data.* can run on it.
    data["default"] = {}
    data["required"] = [k for k in data.get("required", []) if k not in ("train", "eval")]
    if not data["required"]:
        del data["required"]
    for key in ("train", "eval"):
        data["properties"][key] = {
            "description": "Filled per run from the schedule's partitions; leave out.",
            "type": "string",
            "x-kubernetes-validations": [{"rule": "size(self) == 0", "message": TEMPLATE_DATA_MESSAGE}],
        }
    return schema


@dataclass(frozen=True)
class CrdKind:
    """One custom resource: its names, columns, description and schemas."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    description: str
    printer_columns: list[dict[str, Any]]
    spec: Callable[[], dict[str, Any]]
    status: type[BaseModel]
    # CEL rules on the whole object (they can read metadata.name).
    root_rules: tuple[dict[str, str], ...] = ()

    @property
    def file_name(self) -> str:
        return f"{GROUP}_{self.plural}.yaml"


SCHEDULE_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Schedule", "type": "string", "jsonPath": ".spec.schedule"},
    {"name": "Suspend", "type": "boolean", "jsonPath": ".spec.suspend"},
    {"name": "Last run", "type": "date", "jsonPath": ".status.lastScheduleTime"},
    {"name": "Promoted", "type": "string", "jsonPath": ".status.promoted.job"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def schedule_spec_schema() -> dict[str, Any]:
    schema = model_schema(DistillationScheduleSpec)
    schema["properties"]["jobTemplate"]["properties"]["spec"] = {
        "description": schema["properties"]["jobTemplate"]["properties"]["spec"]["description"],
        **job_template_spec_schema(),
    }
    return schema


JOB = CrdKind(
    kind=KIND,
    plural=PLURAL,
    singular=SINGULAR,
    short_names=tuple(SHORT_NAMES),
    description="A knowledge-distillation job: teacher, student, data and how to distill; the operator trains, "
    "quantizes and serves the student.",
    printer_columns=PRINTER_COLUMNS,
    spec=spec_schema,
    status=DistillationJobStatus,
)
SCHEDULE = CrdKind(
    kind=SCHEDULE_KIND,
    plural=SCHEDULE_PLURAL,
    singular=SCHEDULE_SINGULAR,
    short_names=tuple(SCHEDULE_SHORT_NAMES),
    description="DistillationJobs on a cron over fresh data partitions, with replay against forgetting and a "
    "gate that promotes a run's student only if it beats the served one.",
    printer_columns=SCHEDULE_PRINTER_COLUMNS,
    spec=schedule_spec_schema,
    status=DistillationScheduleStatus,
    root_rules=(
        {
            "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            "message": f"metadata.name: a schedule's name has at most {MAX_NAME_LENGTH} characters, "
            "so that its jobs' names (<name>-<unix minutes>) fit in 63",
        },
    ),
)
KINDS: tuple[CrdKind, ...] = (JOB, SCHEDULE)


def build_crd(resource: CrdKind = JOB) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind (the DistillationJob's by default)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{resource.plural}.{GROUP}",
            "annotations": {"kdistill.io/generated-by": "kdistill crds"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.singular,
                "shortNames": list(resource.short_names),
                "categories": ["all", "kdistill"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": resource.printer_columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "description": resource.description,
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": resource.spec(),
                                "status": model_schema(resource.status),
                            },
                            **(
                                {"x-kubernetes-validations": [dict(r) for r in resource.root_rules]}
                                if resource.root_rules
                                else {}
                            ),
                        }
                    },
                }
            ],
        },
    }
