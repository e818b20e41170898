"""Real corpora that ship with CPython: the text of Python's own documentation (``pydoc_data``).

Nothing is downloaded: ``pydoc_data.topics.topics`` maps ~80 help topics ("compound",
"specialnames", "if", ...) to their full reference text (~460 kB).

- ``build_pydoc_corpus``: causal-lm JSON lines ``{"text": ...}``; each line is a run of
  consecutive paragraphs of one topic, up to ``max_chars`` characters; a paragraph repeated by
  a nesting topic is used once, so train and eval never share text.
- ``build_pydoc_topic_classification``: sequence-classification JSON lines
  ``{"text": paragraph, "label": topic}``. Label frequencies are the topics' real paragraph
  counts, naturally long-tailed: a few topics ("specialnames", "compound") hold hundreds of
  paragraphs, most hold a handful. Topics nest, so a paragraph that several topics share is
  labelled with the most specific (smallest) one and appears once. The eval split is stratified
  by label so every kept label appears in both files.

- ``build_docstring_corpus``: causal-lm JSON lines of the docstrings of the standard library's
  own ``.py`` sources (~1.8 MB, parsed, not imported): more text of the same kind for a
  stronger teacher. Paragraphs sharing an 8-word run with a given held-out text are dropped,
  so that held-out split stays disjoint from it.

All are deterministic for a given ``seed`` and Python version.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def topic_paragraphs(text: str, min_chars: int) -> list[str]:
    """Paragraphs of one topic, stripped; shorter than ``min_chars`` (headings, rules) dropped."""
    paras = (p.strip() for p in _PARAGRAPH_BREAK.split(text))
    return [p for p in paras if len(p) >= min_chars]


def _write_jsonl(path: Path, rows: Iterable[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _check_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")


def build_pydoc_corpus(
    out_dir: Path, eval_fraction: float = 0.1, seed: int = 0, *, max_chars: int = 600, min_chars: int = 20
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (causal-lm) under ``out_dir``; return their paths."""
    _check_fraction(eval_fraction)
    if max_chars < min_chars:
        raise ValueError(f"max_chars ({max_chars}) must be >= min_chars ({min_chars})")
    chunks: list[str] = []
    seen: set[str] = set()
    for text in pydoc_topics().values():
        current = ""
        for para in topic_paragraphs(text, min_chars):
            # Topics nest ("compound" repeats "if", "while", ...): each paragraph is used once, or
            # eval text would leak into train.
            if para in seen:
                continue
            seen.add(para)
            if current and len(current) + 2 + len(para) > max_chars:
                chunks.append(current)
                current = ""
            # A single paragraph longer than max_chars stays whole: the tokenizer truncates it.
            current = f"{current}\n\n{para}" if current else para
        if current:
            chunks.append(current)
    random.Random(seed).shuffle(chunks)
    n_eval = max(1, round(eval_fraction * len(chunks)))
    out_dir = Path(out_dir)
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    _write_jsonl(eval_path, ({"text": c} for c in chunks[:n_eval]))
    _write_jsonl(train_path, ({"text": c} for c in chunks[n_eval:]))
    return train_path, eval_path


def _specific_paragraphs(min_chars: int, max_chars: int) -> dict[str, list[str]]:
    """Topic → its paragraphs, each distinct paragraph under one topic only.

    Topics nest: "compound" repeats the text of "if", "while", "async", ...; "assignment" that of
    "augassign". A paragraph found under several topics goes to the smallest of them (the most
    specific; ties by name), so no text carries two labels and no eval paragraph is in train.
    """
    topics = {name: topic_paragraphs(text, min_chars) for name, text in pydoc_topics().items()}
    owner: dict[str, str] = {}
    for name in sorted(topics, key=lambda n: (len(topics[n]), n)):
        for para in topics[name]:
            owner.setdefault(para, name)
    out: dict[str, list[str]] = {name: [] for name in topics}
    for name, paras in topics.items():
        for para in dict.fromkeys(paras):  # a topic repeating itself counts once
            if owner[para] == name:
                out[name].append(para[:max_chars])
    return out


def build_pydoc_topic_classification(
    out_dir: Path,
    eval_fraction: float = 0.1,
    seed: int = 0,
    *,
    min_examples: int = 4,
    max_labels: int | None = None,
    min_chars: int = 40,
    max_chars: int = 1000,
) -> tuple[Path, Path]:
    """Write ``train.jsonl``/``eval.jsonl`` of paragraphs labelled by their pydoc topic.

    Topics with fewer than ``min_examples`` paragraphs are dropped (they could not appear in both
    splits); ``max_labels`` keeps only the most frequent topics, for small models. Paragraphs are
    cut to ``max_chars``. Per label, ``max(1, round(eval_fraction * n))`` paragraphs go to eval.
    """
    _check_fraction(eval_fraction)
    if min_examples < 2:
        raise ValueError(f"min_examples must be >= 2 so each label is in both splits, got {min_examples}")
    by_topic = _specific_paragraphs(min_chars, max_chars)
    kept = sorted(
        ((name, paras) for name, paras in by_topic.items() if len(paras) >= min_examples),
        key=lambda item: (-len(item[1]), item[0]),
    )
    if max_labels is not None:
        if max_labels < 2:
            raise ValueError(f"max_labels must be >= 2, got {max_labels}")
        kept = kept[:max_labels]
    if len(kept) < 2:
        raise ValueError(f"only {len(kept)} topics have >= {min_examples} paragraphs")
    rng = random.Random(seed)
    train: list[dict[str, str]] = []
    evals: list[dict[str, str]] = []
    for name, paras in kept:
        paras = list(paras)
        rng.shuffle(paras)
        n_eval = max(1, round(eval_fraction * len(paras)))
        evals += [{"text": p, "label": name} for p in paras[:n_eval]]
        train += [{"text": p, "label": name} for p in paras[n_eval:]]
    rng.shuffle(train)
    rng.shuffle(evals)
    out_dir = Path(out_dir)
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(eval_path, evals)
    return train_path, eval_path


def _normalized(text: str) -> str:
    return " ".join(text.split())


def _shingles(text: str, words: int) -> set[tuple[str, ...]]:
    tokens = _normalized(text).lower().split()
    return {tuple(tokens[i : i + words]) for i in range(len(tokens) - words + 1)}


def stdlib_docstrings(stdlib: Path | None = None) -> list[str]:
    """The docstrings (module, class, function) of the standard library's own ``.py`` sources.

    The sources are parsed, never imported (importing every module has side effects). Test
    packages and ``site-packages`` are skipped; files are read in path order, so the list is the
    same for a given Python version.
    """
    import ast
    import sysconfig

    root = Path(stdlib) if stdlib is not None else Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "test", "tests", "idle_test"}
    docs: list[str] = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if skipped & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            # A few stdlib files are deliberately not valid Python 3 (lib2to3's test data).
            continue
        for node in ast.walk(tree):
            documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            if isinstance(node, documented) and (doc := ast.get_docstring(node)):
                docs.append(doc)
    return docs


def build_docstring_corpus(
    out_path: Path,
    held_out: Iterable[str],
    *,
    stdlib: Path | None = None,
    max_chars: int = 600,
    min_chars: int = 20,
    shingle_words: int = 8,
) -> tuple[Path, int]:
    """Write causal-lm JSON lines of the stdlib's docstrings to ``out_path``: extra training text
    for a teacher whose eval split is ``held_out`` (texts, e.g. the pydoc eval lines).

    Each line is a run of consecutive paragraphs of one docstring, up to ``max_chars``; a
    paragraph (whitespace-normalised) is used once. A paragraph that shares any run of
    ``shingle_words`` words (case-insensitive) with the held-out text is dropped, so the eval
    split stays disjoint from everything trained on. Returns the path and the number of
    paragraphs dropped for overlap.
    """
    if max_chars < min_chars:
        raise ValueError(f"max_chars ({max_chars}) must be >= min_chars ({min_chars})")
    if shingle_words < 1:
        raise ValueError(f"shingle_words must be >= 1, got {shingle_words}")
    banned: set[tuple[str, ...]] = set()
    for text in held_out:
        banned |= _shingles(text, shingle_words)
    chunks: list[str] = []
    seen: set[str] = set()
    dropped = 0
    for doc in stdlib_docstrings(stdlib):
        current = ""
        for para in topic_paragraphs(doc, min_chars):
            key = _normalized(para)
            if key in seen:
                continue
            seen.add(key)
            if _shingles(para, shingle_words) & banned:
                dropped += 1
                continue
            if current and len(current) + 2 + len(para) > max_chars:
                chunks.append(current)
                current = ""
            current = f"{current}\n\n{para}" if current else para
        if current:
            chunks.append(current)
    _write_jsonl(Path(out_path), ({"text": c} for c in chunks))
    return Path(out_path), dropped
