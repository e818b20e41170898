"""Generate the CustomResourceDefinition from the pydantic models.

The schema is built by walking the models, not from pydantic's JSON schema, because a CRD
must be structural: no $ref, no anyOf for optionals, a type on every node. Defaults, enums,
bounds, descriptions and CEL rules come straight from the field declarations.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .base import ApiModel
from .job import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from .spec import Cel, DistillationJobSpec
from .status import DistillationJobStatus

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Retention", "type": "number", "jsonPath": ".status.metrics.retention"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
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


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "annotations": {"kdistill.io/generated-by": "kdistill crds"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["all", "kdistill"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "description": "A knowledge-distillation job: teacher, student, data and how "
                            "to distill; the operator trains, quantizes and serves the student.",
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": model_schema(DistillationJobStatus),
                            },
                        }
                    },
                }
            ],
        },
    }
