"""Shared base for the API models: camelCase on the wire, CEL rules declared beside the checks.

Every model rule that pydantic enforces with a ``model_validator`` is also declared as a CEL
rule in ``cel_rules`` so the generated CRD enforces the same thing on the API server. The
agreement of the two is tested on one table of specs (tests/spec_table.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

# Float equalities (strata sum and friends) use this tolerance everywhere, here and in CEL.
FLOAT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class CelRule:
    """One `x-kubernetes-validations` entry attached to the model's object schema."""

    rule: str
    message: str


class ApiModel(BaseModel):
    """Base of every API object: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in YAML: camelCase, with every default filled in."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)
