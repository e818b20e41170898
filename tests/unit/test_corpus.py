"""The pydoc corpora (real text shipped with CPython) and the locally trained tokenizer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kdistill.trainer.corpus import build_pydoc_corpus, build_pydoc_topic_classification, pydoc_topics
from kdistill.trainer.data import TokenizedExample, build_label_map, read_jsonl, tokenize_examples
from kdistill.trainer.sampling import HEAD, TAIL, assign_tiers
from kdistill.trainer.tokenizer_build import MIN_VOCAB, build_tokenizer


def lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def lm_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_pydoc_corpus(tmp_path_factory.mktemp("lm"), eval_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def cls_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_pydoc_topic_classification(tmp_path_factory.mktemp("cls"), eval_fraction=0.1, seed=0)


def test_lm_corpus_is_the_pydoc_text_split_without_overlap(lm_paths: tuple[Path, Path]) -> None:
    train, evals = (lines(p) for p in lm_paths)
    assert all(set(row) == {"text"} for row in train + evals)
    assert len(train) > 500
    assert abs(len(evals) / (len(train) + len(evals)) - 0.1) < 0.01
    assert not {r["text"] for r in train} & {r["text"] for r in evals}
    # Real documentation text: every chunk is a run of paragraphs of some topic.
    all_text = "\n".join(pydoc_topics().values())
    for row in train[:50]:
        first_paragraph = row["text"].split("\n\n")[0]
        assert first_paragraph in all_text
    # Chunks respect max_chars unless a single paragraph is longer.
    assert all(len(r["text"]) <= 600 or "\n\n" not in r["text"] for r in train)
    rows = read_jsonl(lm_paths[0], text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.0)
    assert len(rows) == len(train)


def test_corpora_are_deterministic_per_seed(tmp_path: Path, lm_paths: tuple[Path, Path]) -> None:
    again = build_pydoc_corpus(tmp_path / "a", eval_fraction=0.1, seed=0)
    assert again[0].read_bytes() == lm_paths[0].read_bytes()
    other = build_pydoc_corpus(tmp_path / "b", eval_fraction=0.1, seed=1)
    assert other[0].read_bytes() != lm_paths[0].read_bytes()
    with pytest.raises(ValueError, match="eval_fraction"):
        build_pydoc_corpus(tmp_path / "c", eval_fraction=1.0)


def test_topic_classification_is_long_tailed_and_in_both_splits(cls_paths: tuple[Path, Path]) -> None:
    train, evals = (lines(p) for p in cls_paths)
    counts = Counter(r["label"] for r in train + evals)
    assert set(Counter(r["label"] for r in evals)) == set(counts)  # every label in eval too
    assert set(Counter(r["label"] for r in train)) == set(counts)
    assert min(counts.values()) >= 4
    ranked = sorted(counts.values(), reverse=True)
    # Naturally long-tailed: the biggest topic dwarfs the median one, and the top 10% of labels
    # hold far more than 10% of the examples.
    assert ranked[0] >= 10 * ranked[len(ranked) // 2]
    top = ranked[: max(1, len(ranked) // 10)]
    assert sum(top) / sum(ranked) > 0.3
    assert counts.most_common(2)[0][0] in {"compound", "specialnames"}
    # Per label, round(10%) (at least 1) of the paragraphs is held out.
    eval_counts = Counter(r["label"] for r in evals)
    assert all(eval_counts[lab] == max(1, round(0.1 * n)) for lab, n in counts.items())


def test_topic_classification_feeds_the_data_pipeline(cls_paths: tuple[Path, Path]) -> None:
    label_map = build_label_map(*cls_paths, label_field="label")
    rows = read_jsonl(cls_paths[0], text_field="text", label_field="label", label_to_id=label_map, max_bad_fraction=0.0)
    assert {r.label for r in rows} == set(label_map.values())
    tiers = assign_tiers([TokenizedExample(r.index, [1], r.label) for r in rows], "sequence-classification", (0.7, 0.2))
    head_labels = {r.label for r, t in zip(rows, tiers, strict=True) if t == HEAD}
    tail_labels = {r.label for r, t in zip(rows, tiers, strict=True) if t == TAIL}
    # Long tail: under a quarter of the labels cover 70% of the examples; more share the last 10%.
    assert len(head_labels) < 0.25 * len(label_map)
    assert len(head_labels) < len(tail_labels)
    assert sum(t == HEAD for t in tiers) >= 0.7 * len(rows)


def test_max_labels_keeps_the_most_frequent_topics(tmp_path: Path) -> None:
    train, _ = build_pydoc_topic_classification(tmp_path, max_labels=5)
    labels = {r["label"] for r in lines(train)}
    assert len(labels) == 5 and {"compound", "specialnames"} <= labels
    with pytest.raises(ValueError, match="min_examples"):
        build_pydoc_topic_classification(tmp_path, min_examples=1)


def test_tokenizer_is_trained_saved_and_reloadable(tmp_path: Path, lm_paths: tuple[Path, Path]) -> None:
    texts = [r["text"] for r in lines(lm_paths[0])]
    tok = build_tokenizer(texts, 800, tmp_path / "tok")
    assert len(tok) == 800
    assert (tok.pad_token, tok.eos_token, tok.unk_token, tok.bos_token) == ("<pad>", "</s>", "<unk>", "<s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    sample = "def __init__(self, *args):\n    return NotImplemented  # ünïcode ✓"
    assert reloaded(sample)["input_ids"] == tok(sample)["input_ids"]
    assert tok.decode(tok(sample)["input_ids"]) == sample  # byte-level: nothing is unknown
    # Learned from the docs: a common Python word is one token, far fewer tokens than bytes.
    assert len(tok(" return")["input_ids"]) == 1
    ids = tokenize_examples(
        read_jsonl(lm_paths[1], text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.0),
        tok,
        10_000,
    )
    n_bytes = sum(len(r["text"].encode()) for r in lines(lm_paths[1]))
    assert sum(len(t.input_ids) for t in ids) < n_bytes / 2.5
    with pytest.raises(ValueError, match=f"at least {MIN_VOCAB}"):
        build_tokenizer(texts, 100, tmp_path / "small")
    with pytest.raises(ValueError, match="non-empty"):
        build_tokenizer(["", "  "], 1000, tmp_path / "empty")
