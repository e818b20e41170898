"""A run's data: the label map, the tokenized train and eval examples, and the batch sampler."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode

from .cross_tokenizer import CrossExample, cross_examples, scored_bytes_by_index
from .data import DataError, Example, TokenizedExample, build_label_map, read_jsonl, tokenize_examples
from .errors import TrainerError
from .generated_set import is_generated_set, text_examples
from .prompts import prompt_examples
from .sampling import BatchSampler, assign_tiers
from .sequence_stage import only_sequence
from .sources import resolve_source


@dataclass
class TrainingData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    label_map: dict[str, int] | None
    sampler: BatchSampler
    micro_batch: int  # examples per rank per micro-step
    # Causal-lm eval: UTF-8 bytes each eval example is scored on, by index (bits per byte).
    eval_bytes: dict[int, int] = field(default_factory=dict)
    # A student with its own tokenizer: each training example's teacher tokens and aligned
    # positions, and the eval set in the teacher's tokens (the teacher is scored on its own).
    cross: dict[int, CrossExample] | None = None
    teacher_eval: list[TokenizedExample] = field(default_factory=list)
    teacher_eval_bytes: dict[int, int] = field(default_factory=dict)


def teacher_label_map(teacher: nn.Module) -> dict[str, int] | None:
    """The teacher's own label names, unless they are transformers' placeholders (LABEL_0...)."""
    id2label = getattr(teacher.config, "id2label", None) or {}
    names = {int(i): str(n) for i, n in id2label.items()}
    if not names or all(n == f"LABEL_{i}" for i, n in names.items()):
        return None
    return {n: i for i, n in names.items()}


def _label_map(spec: DistillationJobSpec, teacher: nn.Module, paths: list[Path], label_field: str) -> dict[str, int]:
    label_map = teacher_label_map(teacher)
    if label_map is None:
        try:
            label_map = build_label_map(*paths, label_field=label_field)
        except DataError as exc:
            raise TrainerError(ExitCode.BAD_DATA, str(exc)) from None
    n_labels = int(teacher.config.num_labels)
    if len(label_map) != n_labels:
        raise TrainerError(
            ExitCode.BAD_SPEC, f"the data has {len(label_map)} labels but the teacher classifies into {n_labels}"
        )
    return label_map


def _rows(
    spec: DistillationJobSpec, path: Path, label_field: str | None, label_map: dict[str, int] | None
) -> list[Example]:
    data_spec = spec.data
    if is_generated_set(path):  # an earlier job's teacher-written set (generated_set.py)
        return list(text_examples(path, data_spec.text_field))
    try:
        rows = read_jsonl(
            path,
            text_field=data_spec.text_field,
            label_field=label_field,
            label_to_id=label_map,
            max_bad_fraction=data_spec.max_bad_fraction,
        )
    except DataError as exc:
        raise TrainerError(ExitCode.BAD_DATA, str(exc)) from None
    if not rows:
        raise TrainerError(ExitCode.BAD_DATA, f"{path}: no usable examples")
    return rows


def _prompt_rows(spec: DistillationJobSpec, path: Path) -> list[Example]:
    data_spec = spec.data
    try:
        return prompt_examples(
            path,
            prompt_field=data_spec.prompt_field,
            text_field=data_spec.text_field,
            max_bad_fraction=data_spec.max_bad_fraction,
        )
    except DataError as exc:
        raise TrainerError(ExitCode.BAD_DATA, str(exc)) from None


def _sampler(spec: DistillationJobSpec, train: list[TokenizedExample], data_rank: int) -> BatchSampler:
    sampling = spec.data.sampling
    tiers = (
        assign_tiers(train, spec.task, shares=(sampling.head, sampling.torso))
        if sampling.strategy == "stratified"
        else None
    )
    distillation = spec.distillation
    return BatchSampler(
        train,
        distillation.batch_size // distillation.gradient_accumulation_steps,
        strategy=sampling.strategy,
        tiers=tiers,
        shares=(sampling.head, sampling.torso, sampling.tail),
        seed=distillation.seed,
        bucket_by_length=True,
        rank=data_rank,
        world=spec.parallelism.student.data,
    )


def load_training_data(
    spec: DistillationJobSpec,
    teacher: nn.Module,
    tokenizer: Any,
    base_dir: Path,
    data_rank: int,
    *,
    teacher_tokenizer: Any = None,
) -> TrainingData:
    """``tokenizer`` is the student's; ``teacher_tokenizer`` is set only when the teacher's
    differs (cross-tokenizer logits KD), and the teacher's side of each example is prepared too."""
    data_spec = spec.data
    max_len = data_spec.max_seq_length
    train_path = resolve_source(data_spec.train, base_dir)
    eval_path = resolve_source(data_spec.eval, base_dir) if data_spec.eval else None
    label_field = data_spec.label_field if spec.task == "sequence-classification" else None
    label_map = None
    if label_field:
        label_map = _label_map(spec, teacher, [p for p in (train_path, eval_path) if p], label_field)
    if only_sequence(spec) and not is_generated_set(train_path):
        # Text lines are never trained on: the prompts stand in (prompt-only data works).
        train_rows = _prompt_rows(spec, train_path)
    else:
        train_rows = _rows(spec, train_path, label_field, label_map)
    train = tokenize_examples(train_rows, tokenizer, max_len)
    eval_rows = _rows(spec, eval_path, label_field, label_map) if eval_path else []
    evaluation = tokenize_examples(eval_rows, tokenizer, max_len) if eval_rows else []
    distillation = spec.distillation
    micro_batch = distillation.batch_size // (spec.parallelism.student.data * distillation.gradient_accumulation_steps)
    data = TrainingData(train, evaluation, label_map, _sampler(spec, train, data_rank), micro_batch)
    if spec.task == "causal-lm" and eval_rows:
        data.eval_bytes = scored_bytes_by_index(eval_rows, tokenizer, max_len)
    if teacher_tokenizer is not None:
        try:
            data.cross = cross_examples(train_rows, tokenizer, teacher_tokenizer, max_len)
        except ValueError as exc:  # a slow tokenizer: no offsets to align by
            raise TrainerError(ExitCode.BAD_SPEC, f"distillation.crossTokenizer: {exc}") from None
        if eval_rows:
            data.teacher_eval = tokenize_examples(eval_rows, teacher_tokenizer, max_len)
            data.teacher_eval_bytes = scored_bytes_by_index(eval_rows, teacher_tokenizer, max_len)
    return data


def eval_examples_from(
    spec: DistillationJobSpec, path: Path, tokenizer: Any, label_map: dict[str, int] | None
) -> tuple[list[TokenizedExample], dict[int, int]]:
    """Eval examples of another file in the run's own way (a scheduled run's older eval data):
    the tokenized examples and, for causal LMs, the bytes each is scored on."""
    label_field = spec.data.label_field if spec.task == "sequence-classification" else None
    rows = _rows(spec, path, label_field, label_map)
    max_len = spec.data.max_seq_length
    examples = tokenize_examples(rows, tokenizer, max_len) if rows else []
    scored = scored_bytes_by_index(rows, tokenizer, max_len) if spec.task == "causal-lm" and rows else {}
    return examples, scored
