"""Fixtures: a tiny GPT2 teacher and a tiny BERT classifier, with tokenizers, saved to disk once."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import helpers


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    helpers.make_tokenizer(d, [p for _, p in helpers.pydoc_paragraphs(300)])
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def gpt2_teacher(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("gpt2-teacher")
    return helpers.save_model(helpers.gpt2(len(tokenizer)), tokenizer, d)


@pytest.fixture(scope="session")
def bert_teacher(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("bert-teacher")
    return helpers.save_model(helpers.bert(len(tokenizer), num_labels=3), tokenizer, d)


@pytest.fixture(scope="session")
def causal_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return helpers.causal_data(tmp_path_factory.mktemp("causal-data"))


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return helpers.classification_data(tmp_path_factory.mktemp("cls-data"))
