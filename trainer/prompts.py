"""Prompts for the objectives where a model writes the text (sequence, on-policy).

A data line's prompt is its ``data.promptField`` (default ``prompt``). A line without that field
(or with an empty one) gives the first half of its ``data.textField``, cut at the space nearest
the middle, so that plain text corpora work too: the model continues what the text began.
Bad lines are counted against ``data.maxBadFraction`` as for training text.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .data import DataError, Example

log = logging.getLogger(__name__)


def text_prefix(text: str) -> str:
    """The first half of ``text``, cut at the whitespace nearest its middle (never empty)."""
    text = text.strip()
    middle = len(text) // 2
    spaces = [i for i, c in enumerate(text) if c.isspace()]
    if not spaces:
        return text[: max(middle, 1)]
    cut = min(spaces, key=lambda i: abs(i - middle))
    return text[:cut] if cut > 0 else text[: max(middle, 1)]


def prompt_of(record: object, prompt_field: str, text_field: str) -> str | None:
    """The record's prompt, or None when it has neither a prompt nor a text to cut one from."""
    if not isinstance(record, dict):
        return None
    prompt = record.get(prompt_field)
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    text = record.get(text_field)
    if isinstance(text, str) and text.strip():
        return text_prefix(text)
    return None


def read_prompts(path: Path, *, prompt_field: str, text_field: str, max_bad_fraction: float) -> list[str]:
    """Every usable prompt of a JSON-lines file, in file order.

    Raises ``DataError`` when the file is missing, has no prompts, or more than
    ``max_bad_fraction`` of its non-blank lines have none."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    prompts: list[str] = []
    bad: list[int] = []
    with path.open("rb") as f:
        for no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad.append(no)
                continue
            prompt = prompt_of(record, prompt_field, text_field)
            if prompt is None:
                bad.append(no)
            else:
                prompts.append(prompt)
    total = len(prompts) + len(bad)
    if bad:
        log.warning("%s: %d of %d lines have no prompt (lines %s ...)", path, len(bad), total, bad[:5])
        if len(bad) / total > max_bad_fraction + 1e-9:
            raise DataError(
                f"{path}: {len(bad)} of {total} lines have neither a {prompt_field!r} nor a {text_field!r} "
                f"string (first at line {bad[0]}; maxBadFraction {max_bad_fraction:.2%})"
            )
    if not prompts:
        raise DataError(f"{path}: no prompts (field {prompt_field!r}, or the start of {text_field!r})")
    return prompts


def prompt_examples(path: Path, *, prompt_field: str, text_field: str, max_bad_fraction: float) -> list[Example]:
    """The prompts of a file as text examples: what a job whose every stage trains on generated
    completions reads as its training text, so that prompt-only data (no text field) works."""
    prompts = read_prompts(path, prompt_field=prompt_field, text_field=text_field, max_bad_fraction=max_bad_fraction)
    return [Example(index=i, text=p, label=None, line=0) for i, p in enumerate(prompts)]
