"""Reading JSON-lines data and tokenizing it.

A data file holds one JSON object per line: ``{"text": ..., "label": ...}`` (field names from
the spec). A line that is not JSON, is not an object, lacks a field, has a field of the wrong
type, or holds a label outside the label map is *bad*: it is logged as ``file:line: reason``
and skipped. A run stops with ``DataError`` only when bad lines exceed ``max_bad_fraction`` of
the non-blank lines. Blank lines are neither examples nor bad (trailing newlines are common).

Labels: JSON strings or integers (not booleans). Map keys are their string form, so the label
``3`` and ``"3"`` are the same label. ``build_label_map`` gives ids in sorted order, integers
numerically (``"2"`` before ``"10"``), then the other strings lexically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kdistill.api.failures import ExitCode

from .errors import TrainerError

log = logging.getLogger(__name__)

# Every bad line is counted; only this many are logged one by one, so a broken 10 GB file does
# not flood the logs. The DataError message quotes the first few.
MAX_LOGGED_BAD_LINES = 100
QUOTED_IN_ERROR = 5
FLOAT_TOLERANCE = 1e-6


class DataError(TrainerError):
    """Data that cannot be used: a missing file, or too many bad lines. Permanent (BAD_DATA)."""

    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.BAD_DATA, message)

    def __str__(self) -> str:
        # Callers re-wrap str(exc) into their own TrainerError: no code prefix here.
        return self.message


@dataclass(frozen=True)
class Example:
    index: int  # position among the file's good examples: a stable id for the teacher cache
    text: str
    label: int | None
    line: int = 0  # 1-based line in the source file, for messages


@dataclass(frozen=True)
class TokenizedExample:
    index: int
    input_ids: list[int]
    label: int | None

    def __len__(self) -> int:
        return len(self.input_ids)


class _Tokenizer(Protocol):
    def __call__(self, text: list[str], **kwargs: Any) -> Any: ...


def label_key(value: Any) -> str | None:
    """The map key of a JSON label value, or None when it cannot be a label."""
    if isinstance(value, bool):  # bool is an int subclass: true/false are not class ids
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value != "":
        return value
    return None


def _label_sort_key(key: str) -> tuple[int, int, str]:
    try:
        return (0, int(key), "")
    except ValueError:
        return (1, 0, key)


def _lines(path: Path) -> Iterator[tuple[int, str | UnicodeDecodeError]]:
    """(line_no, text) for each line; the decode error instead of text when it is not UTF-8."""
    with path.open("rb") as f:
        for no, raw in enumerate(f, start=1):
            try:
                yield no, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield no, exc


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")


def _parse(line: str, text_field: str, label_field: str | None) -> tuple[dict[str, Any], str | None]:
    """The record, or a reason it is bad (the record is then meaningless)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return {}, f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return {}, f"expected a JSON object, got {type(obj).__name__}"
    if text_field not in obj:
        return obj, f"missing field {text_field!r}"
    if not isinstance(obj[text_field], str):
        return obj, f"field {text_field!r} must be a string, got {type(obj[text_field]).__name__}"
    if not obj[text_field].strip():
        return obj, f"field {text_field!r} is empty"
    if label_field is not None:
        if label_field not in obj:
            return obj, f"missing field {label_field!r}"
        if label_key(obj[label_field]) is None:
            return obj, f"field {label_field!r} must be a non-empty string or an integer, got {obj[label_field]!r}"
    return obj, None


def build_label_map(*paths: Path, label_field: str) -> dict[str, int]:
    """Label → id over all ``paths``: the sorted set of every well-formed label value.

    Lines that are bad for other reasons are ignored here; ``read_jsonl`` reports them.
    """
    if not paths:
        raise ValueError("build_label_map needs at least one path")
    keys: set[str] = set()
    for path in paths:
        path = Path(path)
        _check_exists(path)
        for _, line in _lines(path):
            if isinstance(line, Exception) or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and label_field in obj:
                key = label_key(obj[label_field])
                if key is not None:
                    keys.add(key)
    if not keys:
        raise DataError(f"{', '.join(str(p) for p in paths)}: no label values in field {label_field!r}")
    return {k: i for i, k in enumerate(sorted(keys, key=_label_sort_key))}


def read_jsonl(
    path: Path,
    *,
    text_field: str,
    label_field: str | None,
    label_to_id: dict[str, int] | None,
    max_bad_fraction: float,
) -> list[Example]:
    """Good examples of ``path`` in file order; bad lines logged as ``file:line: reason``.

    With ``label_field`` set and ``label_to_id`` None, the map is ``build_label_map(path)``.
    Raises ``DataError`` if the file is missing or bad/non-blank lines > ``max_bad_fraction``.
    """
    path = Path(path)
    _check_exists(path)
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    if label_field is not None and label_to_id is None:
        label_to_id = build_label_map(path, label_field=label_field)
    examples: list[Example] = []
    bad: list[str] = []
    total = 0
    for no, line in _lines(path):
        if isinstance(line, UnicodeDecodeError):
            total += 1
            reason: str | None = f"not valid UTF-8 (byte {line.start})"
            obj: dict[str, Any] = {}
        elif not line.strip():
            continue
        else:
            total += 1
            obj, reason = _parse(line, text_field, label_field)
        label: int | None = None
        if reason is None and label_field is not None and label_to_id is not None:
            key = label_key(obj[label_field])
            if key not in label_to_id:
                reason = f"unknown label {obj[label_field]!r} (known: {len(label_to_id)} labels)"
            else:
                label = label_to_id[key]
        if reason is not None:
            msg = f"{path}:{no}: {reason}"
            if len(bad) < MAX_LOGGED_BAD_LINES:
                log.warning("skipping bad line %s", msg)
            bad.append(msg)
            continue
        examples.append(Example(index=len(examples), text=obj[text_field], label=label, line=no))
    if len(bad) > MAX_LOGGED_BAD_LINES:
        log.warning("%s: %d more bad lines not shown", path, len(bad) - MAX_LOGGED_BAD_LINES)
    if bad:
        fraction = len(bad) / total
        log.warning("%s: skipped %d of %d lines (%.4f%%) as bad", path, len(bad), total, 100 * fraction)
        if fraction > max_bad_fraction + FLOAT_TOLERANCE:
            quoted = "; ".join(bad[:QUOTED_IN_ERROR]) + (" ..." if len(bad) > QUOTED_IN_ERROR else "")
            raise DataError(
                f"{path}: {len(bad)} of {total} lines are bad ({fraction:.2%} > maxBadFraction "
                f"{max_bad_fraction:.2%}): {quoted}"
            )
    return examples


def tokenize_examples(
    examples: Sequence[Example], tokenizer: _Tokenizer, max_length: int, *, chunk: int = 1024
) -> list[TokenizedExample]:
    """Tokenize (with the tokenizer's special tokens), truncating to ``max_length`` tokens.

    An example that tokenizes to nothing is dropped with a warning: it carries no signal and
    would only be padding.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out: list[TokenizedExample] = []
    empty = 0
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        enc = tokenizer([e.text for e in part], truncation=True, max_length=max_length)
        for ex, ids in zip(part, enc["input_ids"], strict=True):
            if not ids:
                empty += 1
                continue
            out.append(TokenizedExample(index=ex.index, input_ids=list(ids), label=ex.label))
    if empty:
        log.warning("dropped %d examples that tokenize to no tokens", empty)
    return out
