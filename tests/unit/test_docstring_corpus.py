"""The stdlib docstring corpus: extra training text kept disjoint from a held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdistill.trainer.corpus import _shingles, build_docstring_corpus, build_pydoc_corpus, stdlib_docstrings

HELD_OUT = "Some held-out text: the quick brown fox jumps over the lazy dog while nobody watches it."


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def small_stdlib(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "zeta.py").write_text(
        '"""Zeta module.\n\nIts second paragraph is long enough to keep.\n"""\n\n'
        "def f():\n"
        '    """Return the quick brown fox jumps over the lazy dog while nobody is looking."""\n\n'
        "class C:\n"
        '    """Its second paragraph is long enough to keep."""\n\n'
        "    async def g(self):\n"
        '        """An async method documented too."""\n'
    )
    (root / "pkg" / "alpha.py").write_text('"""Alpha package module, read first in path order."""\n')
    (root / "test" / "test_x.py").write_text('"""A test module that must be skipped."""\n')
    (root / "broken.py").write_text('"""Not valid Python."""\nprint "py2"\n')
    return root


def test_docstrings_are_parsed_in_path_order_skipping_tests_and_bad_files(small_stdlib: Path) -> None:
    docs = stdlib_docstrings(small_stdlib)
    assert docs[0] == "Alpha package module, read first in path order."
    assert "An async method documented too." in docs
    assert not any("skipped" in d or "Not valid" in d for d in docs)


def test_corpus_is_deduplicated_deterministic_and_disjoint_from_held_out(tmp_path: Path, small_stdlib: Path) -> None:
    out, dropped = build_docstring_corpus(tmp_path / "a.jsonl", [HELD_OUT], stdlib=small_stdlib, min_chars=10)
    rows = texts(out)
    joined = "\n\n".join(rows)
    # The paragraph sharing eight words with the held-out text is dropped, and counted.
    assert dropped == 1 and "quick brown fox" not in joined
    # A paragraph repeated by another docstring is kept once.
    assert joined.count("Its second paragraph is long enough to keep.") == 1
    assert "Alpha package module" in rows[0]
    again, _ = build_docstring_corpus(tmp_path / "b.jsonl", [HELD_OUT], stdlib=small_stdlib, min_chars=10)
    assert again.read_bytes() == out.read_bytes()
    kept, none_dropped = build_docstring_corpus(tmp_path / "c.jsonl", ["unrelated"], stdlib=small_stdlib, min_chars=10)
    assert none_dropped == 0 and "quick brown fox" in "".join(texts(kept))


def test_bad_arguments_are_refused(tmp_path: Path, small_stdlib: Path) -> None:
    with pytest.raises(ValueError, match="max_chars"):
        build_docstring_corpus(tmp_path / "x.jsonl", [], stdlib=small_stdlib, max_chars=5, min_chars=10)
    with pytest.raises(ValueError, match="shingle_words"):
        build_docstring_corpus(tmp_path / "x.jsonl", [], stdlib=small_stdlib, shingle_words=0)


def test_real_stdlib_corpus_shares_no_eight_words_with_the_pydoc_eval_split(tmp_path: Path) -> None:
    _, eval_path = build_pydoc_corpus(tmp_path / "pydoc", eval_fraction=0.1, seed=0)
    held_out = texts(eval_path)
    out, dropped = build_docstring_corpus(tmp_path / "doc.jsonl", held_out)
    rows = texts(out)
    assert len(rows) > 5000 and sum(map(len, rows)) > 1_000_000  # several times the pydoc text
    banned = set().union(*(_shingles(t, 8) for t in held_out))
    assert dropped > 0
    assert not any(_shingles(p, 8) & banned for row in rows for p in row.split("\n\n"))
    assert all(len(r) <= 600 or "\n\n" not in r for r in rows)
