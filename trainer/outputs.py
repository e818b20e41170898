"""What a run leaves behind: the local output layout, the student, result.json and the
termination message."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.api.failures import TERMINATION_LOG, Termination
from kdistill.api.metadata import STUDENT_DIR, STUDENT_INT8_DIR

from .fsio import replace_dir, write_text_atomic

log = logging.getLogger(__name__)

TERMINATION_LOG_ENV = "KDISTILL_TERMINATION_LOG"


@dataclass(frozen=True)
class OutputLayout:
    """The local output layout (docs/trainer.md); in the cluster the same tree lives on the checkpoint volume."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def teacher_cache(self) -> Path:
        return self.root / "teacher-cache"

    @property
    def generated(self) -> Path:
        """The teacher's completions for the sequence objective (generated_set.py)."""
        return self.root / "generated"

    @property
    def student(self) -> Path:
        return self.root / STUDENT_DIR

    @property
    def student_int8(self) -> Path:
        return self.root / STUDENT_INT8_DIR

    @property
    def result(self) -> Path:
        return self.root / "result.json"


def save_student(model: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
    """The full-precision student as safetensors, with its config and the teacher's tokenizer."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if not (tmp / "model.safetensors").is_file() and not list(tmp.glob("model-*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors weights into {tmp}")
    replace_dir(tmp, out_dir)
    return out_dir


def publish_student(staged: Path, tokenizer: Any, out_dir: Path) -> Path:
    """A student folder streamed shard by shard (``parallel/student_save.py``) put in place at
    ``out_dir`` with the student's tokenizer; staging folders of other processes are removed."""
    if not (staged / "config.json").is_file() or not list(staged.glob("model-*.safetensors")):
        raise RuntimeError(f"the streamed student at {staged} is incomplete")
    tokenizer.save_pretrained(str(staged))
    replace_dir(staged, out_dir)
    for stale in out_dir.parent.glob(f"{out_dir.name}.streaming-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return out_dir


def write_served_artifact(
    model: nn.Module, tokenizer: Any, layout: OutputLayout, *, task: str, quantization: str, metrics: dict[str, Any]
) -> Path:
    """The served artifact (config, tokenizer, safetensors weights, ``kdistill.json``) at the one path
    the server and the operator's rollout read, ``student-int8/``, for *every* quantization mode.

    With ``quantization: none`` the model is the full-precision student and ``kdistill.json`` says
    ``"mode": "none"``; the directory keeps its fixed name so that a job's Deployment serves
    ``<namespace>/<name>/student-int8`` whatever the mode. ``student/`` stays the plain
    ``save_pretrained`` copy for fine-tuning and other tools."""
    from .artifact import save_artifact

    return save_artifact(model, tokenizer, layout.student_int8, task=task, quantization=quantization, metrics=metrics)


def write_json_atomic(path: Path, body: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(body, indent=2, sort_keys=True) + "\n")


def termination_log_path() -> tuple[Path, bool]:
    """The path, and whether it may be created (only when overridden; /dev/termination-log is
    written only where the kubelet provides it)."""
    override = os.environ.get(TERMINATION_LOG_ENV)
    if override:
        return Path(override), True
    return Path(TERMINATION_LOG), False


def write_termination(termination: Termination) -> bool:
    """Write the short JSON summary; True if written. Never raises: the run's outcome stands."""
    path, may_create = termination_log_path()
    if not path.exists() and not may_create:
        return False
    if path.exists() and not os.access(path, os.W_OK):
        return False
    try:
        path.write_text(termination.to_json())
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)
        return False
    return True
