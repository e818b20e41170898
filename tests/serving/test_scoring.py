"""Teacher scoring over HTTP: ``kdistill serve`` of a plain Hugging Face directory (FP32 GPT2 built
from a config) answers ``/v1/completions`` with ``echo, max_tokens 0, logprobs K`` with the model's
own log-softmax, in JSON and in the binary frame; generated tokens carry the same; concurrent
scoring requests share batches; bad input is a 400 naming the field."""

from __future__ import annotations

import concurrent.futures
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from kdistill.serving.logprobs_wire import BINARY_MEDIA_TYPE, read_binary_frame
from tests.serving.helpers import ServerProcess, metrics_text, running_server
from tests.serving.hf_dirs import save_hf_dir

PROMPTS = [
    "The for statement is used to iterate over the elements of a sequence",
    "Names refer to objects.",
]
JSON_K, BINARY_K = 5, 40


@pytest.fixture(scope="module")
def hf_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = save_hf_dir(tmp_path_factory.mktemp("hf"))
    assert (out / "model.safetensors").is_file() and not (out / "kdistill.json").exists()
    return out


@pytest.fixture(scope="module")
def server(hf_lm_dir: Path) -> Iterator[ServerProcess]:
    # A full batch of 4 forms at once; a lone request waits out the 1 s window.
    flags = ["--max-logprobs", str(JSON_K), "--max-logprobs-binary", str(BINARY_K), "--max-batch-size", "4"]
    with running_server(hf_lm_dir, *flags, "--max-wait-ms", "1000", "--max-tokens-limit", "16") as s:
        yield s


@pytest.fixture(scope="module")
def reference(hf_lm_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(hf_lm_dir), use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(hf_lm_dir))
    return model, tokenizer


def ref_logprobs(reference: Any, ids: list[int]) -> torch.Tensor:
    """[T - 1, V]: log-softmax of the prediction of each token after the first."""
    model, _ = reference
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1]


def post(server: ServerProcess, body: dict[str, Any], binary: bool = False) -> httpx.Response:
    headers = {"Accept": BINARY_MEDIA_TYPE} if binary else {}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)


def test_json_scoring_equals_the_models_log_softmax(server: ServerProcess, reference: Any) -> None:
    r = post(server, {"prompt": PROMPTS, "echo": True, "max_tokens": 0, "logprobs": JSON_K})
    assert r.status_code == 200, r.text
    body = r.json()
    _, tokenizer = reference
    assert body["usage"]["completion_tokens"] == 0
    for text, choice in zip(PROMPTS, body["choices"], strict=True):
        ids = tokenizer(text)["input_ids"]
        expected = ref_logprobs(reference, ids)
        lp = choice["logprobs"]
        assert choice["text"] == text
        assert lp["tokens"] == [tokenizer.decode([t]) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        offsets = [0]
        for t in lp["tokens"][:-1]:
            offsets.append(offsets[-1] + len(t))
        assert lp["text_offset"] == offsets
        for i in range(1, len(ids)):
            assert abs(lp["token_logprobs"][i] - float(expected[i - 1, ids[i]])) < 1e-4
            top_lp, top_ids = torch.topk(expected[i - 1], JSON_K)
            want: dict[str, float] = {}
            for t, v in zip(top_ids.tolist(), top_lp.tolist(), strict=True):
                want.setdefault(tokenizer.decode([t]), v)  # ids decoding to the same text share an entry
            row = lp["top_logprobs"][i]
            assert list(row) == list(want)  # most likely first
            assert all(abs(a - b) < 1e-4 for a, b in zip(row.values(), want.values(), strict=True))


def test_binary_scoring_equals_the_models_log_softmax(server: ServerProcess, reference: Any) -> None:
    r = post(server, {"prompt": PROMPTS, "echo": True, "max_tokens": 0, "logprobs": BINARY_K}, binary=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == BINARY_MEDIA_TYPE
    tensors, meta = read_binary_frame(r.content)
    assert meta["format"] == "kdistill.logprobs/1" and meta["k"] == str(BINARY_K) and meta["echo"] == "true"
    _, tokenizer = reference
    all_ids = [tokenizer(text)["input_ids"] for text in PROMPTS]
    assert tensors["lengths"].tolist() == [len(ids) for ids in all_ids]
    assert tensors["token_ids"].dtype == torch.int32 and tensors["top_logprobs"].dtype == torch.float32
    start = 0
    for ids in all_ids:
        n = len(ids)
        rows = slice(start, start + n)
        assert tensors["token_ids"][rows].tolist() == ids
        own, top_ids, top_lp = tensors["token_logprobs"][rows], tensors["top_ids"][rows], tensors["top_logprobs"][rows]
        assert math.isnan(own[0]) and top_ids[0].tolist() == [-1] * BINARY_K
        expected = ref_logprobs(reference, ids)
        torch.testing.assert_close(
            own[1:], expected.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4, rtol=0
        )
        want_lp, want_ids = torch.topk(expected, BINARY_K, dim=-1)
        assert top_ids[1:].tolist() == want_ids.tolist()
        torch.testing.assert_close(top_lp[1:], want_lp, atol=1e-4, rtol=0)
        start += n


def test_generated_tokens_carry_their_log_probs(server: ServerProcess, reference: Any) -> None:
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0.0, "logprobs": 3}
    r = post(server, body, binary=True)
    assert r.status_code == 200, r.text
    tensors, meta = read_binary_frame(r.content)
    assert meta["echo"] == "false"
    gen = tensors["token_ids"].tolist()
    assert gen and tensors["lengths"].tolist() == [len(gen)]
    _, tokenizer = reference
    prompt_ids = tokenizer(PROMPTS[1])["input_ids"]
    expected = ref_logprobs(reference, prompt_ids + gen)[len(prompt_ids) - 1 :]
    assert tensors["top_ids"][:, 0].tolist() == gen  # greedy: the top alternative is the token
    torch.testing.assert_close(tensors["top_logprobs"], torch.topk(expected, 3, dim=-1).values, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        tensors["token_logprobs"], expected.gather(-1, torch.tensor(gen)[:, None])[:, 0], atol=1e-4, rtol=0
    )
    j = post(server, body).json()["choices"][0]
    lp = j["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in gen]
    assert lp["text_offset"][0] == len(PROMPTS[1])
    assert all(abs(a - b) < 1e-4 for a, b in zip(lp["token_logprobs"], tensors["token_logprobs"].tolist(), strict=True))


def batch_counts(server: ServerProcess) -> tuple[float, float]:
    """(batches, requests in them) from the server's ``kdistill_batch_size`` histogram."""
    text = metrics_text(server)
    count = re.search(r"^kdistill_batch_size_count (\S+)$", text, re.M)
    total = re.search(r"^kdistill_batch_size_sum (\S+)$", text, re.M)
    assert count and total, text
    return float(count.group(1)), float(total.group(1))


def test_concurrent_scoring_requests_share_batches(server: ServerProcess) -> None:
    batches, requests = batch_counts(server)
    bodies = [{"prompt": f"{PROMPTS[0]} {i}", "echo": True, "max_tokens": 0, "logprobs": 2} for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: post(server, b), bodies))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    after_batches, after_requests = batch_counts(server)
    assert after_requests - requests == 4
    assert after_batches - batches < 4  # at least two of the four scored in one forward batch


@pytest.mark.parametrize(
    ("body", "binary", "param"),
    [
        ({"prompt": "x y", "echo": True, "max_tokens": 0, "logprobs": JSON_K + 1}, False, "logprobs"),
        ({"prompt": "x y", "echo": True, "max_tokens": 0, "logprobs": BINARY_K + 1}, True, "logprobs"),
        ({"prompt": "x y", "echo": True, "max_tokens": 0}, True, "logprobs"),
        ({"prompt": "import " * 200, "echo": True, "max_tokens": 0, "logprobs": 1}, False, "prompt"),
        ({"prompt": "", "echo": True, "max_tokens": 0, "logprobs": 1}, False, "prompt"),
        ({"prompt": ["a b", "  "], "echo": True, "max_tokens": 0, "logprobs": 1}, False, "prompt[1]"),
        ({"prompt": "x y", "max_tokens": 0, "logprobs": 1}, False, "max_tokens"),
        ({"prompt": "x y", "echo": True, "max_tokens": 4, "logprobs": 1}, False, "max_tokens"),
        ({"prompt": "x y", "max_tokens": 4, "logprobs": 1, "stream": True}, False, "stream"),
        ({"prompt": "x y", "echo": True, "max_tokens": 0, "logprobs": -1}, False, "logprobs"),
    ],
)
def test_bad_scoring_input_is_a_400_naming_the_field(
    server: ServerProcess, body: dict[str, Any], binary: bool, param: str
) -> None:
    r = post(server, body, binary)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
