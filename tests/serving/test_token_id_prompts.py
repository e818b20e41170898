"""Prompts as token ids (``prompt: [ids]`` or ``[[ids], ...]``, as the OpenAI API and vLLM take
them): scoring and generation answer as for the same text, and ids outside the vocabulary or past
the context are a 400 naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from kdistill.serving.logprobs_wire import BINARY_MEDIA_TYPE, read_binary_frame
from tests.serving.helpers import ServerProcess, running_server
from tests.serving.hf_dirs import save_hf_dir

TEXTS = ["The for statement is used to iterate over the elements of a sequence", "Names refer to objects."]


@pytest.fixture(scope="module")
def hf_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_dir(tmp_path_factory.mktemp("hf-ids"))


@pytest.fixture(scope="module")
def server(hf_lm_dir: Path) -> Iterator[ServerProcess]:
    with running_server(hf_lm_dir, "--max-wait-ms", "2", "--max-tokens-limit", "8") as s:
        yield s


@pytest.fixture(scope="module")
def tokenizer(hf_lm_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_lm_dir))


def post(server: ServerProcess, body: dict[str, Any], binary: bool = False) -> httpx.Response:
    headers = {"Accept": BINARY_MEDIA_TYPE} if binary else {}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)


def test_id_prompts_score_like_their_text(server: ServerProcess, tokenizer: Any) -> None:
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    scoring = {"echo": True, "max_tokens": 0, "logprobs": 4}
    by_text = read_binary_frame(post(server, {"prompt": TEXTS, **scoring}, binary=True).content)[0]
    by_ids = read_binary_frame(post(server, {"prompt": ids, **scoring}, binary=True).content)[0]
    assert by_ids["lengths"].tolist() == [len(i) for i in ids]
    assert by_ids["token_ids"].tolist() == [t for row in ids for t in row]
    for name in ("token_logprobs", "top_logprobs"):
        torch.testing.assert_close(by_ids[name], by_text[name], equal_nan=True, rtol=0, atol=1e-5)
    # One id list alone is one prompt; the JSON answer echoes its text.
    one = post(server, {"prompt": ids[1], **scoring}).json()
    assert len(one["choices"]) == 1
    assert one["choices"][0]["text"] == tokenizer.decode(ids[1])
    assert len(one["choices"][0]["logprobs"]["tokens"]) == len(ids[1])


def test_id_prompt_generates_like_its_text(server: ServerProcess, tokenizer: Any) -> None:
    body = {"max_tokens": 5, "temperature": 0.0}
    by_text = post(server, {"prompt": TEXTS[0], **body}).json()["choices"][0]["text"]
    by_ids = post(server, {"prompt": tokenizer(TEXTS[0])["input_ids"], **body}).json()["choices"][0]["text"]
    assert by_ids == by_text


@pytest.mark.parametrize(
    ("prompt", "param", "words"),
    [
        ([5, 10**6], "prompt", "outside the vocabulary"),
        ([[5, 6], [7, -1]], "prompt[1]", "outside the vocabulary"),
        ([[5, 6], []], "prompt[1]", "must not be empty"),
        ([5] * 1000, "prompt", "context"),
    ],
)
def test_bad_ids_are_a_400_naming_the_field(server: ServerProcess, prompt: Any, param: str, words: str) -> None:
    r = post(server, {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_mixed_ids_and_text_are_refused(server: ServerProcess) -> None:
    r = post(server, {"prompt": [5, "x"], "echo": True, "max_tokens": 0, "logprobs": 1})
    assert 400 <= r.status_code < 500, r.text


def test_tokens_named_by_id_on_request(server: ServerProcess, tokenizer: Any) -> None:
    ids = tokenizer(TEXTS[1])["input_ids"]
    body = {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 3}
    named = post(server, {**body, "return_tokens_as_token_ids": True}).json()["choices"][0]["logprobs"]
    plain = post(server, body).json()["choices"][0]["logprobs"]
    assert named["tokens"] == [f"token_id:{t}" for t in ids]
    assert named["text_offset"] == plain["text_offset"]  # offsets still count the decoded text
    assert named["top_logprobs"][0] is None
    assert all(len(row) == 3 and all(k.startswith("token_id:") for k in row) for row in named["top_logprobs"][1:])
