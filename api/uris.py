"""Model and data source URIs: a path, ``pvc://CLAIM/PATH`` or ``hf://REPO[@REV]``.

Parsing is pure; resolving a URI to a file on disk happens in the trainer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

# CEL rules embed these as raw strings (r'...'): CEL rejects escapes such as \s otherwise.
# DNS-1123 label, as Kubernetes requires for a PersistentVolumeClaim name.
CLAIM_PATTERN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
PVC_PATTERN = rf"^pvc://{CLAIM_PATTERN}/.+$"
HF_PATTERN = r"^hf://[^@\s]+(@[^@\s]+)?$"

PVC_CEL = (
    f"!self.startsWith('pvc://') || self.matches(r'{PVC_PATTERN}')",
    "a pvc:// URI must be pvc://CLAIM/PATH, with CLAIM a DNS-1123 name "
    "(lowercase letters, digits, '-') and a non-empty PATH",
)
HF_CEL = (
    f"!self.startsWith('hf://') || self.matches(r'{HF_PATTERN}')",
    "an hf:// URI must be hf://REPO or hf://REPO@REVISION",
)


@dataclass(frozen=True)
class SourceUri:
    """A parsed source: ``kind`` says where it lives, the other fields where exactly."""

    kind: Literal["path", "pvc", "hf"]
    path: str = ""
    claim: str = ""
    repo: str = ""
    revision: str = ""


def check_source_uri(value: str) -> str:
    """Raise ValueError with an explanation if ``value`` is not a usable source URI."""
    if not value.strip():
        raise ValueError("must not be empty")
    if value.startswith("pvc://") and not re.match(PVC_PATTERN, value):
        raise ValueError(f"{value!r}: {PVC_CEL[1]}")
    if value.startswith("hf://") and not re.match(HF_PATTERN, value):
        raise ValueError(f"{value!r}: {HF_CEL[1]}")
    return value


def parse_source_uri(value: str) -> SourceUri:
    check_source_uri(value)
    if value.startswith("pvc://"):
        claim, _, path = value[len("pvc://") :].partition("/")
        return SourceUri(kind="pvc", claim=claim, path=path)
    if value.startswith("hf://"):
        repo, _, revision = value[len("hf://") :].partition("@")
        return SourceUri(kind="hf", repo=repo, revision=revision)
    return SourceUri(kind="path", path=value)


def pvc_claims(values: list[str | None]) -> list[str]:
    """The distinct claim names referenced by ``pvc://`` URIs, in first-seen order."""
    claims: list[str] = []
    for value in values:
        if value and value.startswith("pvc://"):
            claim = parse_source_uri(value).claim
            if claim not in claims:
                claims.append(claim)
    return claims
