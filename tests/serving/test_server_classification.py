"""The classification server over loopback: /v1/classify, KServe v2 infer, dynamic batching."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from kdistill.trainer.artifact import Artifact
from tests.serving.helpers import LABELS, ServerProcess, load_served, pydoc_texts

NAME = "cls-ptq-int8"


@pytest.fixture(scope="module")
def local(cls_artifact: Path, cls_server: ServerProcess) -> Artifact:
    return load_served(cls_artifact, cls_server)


def direct_probs(local: Artifact, text: str) -> list[float]:
    ids = torch.tensor([local.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        return torch.softmax(local.model(input_ids=ids).logits, -1)[0].tolist()


def test_classify_matches_the_model(cls_server: ServerProcess, local: Artifact) -> None:
    text = "The with statement is used to wrap the execution of a block"
    r = httpx.post(f"{cls_server.url}/v1/classify", json={"texts": [text]}, timeout=30)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    want = direct_probs(local, text)
    assert list(result["scores"]) == LABELS
    assert list(result["scores"].values()) == pytest.approx(want, abs=1e-5)  # a batch of one: same kernel, same numbers
    assert result["label"] == LABELS[max(range(len(want)), key=want.__getitem__)]
    assert result["score"] == pytest.approx(max(want), abs=1e-5)


def test_kserve_v2_infer_and_metadata(cls_server: ServerProcess, local: Artifact) -> None:
    texts = ["x = [1, 2]", "Class definitions create a class object"]
    body = {"id": "req-1", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]}
    r = httpx.post(f"{cls_server.url}/v2/models/{NAME}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "req-1" and out["model_name"] == NAME
    labels, probs = out["outputs"]
    assert labels["shape"] == [2] and probs["shape"] == [2, len(LABELS)] and probs["datatype"] == "FP32"
    for i, text in enumerate(texts):
        row = probs["data"][i * len(LABELS) : (i + 1) * len(LABELS)]
        assert row == pytest.approx(direct_probs(local, text), abs=0.02)  # batched with padding
        assert sum(row) == pytest.approx(1.0, abs=1e-5)
    meta = httpx.get(f"{cls_server.url}/v2/models/{NAME}").json()
    assert meta["inputs"][0]["datatype"] == "BYTES"
    assert httpx.get(f"{cls_server.url}/v2/models/{NAME}/ready").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        (
            f"/v2/models/{NAME}/infer",
            {"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
            400,
            "inputs[0].datatype",
        ),
        (
            f"/v2/models/{NAME}/infer",
            {"inputs": [{"name": "t", "shape": [3], "datatype": "BYTES", "data": ["a"]}]},
            400,
            "inputs[0].shape",
        ),
        (
            f"/v2/models/{NAME}/infer",
            {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": [7]}]},
            400,
            "inputs[0].data[0]",
        ),
        (f"/v2/models/{NAME}/infer", {"inputs": []}, 400, "inputs"),
        (
            "/v2/models/other/infer",
            {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
            404,
            "name",
        ),
        ("/v1/classify", {"texts": []}, 400, "texts"),
        ("/v1/classify", {"texts": ["ok", ""]}, 400, "texts[1]"),
        ("/v1/classify", {"texts": "not a list"}, 400, "texts"),
        ("/v1/classify", {"texts": ["a"] * 65}, 400, "texts"),
        ("/v1/classify", {"texts": ["word " * 300]}, 400, "texts[0]"),
        ("/v1/classify", {"texts": ["a"], "model": "bert-base"}, 404, "model"),
        ("/v1/completions", {"prompt": "a"}, 404, "model"),
    ],
)
def test_bad_classification_requests(
    cls_server: ServerProcess, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    r = httpx.post(f"{cls_server.url}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if path.startswith("/v2/"):
        # Open Inference Protocol: {"error": "<message>"}, a plain string that names the field first.
        assert set(r.json()) == {"error"} and isinstance(error, str)
        assert error.startswith(f"{param}: "), error
    else:
        assert error["param"] == param  # OpenAI shape


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("POST", f"/v2/models/{NAME}/infer", b"{not json", 400, "body"),
        (
            "POST",
            f"/v2/models/{NAME}/infer",
            {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES"}]},
            400,
            "inputs[0].data",
        ),
        (
            "POST",
            f"/v2/models/{NAME}/infer",
            {"inputs": [{"name": "t", "shape": ["x"], "datatype": "BYTES", "data": ["a"]}]},
            400,
            "inputs[0].shape[0]",
        ),
        (
            "POST",
            f"/v2/models/{NAME}/infer",
            {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["  "]}]},
            400,
            "inputs[0].data[0]",
        ),
        (
            "POST",
            f"/v2/models/{NAME}/infer",
            {"inputs": [{"name": "t", "shape": [65], "datatype": "BYTES", "data": ["a"] * 65}]},
            400,
            "inputs[0].data",
        ),
        ("GET", "/v2/models/other", None, 404, "name"),
        ("GET", "/v2/models/other/ready", None, 404, "name"),
        ("GET", "/v2/no/such/path", None, 404, "path"),
    ],
)
def test_kserve_v2_errors_use_the_open_inference_protocol_shape(
    cls_server: ServerProcess, method: str, path: str, body: Any, status: int, field: str
) -> None:
    kwargs: dict[str, Any] = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
        if body is not None
        else {}
    )
    r = httpx.request(method, f"{cls_server.url}{path}", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    payload = r.json()
    assert list(payload) == ["error"] and isinstance(payload["error"], str), payload
    assert payload["error"].startswith(f"{field}: "), payload


def test_v2_oversized_body_is_413_in_the_v2_shape_and_v1_keeps_the_openai_shape(cls_server: ServerProcess) -> None:
    big = b'{"texts": ["' + b"a" * (2 << 20) + b'"]}'
    v2 = httpx.post(
        f"{cls_server.url}/v2/models/{NAME}/infer",
        content=big,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert v2.status_code == 413 and v2.json() == {"error": v2.json()["error"]}
    assert v2.json()["error"].startswith("body: ")
    v1 = httpx.post(
        f"{cls_server.url}/v1/classify", content=big, headers={"content-type": "application/json"}, timeout=60
    )
    assert v1.status_code == 413 and v1.json()["error"]["param"] == "body"


def test_concurrent_requests_are_batched_and_answered_correctly(cls_server: ServerProcess, local: Artifact) -> None:
    # Mixed lengths, all within the 128-token context.
    texts = [t[: 20 + (i * 37) % 200] for i, t in enumerate(pydoc_texts(200)[:48])]
    texts = [t for t in texts if len(local.tokenizer(t)["input_ids"]) <= 128]
    assert len(texts) > 32

    def one(text: str) -> dict[str, Any]:
        return httpx.post(f"{cls_server.url}/v1/classify", json={"texts": [text]}, timeout=60).json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, texts))
    for text, answer in zip(texts, answers, strict=True):
        want = direct_probs(local, text)
        assert list(answer["results"][0]["scores"].values()) == pytest.approx(want, abs=0.02)
    metrics = httpx.get(f"{cls_server.url}/metrics").text
    sizes = {
        line.split("le=")[1].split("}")[0].strip('"'): float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("kdistill_batch_size_bucket")
    }
    assert sizes["1.0"] < sizes["+Inf"]  # some batches held more than one request
    assert "kdistill_padding_efficiency_ratio" in metrics


def test_metrics_label_requests_by_route_template_and_count_errors_by_status(cls_server: ServerProcess) -> None:
    def value(text: str, series: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " "))

    series = 'kdistill_errors_total{endpoint="/v2/models/{name}/infer",status="404"}'
    before = value(httpx.get(f"{cls_server.url}/metrics").text, series)
    body = {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}
    for _ in range(2):
        assert httpx.post(f"{cls_server.url}/v2/models/nope-{_}/infer", json=body, timeout=30).status_code == 404
    assert httpx.post(f"{cls_server.url}/v1/classify", json={"texts": ["a b"]}, timeout=30).status_code == 200
    text = httpx.get(f"{cls_server.url}/metrics").text
    assert value(text, series) == before + 2  # one series for every model name: the route's template
    assert value(text, 'kdistill_request_latency_seconds_count{endpoint="/v1/classify"}') >= 1
    assert value(text, "kdistill_requests_in_flight") == 0
