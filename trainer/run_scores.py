"""A scheduled run's extra scores, for its schedule's promotion gate (operator/schedule_logic.py).

A run with data.runData scores, besides the usual teacher and student on the newest eval data:
- this student on the older partitions' eval data (eval-old.jsonl), when there is any;
- the champion (data.runData.champion: the served student's output folder) on both, as served
  (its student-int8/ artifact), in the same tokens and with the same label map.
The gate then compares challenger and champion on the same examples, measured the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdistill.api.failures import ExitCode
from kdistill.api.metadata import STUDENT_INT8_DIR

from .errors import TrainerError
from .run_data import RunFiles
from .sources import resolve_source
from .training_data import eval_examples_from

if TYPE_CHECKING:
    from .loop import Trainer

log = logging.getLogger("kdistill.trainer")


@contextmanager
def _eval_set(trainer: Trainer, path: Path) -> Iterator[bool]:
    """The trainer's eval set replaced by `path`'s examples for the duration; yields whether any."""
    saved = trainer.eval_examples, trainer.eval_bytes
    examples, scored = eval_examples_from(trainer.spec, path, trainer.student_tokenizer, trainer.label_map)
    trainer.eval_examples, trainer.eval_bytes = examples, scored
    try:
        yield bool(examples)
    finally:
        trainer.eval_examples, trainer.eval_bytes = saved


def _champion(uri: str, base_dir: Path, label_map: dict[str, int] | None) -> nn.Module:
    from .artifact import load_artifact

    folder = resolve_source(uri, base_dir) / STUDENT_INT8_DIR
    try:
        model: nn.Module = load_artifact(folder).model
    except (OSError, ValueError) as exc:
        # A champion that cannot be read cannot be compared: the gate must not guess.
        raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"data.runData.champion: {folder}: {exc}") from None
    theirs = getattr(getattr(model, "config", None), "label2id", None)
    if label_map is not None and isinstance(theirs, dict) and set(theirs) == set(label_map) and theirs != label_map:
        # Scores under another label numbering would compare nothing.
        raise TrainerError(
            ExitCode.BAD_SPEC,
            f"data.runData.champion: {folder} numbers its labels {theirs}, this run {label_map}: give the teacher "
            "an id2label so that every run numbers labels alike",
        )
    return model


def scheduled_scores(
    trainer: Trainer, served: nn.Module, device: torch.device, files: RunFiles, base_dir: Path
) -> dict[str, Any]:
    """champion, studentOlder and championOlder (metrics wire names), those that apply; `served` is
    the artifact this run serves (INT8, or the float student without quantization) on `device`."""
    run = trainer.spec.data.run_data
    assert run is not None
    cpu = torch.device("cpu")
    out: dict[str, Any] = {}
    champion = _champion(run.champion, base_dir, trainer.label_map) if run.champion else None
    if champion is not None:
        result = trainer.evaluate_model(champion, cpu)
        if result is not None:
            out["champion"] = result.value
    if files.eval_old is not None:
        with _eval_set(trainer, files.eval_old) as any_old:
            if any_old:
                older = trainer.evaluate_model(served, device)
                out["studentOlder"] = older.value if older else None
                if champion is not None:
                    theirs = trainer.evaluate_model(champion, cpu)
                    out["championOlder"] = theirs.value if theirs else None
    log.info("scheduled-run scores: %s", out)
    return {k: v for k, v in out.items() if v is not None}
