"""The drifting example corpus (trainer/drift_corpus.py): dated partitions of successive pydoc topics."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kdistill.trainer.drift_corpus import build_drift_partitions, topic_groups


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_partitions_are_dated_disjoint_and_sorted_oldest_first(tmp_path: Path) -> None:
    folders = build_drift_partitions(tmp_path, partitions=4)
    assert [f.name for f in folders] == ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name for f in folders]
    seen: set[str] = set()
    for folder in folders:
        train, evals = _texts(folder / "train.jsonl"), _texts(folder / "eval.jsonl")
        assert len(train) >= 50 and len(evals) >= 5
        texts = set(train) | set(evals)
        assert len(texts) == len(train) + len(evals)  # train and eval do not share text
        assert not texts & seen  # nor do partitions
        seen |= texts


def test_topic_groups_are_consecutive_balanced_and_cover_every_topic() -> None:
    groups = topic_groups(5)
    flat = [t for g in groups for t in g]
    assert len(groups) == 5 and flat == sorted(flat) and len(set(flat)) == len(flat)
    # Each group's topics come after the previous group's: the subject drifts.
    assert all(a[-1] < b[0] for a, b in itertools.pairwise(groups))


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = build_drift_partitions(tmp_path / "a", partitions=3, seed=1)
    b = build_drift_partitions(tmp_path / "b", partitions=3, seed=1)
    for x, y in zip(a, b, strict=True):
        assert (x / "train.jsonl").read_bytes() == (y / "train.jsonl").read_bytes()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="partitions must be >= 2"):
        build_drift_partitions(Path("/nonexistent"), partitions=1)
    with pytest.raises(ValueError, match="eval_fraction"):
        build_drift_partitions(Path("/nonexistent"), eval_fraction=0.0)
