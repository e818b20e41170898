"""A drifting corpus from text that ships with CPython: pydoc topics in successive partitions.

`build_drift_partitions` splits Python's help topics (``pydoc_data``; nothing is downloaded),
sorted by name, into `partitions` consecutive groups of about equal size in paragraphs. Each
group is one dated partition folder (``2026-11-01/``, ``2026-11-02/``, ...) holding
``train.jsonl`` and ``eval.jsonl`` of causal-lm lines ``{"text": ...}``: runs of consecutive
paragraphs of one topic, up to ``max_chars`` characters. Later partitions are about other
topics than earlier ones, so a student trained only on the newest drifts away from the oldest:
the data a DistillationSchedule's replay is for. A paragraph shared by nesting topics is used
once (trainer/corpus.py), so no text is in two partitions or in both splits.

    python -P -m kdistill.trainer.drift_corpus --out ./pvc/data/drift --partitions 6
"""

from __future__ import annotations

import argparse
import random
from datetime import date, timedelta
from pathlib import Path

from .corpus import _check_fraction, _specific_paragraphs, _write_jsonl

FIRST_DAY = date(2026, 11, 1)


def _chunks(paragraphs: list[str], max_chars: int) -> list[str]:
    out: list[str] = []
    current = ""
    for para in paragraphs:
        if current and len(current) + 2 + len(para) > max_chars:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


def topic_groups(partitions: int, min_chars: int = 20, max_chars: int = 600) -> list[list[str]]:
    """The topic names of each partition: consecutive by name, about equal in paragraphs."""
    by_topic = {name: paras for name, paras in _specific_paragraphs(min_chars, max_chars).items() if paras}
    total = sum(len(p) for p in by_topic.values())
    groups: list[list[str]] = [[]]
    filled = 0
    for name in sorted(by_topic):
        # Close a group once it holds its share of all paragraphs (the last takes the rest).
        if len(groups) < partitions and filled >= total * len(groups) / partitions:
            groups.append([])
        groups[-1].append(name)
        filled += len(by_topic[name])
    if len(groups) < partitions:
        raise ValueError(f"only {len(groups)} groups of topics could be formed, asked for {partitions}")
    return groups


def build_drift_partitions(
    out_dir: Path,
    partitions: int = 6,
    eval_fraction: float = 0.1,
    seed: int = 0,
    *,
    max_chars: int = 600,
    min_chars: int = 20,
) -> list[Path]:
    """Write `partitions` dated partition folders under `out_dir`; return them, oldest first."""
    _check_fraction(eval_fraction)
    if partitions < 2:
        raise ValueError(f"partitions must be >= 2, got {partitions}")
    paragraphs = _specific_paragraphs(min_chars, max_chars)
    rng = random.Random(seed)
    out: list[Path] = []
    for i, topics in enumerate(topic_groups(partitions, min_chars, max_chars)):
        chunks = [c for name in topics for c in _chunks(paragraphs[name], max_chars)]
        rng.shuffle(chunks)
        n_eval = max(1, round(eval_fraction * len(chunks)))
        folder = Path(out_dir) / (FIRST_DAY + timedelta(days=i)).isoformat()
        _write_jsonl(folder / "eval.jsonl", ({"text": c} for c in chunks[:n_eval]))
        _write_jsonl(folder / "train.jsonl", ({"text": c} for c in chunks[n_eval:]))
        out.append(folder)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="The partition folder to write.")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for folder in build_drift_partitions(args.out, args.partitions, args.eval_fraction, args.seed):
        lines = sum(1 for _ in (folder / "train.jsonl").open())
        print(f"{folder}: {lines} training lines")


if __name__ == "__main__":
    main()
