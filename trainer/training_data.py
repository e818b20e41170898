"""A run's data: the label map, the tokenized train and eval examples, and the batch sampler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode

from .data import DataError, TokenizedExample, build_label_map, read_jsonl, tokenize_examples
from .errors import TrainerError
from .generated_set import is_generated_set, text_examples
from .sampling import BatchSampler, assign_tiers
from .sources import resolve_source


@dataclass
class TrainingData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    label_map: dict[str, int] | None
    sampler: BatchSampler
    micro_batch: int  # examples per rank per micro-step


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


def _read(
    spec: DistillationJobSpec, path: Path, tokenizer: Any, label_field: str | None, label_map: dict[str, int] | None
) -> list[TokenizedExample]:
    data_spec = spec.data
    if is_generated_set(path):  # an earlier job's teacher-written set (generated_set.py)
        return tokenize_examples(text_examples(path, data_spec.text_field), tokenizer, data_spec.max_seq_length)
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
    return tokenize_examples(rows, tokenizer, data_spec.max_seq_length)


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
    spec: DistillationJobSpec, teacher: nn.Module, tokenizer: Any, base_dir: Path, data_rank: int
) -> TrainingData:
    data_spec = spec.data
    train_path = resolve_source(data_spec.train, base_dir)
    eval_path = resolve_source(data_spec.eval, base_dir) if data_spec.eval else None
    label_field = data_spec.label_field if spec.task == "sequence-classification" else None
    label_map = None
    if label_field:
        label_map = _label_map(spec, teacher, [p for p in (train_path, eval_path) if p], label_field)
    train = _read(spec, train_path, tokenizer, label_field, label_map)
    evaluation = _read(spec, eval_path, tokenizer, label_field, label_map) if eval_path else []
    distillation = spec.distillation
    micro_batch = distillation.batch_size // (spec.parallelism.student.data * distillation.gradient_accumulation_steps)
    return TrainingData(train, evaluation, label_map, _sampler(spec, train, data_rank), micro_batch)
