"""Reading JSON lines (bad-line reporting, label maps), tokenizing, and collating."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kdistill.api.failures import ExitCode
from kdistill.trainer.batching import IGNORE_INDEX, collate
from kdistill.trainer.corpus import pydoc_topics
from kdistill.trainer.data import (
    DataError,
    Example,
    TokenizedExample,
    build_label_map,
    read_jsonl,
    tokenize_examples,
)
from kdistill.trainer.errors import TrainerError
from kdistill.trainer.tokenizer_build import build_tokenizer


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    with path.open("wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            f.write(b"\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    texts = list(pydoc_topics().values())[:30]
    return build_tokenizer(texts, 600, tmp_path_factory.mktemp("tok"))


def test_reads_good_lines_in_order_with_ids_and_line_numbers(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"text": "alpha", "label": "neg"}),
            "",
            json.dumps({"text": "beta", "label": "pos", "extra": 1}),
            json.dumps({"text": "gamma", "label": "neg"}),
        ],
    )
    rows = read_jsonl(path, text_field="text", label_field="label", label_to_id=None, max_bad_fraction=0.0)
    assert rows == [
        Example(index=0, text="alpha", label=0, line=1),
        Example(index=1, text="beta", label=1, line=3),
        Example(index=2, text="gamma", label=0, line=4),
    ]


def test_causal_lm_ignores_labels(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"body": "x y", "label": [1]})])
    rows = read_jsonl(path, text_field="body", label_field=None, label_to_id=None, max_bad_fraction=0.0)
    assert [(r.text, r.label) for r in rows] == [("x y", None)]


BAD_CASES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"label": "pos"}), "missing field 'text'"),
    (json.dumps({"text": 5, "label": "pos"}), "field 'text' must be a string, got int"),
    (json.dumps({"text": "   ", "label": "pos"}), "field 'text' is empty"),
    (json.dumps({"text": "ok"}), "missing field 'label'"),
    (json.dumps({"text": "ok", "label": True}), "field 'label' must be a non-empty string or an integer"),
    (json.dumps({"text": "ok", "label": None}), "field 'label' must be a non-empty string or an integer"),
    (json.dumps({"text": "ok", "label": "surprise"}), "unknown label 'surprise'"),
    (b'{"text": "caf\xe9", "label": "pos"}', "not valid UTF-8"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_CASES, ids=[r for _, r in BAD_CASES])
def test_each_kind_of_bad_line_is_reported_with_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, line: str | bytes, reason: str
) -> None:
    good = [json.dumps({"text": f"t{i}", "label": "pos" if i % 2 else "neg"}) for i in range(9)]
    path = write_lines(tmp_path / "d.jsonl", [*good[:4], line, *good[4:]])
    with caplog.at_level(logging.WARNING, logger="kdistill.trainer.data"):
        rows = read_jsonl(
            path, text_field="text", label_field="label", label_to_id={"neg": 0, "pos": 1}, max_bad_fraction=0.1
        )
    assert [r.text for r in rows] == [f"t{i}" for i in range(9)]
    assert [r.line for r in rows] == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{path}:5: {reason}" in m for m in messages), messages


def test_too_many_bad_lines_stop_the_run_with_the_first_ones_quoted(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"t{i}"}) for i in range(8)] + ["oops", json.dumps({"txt": "x"})]
    path = write_lines(tmp_path / "d.jsonl", lines)
    # Exactly at the limit (2/10) is allowed ...
    rows = read_jsonl(path, text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.2)
    assert len(rows) == 8
    # ... above it is not.
    with pytest.raises(DataError) as err:
        read_jsonl(path, text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.19)
    msg = str(err.value)
    assert "2 of 10 lines are bad" in msg
    assert f"{path}:9: not valid JSON" in msg and f"{path}:10: missing field 'text'" in msg
    assert isinstance(err.value, TrainerError) and err.value.code == ExitCode.BAD_DATA


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl", text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.5)
    with pytest.raises(DataError, match="not a regular file"):
        read_jsonl(tmp_path, text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.5)


def test_label_map_spans_files_and_sorts_integers_numerically(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", [json.dumps({"text": "x", "label": v}) for v in (10, 2, "b")])
    b = write_lines(
        tmp_path / "b.jsonl",
        [json.dumps({"text": "x", "label": v}) for v in ("2", "a", 1)]
        + ["garbage", json.dumps({"text": "x", "label": 1.5})],
    )
    assert build_label_map(a, b, label_field="label") == {"1": 0, "2": 1, "10": 2, "a": 3, "b": 4}
    rows = read_jsonl(
        a,
        text_field="text",
        label_field="label",
        label_to_id=build_label_map(a, b, label_field="label"),
        max_bad_fraction=0.0,
    )
    assert [r.label for r in rows] == [2, 1, 4]  # 10, 2, "b"; the int 2 and the string "2" are one label


def test_label_map_without_labels_is_a_data_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "x"})])
    with pytest.raises(DataError, match="no label values in field 'label'"):
        build_label_map(path, label_field="label")


def test_tokenize_truncates_and_keeps_ids_and_labels(tokenizer) -> None:  # type: ignore[no-untyped-def]
    long_text = " ".join(["function definitions and class attributes"] * 40)
    examples = [Example(0, "def f(x): return x", 1), Example(1, long_text, 0), Example(2, "héllo wörld ✓", 1)]
    out = tokenize_examples(examples, tokenizer, max_length=16)
    assert [t.index for t in out] == [0, 1, 2] and [t.label for t in out] == [1, 0, 1]
    assert len(out[1].input_ids) == 16
    assert all(1 <= len(t.input_ids) <= 16 for t in out)
    # Byte-level BPE: short texts come back exactly.
    assert tokenizer.decode(out[0].input_ids) == "def f(x): return x"
    assert tokenizer.decode(out[2].input_ids) == "héllo wörld ✓"
    with pytest.raises(ValueError, match="max_length"):
        tokenize_examples(examples, tokenizer, max_length=0)


def test_collate_causal_lm_pads_right_and_masks_labels() -> None:
    batch = [TokenizedExample(7, [5, 6, 7], None), TokenizedExample(3, [0, 9], None)]
    out = collate(batch, pad_id=0, task="causal-lm")
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 9, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # The real token 0 (== pad id) keeps its label; only padding is ignored.
    assert out["labels"].tolist() == [[5, 6, 7], [0, 9, IGNORE_INDEX]]
    assert out["example_ids"].tolist() == [7, 3]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_classification_and_pad_multiple() -> None:
    batch = [TokenizedExample(0, [1, 2, 3, 4, 5], 2), TokenizedExample(1, [1], 0)]
    out = collate(batch, pad_id=9, task="sequence-classification", pad_to_multiple_of=4)
    assert out["input_ids"].shape == (2, 8)
    assert out["input_ids"][1].tolist() == [1] + [9] * 7
    assert out["attention_mask"].sum(dim=1).tolist() == [5, 1]
    assert out["labels"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="without a label"):
        collate([TokenizedExample(4, [1], None)], pad_id=0, task="sequence-classification")
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0, task="causal-lm")
    with pytest.raises(ValueError, match="unknown task"):
        collate(batch, pad_id=0, task="translation")  # type: ignore[arg-type]
