"""Training against a served teacher (``teacher.endpoint``, ``KDISTILL_TEACHER_URL``,
``teacher.serve.enabled`` under ``kdistill run``), with real ``kdistill serve`` processes:

- with K = the whole vocabulary the served top-K carries the full distribution, so the logits
  objective gives the in-process teacher's step losses;
- the teacher cache is filled from the served teacher, and the second epoch asks it nothing;
- ``kdistill run`` with ``teacher.serve.enabled`` starts its own server and stops it at the end;
- an endpoint that never answers fails the run with TEACHER_UNAVAILABLE and its reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kdistill.api.failures import ExitCode
from kdistill.trainer.runner import main_entry
from tests.serving.helpers import ServerProcess, free_port, metrics_text, running_server

from . import helpers


@pytest.fixture
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("KDISTILL_TERMINATION_LOG", str(path))
    monkeypatch.delenv("KDISTILL_TEACHER_URL", raising=False)
    return path


@pytest.fixture(scope="module")
def teacher_server(gpt2_teacher: Path) -> Iterator[ServerProcess]:
    with running_server(gpt2_teacher, "--max-wait-ms", "2", "--max-logprobs-binary", "1024") as s:
        yield s


def vocab_of(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def scored_prompts(server: ServerProcess) -> float:
    found = re.search(r"^kdistill_batch_size_sum (\S+)$", metrics_text(server), re.M)
    assert found
    return float(found.group(1))


def run_steps(job_file: Path, out: Path) -> tuple[int, list[dict[str, Any]], list[str]]:
    steps: list[dict[str, Any]] = []
    events: list[str] = []
    code = main_entry(
        job_file,
        out,
        on_step=lambda r: steps.append({"step": r.step, "parts": dict(r.parts)}),
        on_event=lambda name, fields: events.append(name),
    )
    return code, steps, events


def test_served_teacher_at_full_vocabulary_trains_like_the_in_process_one(
    tmp_path: Path,
    gpt2_teacher: Path,
    causal_data: tuple[Path, Path],
    teacher_server: ServerProcess,
    termination_log: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    train, _ = causal_data
    vocab = vocab_of(gpt2_teacher)
    # Padded batches on both sides (the in-process teacher would otherwise pack them), so that
    # both runs see the same micro-batches.
    monkeypatch.setenv("KDISTILL_PACKED_STEP", "0")
    job = helpers.job_dict(
        "served",
        "causal-lm",
        str(gpt2_teacher),
        str(train),
        None,
        stages=[{"name": "output", "steps": 4, "objectives": ["logits"]}],
        extra_distillation={"teacherCache": {"enabled": False, "topK": vocab}},
    )
    code, local_steps, _ = run_steps(helpers.write_job(tmp_path / "local.yaml", job), tmp_path / "local")
    assert code == 0
    job["spec"]["teacher"]["endpoint"] = teacher_server.url
    before = scored_prompts(teacher_server)
    code, served_steps, events = run_steps(helpers.write_job(tmp_path / "served.yaml", job), tmp_path / "served")
    assert code == 0, termination_log.read_text()
    assert "served-teacher" in events
    # Every micro-batch of 4 examples was scored by the server (+ the next one's look-ahead and
    # the start-up token check).
    assert scored_prompts(teacher_server) - before >= 4 * 4
    for mine, theirs in zip(served_steps, local_steps, strict=True):
        for part in ("kd", "ce", "total"):
            assert mine["parts"][part] == pytest.approx(theirs["parts"][part], rel=2e-4, abs=1e-5), (part, mine)


def same_length_texts(tokenizer: Any, n: int) -> list[str]:
    """``n`` short texts of one token count (no truncation, one example each)."""
    by_length: dict[int, list[str]] = {}
    for _, p in helpers.pydoc_paragraphs(400):
        by_length.setdefault(len(tokenizer(p[:50])["input_ids"]), []).append(p[:50])
    texts = max(by_length.values(), key=len)
    assert len(texts) >= n
    return texts[:n]


def test_served_teacher_fills_the_cache_once(
    tmp_path: Path, gpt2_teacher: Path, tokenizer: Any, teacher_server: ServerProcess, termination_log: Path
) -> None:
    rows = [{"text": t} for t in same_length_texts(tokenizer, 8)]
    train = helpers.write_jsonl(tmp_path / "train.jsonl", rows)
    job = helpers.job_dict(
        "cached",
        "causal-lm",
        str(gpt2_teacher),
        str(train),
        None,
        stages=[{"name": "output", "steps": 6, "objectives": ["logits"]}],  # 3 epochs of 2 batches
        extra_distillation={"teacherCache": {"enabled": True, "topK": 8}},
        extra_data={"sampling": {"strategy": "uniform"}},
    )
    job["spec"]["teacher"]["endpoint"] = teacher_server.url
    before = scored_prompts(teacher_server)
    code, steps, _ = run_steps(helpers.write_job(tmp_path / "job.yaml", job), tmp_path / "out")
    assert code == 0, termination_log.read_text()
    assert len(steps) == 6 and all(s["parts"]["kd"] > 0 for s in steps)
    assert list((tmp_path / "out" / "teacher-cache").glob("shard-*.kdtc"))
    first = scored_prompts(teacher_server) - before
    assert 8 + 1 <= first < 6 * 4 + 4 + 1  # some batches were read back from the cache
    # A second run on a copy of the filled cache asks the server nothing but the start-up token
    # check, and trains on exactly the same targets.
    shutil.copytree(tmp_path / "out" / "teacher-cache", tmp_path / "again" / "teacher-cache")
    before = scored_prompts(teacher_server)
    code, again, _ = run_steps(helpers.write_job(tmp_path / "job.yaml", job), tmp_path / "again")
    assert code == 0, termination_log.read_text()
    assert scored_prompts(teacher_server) - before == 1
    assert [s["parts"] for s in again] == [s["parts"] for s in steps]


def test_kdistill_run_serves_the_teacher_locally(tmp_path: Path, gpt2_teacher: Path) -> None:
    rows = [{"text": p} for _, p in helpers.pydoc_paragraphs(40)]
    train = helpers.write_jsonl(tmp_path / "train.jsonl", rows[:32])
    ev = helpers.write_jsonl(tmp_path / "eval.jsonl", rows[32:])
    job = helpers.job_dict(
        "local-served",
        "causal-lm",
        str(gpt2_teacher),
        str(train),
        str(ev),
        stages=[{"name": "output", "steps": 3, "objectives": ["logits"]}],
    )
    job["spec"]["teacher"]["serve"] = {"enabled": True, "batching": {"maxBatchSize": 8, "maxWaitMs": 2}}
    job_file = helpers.write_job(tmp_path / "job.yaml", job)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "KDISTILL_TEACHER_URL"}
    env["KDISTILL_TERMINATION_LOG"] = str(tmp_path / "termination-log")
    command = [sys.executable, "-P", "-m", "kdistill.cli.main", "run", str(job_file), "--output", str(out)]
    proc = subprocess.run(
        [*command, "--log-format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    served = [line for line in lines if line.get("event") == "served-teacher"]
    assert served and served[0]["url"].startswith("http://127.0.0.1:") and served[0]["sameTokens"] is True
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 3 and result["metrics"]["metric"] == "perplexity"
    assert (out / "teacher-server.log").is_file()
    # The server is gone once the run is.
    port = int(served[0]["url"].rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and port_open(port):
        time.sleep(0.2)
    assert not port_open(port)


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_an_endpoint_that_never_answers_fails_with_its_reason(
    tmp_path: Path, gpt2_teacher: Path, causal_data: tuple[Path, Path], termination_log: Path, monkeypatch: Any
) -> None:
    train, _ = causal_data
    url = f"http://127.0.0.1:{free_port()}"
    job = helpers.job_dict("unreachable", "causal-lm", str(gpt2_teacher), str(train), None)
    # Endpoint only: the student is a model directory (the tiny teacher's, as good as any).
    job["spec"]["teacher"] = {"endpoint": url}
    job["spec"]["student"] = {"model": str(gpt2_teacher)}
    monkeypatch.setenv("KDISTILL_TEACHER_TIMEOUT_S", "1.5")
    started = time.monotonic()
    code = main_entry(helpers.write_job(tmp_path / "job.yaml", job), tmp_path / "out")
    assert code == ExitCode.TEACHER_UNAVAILABLE
    assert time.monotonic() - started < 60
    term = json.loads(termination_log.read_text())
    assert term["reason"] == "TEACHER_UNAVAILABLE" and term["retryable"] is True
    assert url in term["message"] and "1.5s" in term["message"]


def test_served_teacher_eval_equals_the_in_process_one(gpt2_teacher: Path, tokenizer: Any) -> None:
    """The teacher's eval over its log-probs (as a served teacher is scored) is evaluate()'s."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdistill.trainer.batching import collate
    from kdistill.trainer.data import TokenizedExample
    from kdistill.trainer.evaluate import evaluate
    from kdistill.trainer.local_teacher import LocalTeacher
    from kdistill.trainer.remote_targets import evaluate_remote

    model = AutoModelForCausalLM.from_pretrained(str(gpt2_teacher), use_safetensors=True).eval()
    texts = [p[:120] for _, p in helpers.pydoc_paragraphs(10)]
    examples = [TokenizedExample(index=i, input_ids=tokenizer(t)["input_ids"], label=None) for i, t in enumerate(texts)]
    batches = [collate(examples[i : i + 4], int(tokenizer.pad_token_id), "causal-lm") for i in range(0, 10, 4)]
    for b in batches:
        b["scored_bytes"] = torch.full((b["input_ids"].shape[0],), 100)
    remote = evaluate_remote(LocalTeacher(model, tokenizer), batches)
    local = evaluate(model, batches, "causal-lm", torch.device("cpu"))
    assert remote.count == local.count and remote.metric == local.metric
    assert remote.loss == pytest.approx(local.loss, rel=1e-5)
    assert remote.bits_per_byte == pytest.approx(local.bits_per_byte, rel=1e-5)


def test_a_teacher_killed_mid_run_pauses_the_run_until_it_is_back(
    tmp_path: Path, gpt2_teacher: Path, causal_data: tuple[Path, Path], termination_log: Path
) -> None:
    train, _ = causal_data
    server = ServerProcess(gpt2_teacher, "--max-wait-ms", "2")
    server.wait_ready()
    restarted: list[subprocess.Popen[bytes]] = []
    job = helpers.job_dict(
        "teacher-killed",
        "causal-lm",
        str(gpt2_teacher),
        str(train),
        None,
        stages=[{"name": "output", "steps": 5, "objectives": ["logits"]}],
        extra_distillation={"teacherCache": {"enabled": False, "topK": 16}},
    )
    job["spec"]["teacher"]["endpoint"] = server.url
    steps: list[int] = []

    def on_step(report: Any) -> None:
        steps.append(report.step)
        if report.step == 2:  # the teacher's pod dies, and its Deployment starts a new one
            server.proc.kill()
            server.proc.wait()
            log = server.log_path.open("ab")
            restarted.append(subprocess.Popen(server.proc.args, stdout=log, stderr=subprocess.STDOUT))

    try:
        code = main_entry(helpers.write_job(tmp_path / "job.yaml", job), tmp_path / "out", on_step=on_step)
    finally:
        server.terminate()
        for proc in restarted:
            proc.terminate()
            proc.wait(60)
    assert code == 0, termination_log.read_text()
    assert steps == [1, 2, 3, 4, 5] and restarted


@pytest.mark.parametrize("rank", [0, 1])
def test_the_look_ahead_takes_no_batch_from_the_sampler(rank: int) -> None:
    """peek_next names the batch the sampler hands out next, at every step and across windows,
    and leaves its state alone: a checkpoint counts only the batches trained on."""
    from kdistill.trainer.data import TokenizedExample
    from kdistill.trainer.remote_targets import peek_next
    from kdistill.trainer.sampling import BatchSampler

    examples = [TokenizedExample(index=i, input_ids=[1] * (1 + i % 7), label=None) for i in range(50)]
    sampler = BatchSampler(
        examples,
        8,
        strategy="uniform",
        tiers=None,
        shares=(1.0, 0.0, 0.0),
        seed=3,
        rank=rank,
        world=2,
        window_batches=4,
    )
    for _ in range(20):  # five windows
        state = sampler.state_dict()
        ahead = peek_next(sampler)
        assert sampler.state_dict() == state
        assert next(sampler) == ahead
