"""``kdistill serve`` of plain Hugging Face directories: what loads (safetensors only, the task from
the architecture), scoring and generation sharing one causal-LM batch (including a scoring request
admitted into a running generation), and a served classifier refusing echo."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from kdistill.serving import scoring
from kdistill.serving.batcher import BatchPolicy
from kdistill.serving.engine import Engine
from kdistill.serving.generation import GenRequest, GenResult
from kdistill.serving.metrics import ServerMetrics
from kdistill.serving.model_dir import kind_of, load_model_dir
from kdistill.serving.scoring import ScoreRequest, TokenLogprobs
from kdistill.trainer.artifact import ArtifactError
from tests.serving.helpers import running_server
from tests.serving.hf_dirs import save_hf_dir


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-dirs")


@pytest.fixture(scope="module")
def lm_dir(hf_root: Path) -> Path:
    return save_hf_dir(hf_root, "causal-lm")


@pytest.fixture(scope="module")
def engine(lm_dir: Path) -> Engine:
    return Engine(load_model_dir(lm_dir), ServerMetrics())


def test_plain_directories_load_with_their_task(hf_root: Path, lm_dir: Path) -> None:
    artifact = load_model_dir(lm_dir)
    assert kind_of(lm_dir) == "huggingface"
    assert artifact.task == "causal-lm" and artifact.meta["source"] == "huggingface"
    assert type(artifact.model).__name__ == "GPT2LMHeadModel"
    classifier = load_model_dir(save_hf_dir(hf_root, "sequence-classification"))
    assert classifier.task == "sequence-classification"


def test_pickled_weights_are_not_loaded(hf_root: Path) -> None:
    pickled = save_hf_dir(hf_root, "causal-lm", safetensors=False)
    assert not list(pickled.glob("*.safetensors"))
    with pytest.raises(ArtifactError, match=r"no \*\.safetensors weights"):
        load_model_dir(pickled)


def test_a_directory_of_neither_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"neither kdistill\.json"):
        load_model_dir(tmp_path)
    r = subprocess.run(
        [sys.executable, "-P", "-m", "kdistill.cli.main", "serve", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    flat = " ".join(r.stderr.replace("│", " ").split())
    assert r.returncode == 2 and "(no config.json)" in flat


def reference_scores(engine: Engine, ids: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)[:-1]
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], torch.topk(logp, k, dim=-1).indices


def assert_scored(engine: Engine, lp: Any, ids: list[int], k: int) -> None:
    assert isinstance(lp, TokenLogprobs) and lp.token_ids == ids and lp.k == k
    own, top = reference_scores(engine, ids, k)
    torch.testing.assert_close(lp.token_logprobs[1:], own, atol=1e-4, rtol=0)
    assert lp.top_ids[1:].tolist() == top.tolist()


@pytest.mark.parametrize("chunk", [3, 256])  # log-softmax in pieces of 3 positions, or in one
def test_a_mixed_batch_answers_in_order(engine: Engine, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scoring, "SCORE_CHUNK", chunk)
    short, long = engine.encode("Names refer to objects."), engine.encode("The for statement iterates over a list")
    batch: list[GenRequest | ScoreRequest] = [
        ScoreRequest(long, 4),
        GenRequest(short, max_tokens=3, temperature=0.0),
        ScoreRequest(short, 2),
    ]
    results = engine.run_generation(batch)
    assert len(results) == 3 and isinstance(results[1], GenResult)
    assert_scored(engine, results[0], long, 4)
    assert_scored(engine, results[2], short, 2)


class OneAdmission:
    """The slice of ``DynamicBatcher`` generation uses, handing out ``waiting`` once: the admission
    of a request that arrived while a generation batch decodes, without threads or clocks."""

    def __init__(self, waiting: list[Any]) -> None:
        self.policy = BatchPolicy(max_batch_size=4, max_batch_tokens=4096)
        self.waiting = waiting

    @property
    def depth(self) -> int:
        return len(self.waiting)

    def admit(self, limit: int, token_budget: int) -> list[Any]:
        taken, self.waiting = self.waiting[:limit], self.waiting[limit:]
        return taken


def test_a_scoring_request_admitted_into_a_running_generation(engine: Engine) -> None:
    ids = engine.encode("Names refer to objects.")
    answered: list[TokenLogprobs] = []
    waiting = ScoreRequest(ids, 3, on_done=answered.append)
    engine.attach(OneAdmission([waiting]))  # type: ignore[arg-type]  # the slice generation uses
    try:
        results = engine.run_generation([GenRequest(ids, max_tokens=8, temperature=0.0)])
    finally:
        engine._batcher = None
    assert len(results) == 2 and isinstance(results[0], GenResult)
    assert len(answered) == 1 and answered[0] is results[1]  # answered at admission, returned in order
    assert_scored(engine, results[1], ids, 3)


def test_a_served_classifier_refuses_echo_and_still_classifies(hf_root: Path) -> None:
    cls_dir = hf_root / "served-classifier"
    shutil.copytree(save_hf_dir(hf_root, "sequence-classification"), cls_dir)
    with running_server(cls_dir, "--max-wait-ms", "5") as server:
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "x y", "echo": True, "max_tokens": 0, "logprobs": 1},
            timeout=30,
        )
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert "sequence-classification" in r.json()["error"]["message"]
        ok = httpx.post(f"{server.url}/v1/classify", json={"texts": ["a list of names"]}, timeout=30)
        assert ok.status_code == 200, ok.text
