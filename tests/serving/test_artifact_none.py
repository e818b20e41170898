"""``quantization.mode: none`` still leaves a servable, self-describing artifact: the full-precision
student with ``kdistill.json`` (mode "none") at ``student-int8/``, which loads to identical outputs and
which ``kdistill serve`` serves."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from kdistill.trainer.artifact import ArtifactError, load_artifact, read_meta
from kdistill.trainer.outputs import OutputLayout, write_served_artifact
from kdistill.trainer.quantization import int8_modules, quantize_ptq_int8
from tests.serving.helpers import build_tiny_tokenizer, pydoc_texts, running_server, tiny_bert_classifier, tiny_gpt2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def test_mode_none_writes_a_self_describing_fp32_artifact(tmp_path: Path, tokenizer: object) -> None:
    model = tiny_gpt2(len(tokenizer), seed=3)  # type: ignore[arg-type]
    layout = OutputLayout(tmp_path / "job-none")
    out = write_served_artifact(
        model,
        tokenizer,
        layout,
        task="causal-lm",
        quantization="none",
        metrics={"metric": "perplexity", "retention": 0.97},
    )
    assert out == layout.student_int8
    meta = read_meta(out)
    on_disk = json.loads((out / "kdistill.json").read_text())
    assert meta == on_disk
    assert meta["quantization"]["mode"] == "none" and meta["quantization"]["int8_modules"] == []
    assert meta["quantization"]["weights"] == "float32"
    assert meta["task"] == "causal-lm" and meta["metrics"]["retention"] == 0.97
    assert {"config.json", "model.safetensors"} <= set(meta["files"])

    loaded = load_artifact(out)
    assert int8_modules(loaded.model) == []
    ids = torch.tensor([tokenizer("The for statement is used")["input_ids"]])  # type: ignore[operator]
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


def test_mode_none_refuses_an_int8_model(tmp_path: Path, tokenizer: object) -> None:
    int8 = quantize_ptq_int8(tiny_bert_classifier(len(tokenizer)))  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match="quantization 'none' but the model has"):
        write_served_artifact(
            int8,
            tokenizer,
            OutputLayout(tmp_path / "j"),
            task="sequence-classification",
            quantization="none",
            metrics={},
        )
    assert not (tmp_path / "j" / "student-int8").exists()


def test_kdistill_serve_serves_a_mode_none_artifact(tmp_path: Path, tokenizer: object) -> None:
    model = tiny_bert_classifier(len(tokenizer), seed=5)  # type: ignore[arg-type]
    layout = OutputLayout(tmp_path / "intent-fp32")
    out = write_served_artifact(
        model, tokenizer, layout, task="sequence-classification", quantization="none", metrics={}
    )
    text = pydoc_texts(5)[2][:200]
    ids = torch.tensor([tokenizer(text)["input_ids"]])  # type: ignore[operator]
    with torch.inference_mode():
        want = torch.softmax(model(input_ids=ids).logits, -1)[0].tolist()
    with running_server(out) as server:
        r = httpx.post(
            f"{server.url}/v2/models/intent-fp32/infer",
            timeout=60,
            json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]},
        )
        assert r.status_code == 200, r.text
        probs = r.json()["outputs"][1]["data"]
        assert probs == pytest.approx(want, abs=1e-5)
