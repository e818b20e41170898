"""The sequence objective: the generated set (atomic shards, manifest, resume), a kill -9 during
generation against a real served teacher, sequence-level runs, and a later job on the set."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch

from kdistill.api.failures import ExitCode
from kdistill.trainer import generated_set as gs
from kdistill.trainer.errors import TrainerError
from kdistill.trainer.fsio import sha256_file
from kdistill.trainer.prompts import prompt_of, read_prompts, text_prefix
from kdistill.trainer.sequence_objective import collate_completions, completion_ce, tokenize_completions
from kdistill.trainer.teacher_service import GenerationParams

from . import helpers


class GenerateOnly:
    """A tiny causal LM that writes completions in this process: the store's tests need a teacher
    that writes text, counted, and nothing else (the runs below use the project's own teachers)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> Future[list[list[str]]]:
        with self.lock:
            self.asked.extend(prompts)
        out: list[list[str]] = []
        torch.manual_seed(params.seed or 0)
        for prompt in prompts:
            ids = self.tok(prompt, return_tensors="pt").input_ids[:, -32:]
            with torch.inference_mode():
                gen = self.model.generate(
                    ids,
                    do_sample=params.temperature > 0,
                    temperature=params.temperature or 1.0,
                    top_p=params.top_p,
                    max_new_tokens=params.max_new_tokens,
                    num_return_sequences=params.n,
                    pad_token_id=self.tok.pad_token_id,
                )
            out.append([self.tok.decode(g[ids.shape[1] :], skip_special_tokens=True) for g in gen])
        done: Future[list[list[str]]] = Future()
        done.set_result(out)
        return done


def _plan(prompts: list[str], samples: int = 2, **kw: Any) -> gs.GenerationPlan:
    base = {
        "samples_per_prompt": samples,
        "max_new_tokens": 6,
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 3,
        "teacher": {"model": "tiny"},
        "shard_prompts": 4,
    }
    return gs.GenerationPlan(prompts=prompts, **{**base, **kw})


def _count_by_prompt(root: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in gs.iter_records(root):
        counts[r["promptIndex"]] = counts.get(r["promptIndex"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [p[:60] for _, p in helpers.pydoc_paragraphs(18)]


# ---- prompts ----------------------------------------------------------------------------------
def test_prompt_field_then_the_first_half_of_the_text(tmp_path: Path) -> None:
    assert prompt_of({"prompt": "Q: why?", "text": "other"}, "prompt", "text") == "Q: why?"
    assert prompt_of({"text": "one two three four"}, "prompt", "text") == "one two"
    assert prompt_of({"prompt": "  ", "text": "alpha beta"}, "prompt", "text") == "alpha"
    assert text_prefix("unbroken") == "unbr"
    assert prompt_of({"label": 1}, "prompt", "text") is None
    path = helpers.write_jsonl(tmp_path / "p.jsonl", [{"q": "a b c d"}, {"text": "x y"}, {"nothing": 1}])
    assert read_prompts(path, prompt_field="q", text_field="text", max_bad_fraction=0.5) == ["a b c d", "x"]
    with pytest.raises(TrainerError, match="neither a 'q' nor a 'text'"):
        read_prompts(path, prompt_field="q", text_field="text", max_bad_fraction=0.1)


# ---- the store --------------------------------------------------------------------------------
def test_generated_set_shards_and_manifest(tmp_path: Path, gpt2_teacher: Path, prompts: list[str]) -> None:
    teacher = GenerateOnly(gpt2_teacher)
    plan = _plan(prompts)
    root = tmp_path / "generated"
    manifest = gs.ensure_generated(root, plan, lambda: teacher)  # type: ignore[arg-type, return-value]
    assert manifest["complete"] and manifest["records"] == len(prompts) * 2
    assert [s["file"] for s in manifest["shards"]] == [gs.shard_name(i) for i in range(5)]  # 18 prompts / 4
    for s in manifest["shards"]:
        assert sha256_file(root / s["file"]) == s["sha256"]
    assert manifest["generation"] == {
        "samplesPerPrompt": 2,
        "maxNewTokens": 6,
        "temperature": 0.8,
        "topP": 0.95,
        "seed": 3,
    }
    assert manifest["teacher"] == {"model": "tiny"} and manifest["prompts"]["count"] == len(prompts)
    assert _count_by_prompt(root) == dict.fromkeys(range(len(prompts)), 2)
    assert sorted(teacher.asked) == sorted(prompts)  # each prompt asked once
    assert not list(root.glob(".*"))  # no temporary files left
    # Finished: a second call reads the set and asks the teacher nothing.
    gs.ensure_generated(root, plan, lambda: pytest.fail("a finished set must not call the teacher"))
    # Changed settings are refused, naming what differs.
    with pytest.raises(TrainerError, match="maxNewTokens") as err:
        gs.ensure_generated(root, _plan(prompts, max_new_tokens=7), lambda: teacher)  # type: ignore[arg-type, return-value]
    assert err.value.code == ExitCode.BAD_SPEC


def test_resume_keeps_done_shards_and_redoes_broken_ones(
    tmp_path: Path, gpt2_teacher: Path, prompts: list[str]
) -> None:
    teacher = GenerateOnly(gpt2_teacher)
    plan = _plan(prompts)
    root = tmp_path / "generated"

    class Crash(Exception):
        pass

    def crash_after_three(index: int, records: int) -> None:
        if len(list(root.glob("shard-*.jsonl"))) == 3:
            raise Crash

    with pytest.raises(Crash):
        gs.ensure_generated(root, plan, lambda: teacher, in_flight=2, on_shard=crash_after_three)  # type: ignore[arg-type, return-value]
    done = sorted(root.glob("shard-*.jsonl"))
    assert len(done) == 3 and not gs.read_manifest(root)["complete"]  # type: ignore[index]
    # What a crash can leave: a truncated shard (a copy that stopped), a temporary file.
    broken = done[1]
    broken.write_bytes(broken.read_bytes()[:-20])
    (root / f".{gs.shard_name(4)}.999.tmp").write_text('{"half": ')
    kept = {p.name: p.read_bytes() for p in (done[0], done[2])}
    teacher.asked.clear()
    gs.ensure_generated(root, plan, lambda: teacher)  # type: ignore[arg-type, return-value]

    # Only the broken shard and the two never written were asked for again.
    def index(p: Path) -> int:
        return int(p.stem.split("-")[1])

    redo = (set(range(plan.num_shards)) - {index(p) for p in done}) | {index(broken)}
    assert len(redo) == 3
    assert sorted(teacher.asked) == sorted(prompts[p] for i in redo for p in plan.shard_range(i))
    for name, body in kept.items():
        assert (root / name).read_bytes() == body  # done shards untouched
    assert _count_by_prompt(root) == dict.fromkeys(range(len(prompts)), 2)
    assert not list(root.glob(".*.tmp"))
    # A finished shard changed on disk afterwards (its checksum no longer matches) is written again.
    first = root / gs.shard_name(0)
    first.write_text(first.read_text().replace('"sample": 1', '"sample": 1 '))
    teacher.asked.clear()
    gs.ensure_generated(root, plan, lambda: teacher)  # type: ignore[arg-type, return-value]
    assert sorted(teacher.asked) == sorted(prompts[:4])
    gs.verify(root)


def test_shards_split_over_ranks_and_meet_on_disk(tmp_path: Path, gpt2_teacher: Path, prompts: list[str]) -> None:
    """Three ranks (threads here; each would be a process with its own teacher) write their own
    shards; rank 0 finishes the manifest only when every shard is in."""
    plan = _plan(prompts, samples=1)
    root = tmp_path / "generated"
    teachers = [GenerateOnly(gpt2_teacher) for _ in range(3)]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            gs.ensure_generated(root, plan, lambda: teachers[r], rank=r, world=3, stall_timeout_s=120)  # type: ignore[arg-type, return-value]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (2, 1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for r, t in enumerate(teachers):
        mine = [prompts[p] for i in range(r, plan.num_shards, 3) for p in plan.shard_range(i)]
        assert t.asked == mine
    assert _count_by_prompt(root) == dict.fromkeys(range(len(prompts)), 1)


# ---- the objective ----------------------------------------------------------------------------
def test_completion_tokens_only_are_trained(tokenizer: Any) -> None:
    records = [
        {"prompt": "The for statement", "completion": " is used to iterate"},
        {"prompt": "x" * 400, "completion": " past the end"},  # nothing left within 48 tokens
    ]
    examples = tokenize_completions(records, tokenizer, 48)
    assert len(examples) == 1
    ex = examples[0]
    full = tokenizer("The for statement is used to iterate").input_ids
    assert ex.input_ids == full
    assert tokenizer.decode(ex.input_ids[ex.prompt_tokens :]) == " is used to iterate"
    batch = collate_completions([ex, ex], pad_id=0)
    labels = batch["labels"]
    assert (labels[:, : ex.prompt_tokens] == -100).all() and (labels[:, ex.prompt_tokens :] >= 0).all()
    # The loss is the mean CE of the completion tokens, from the definition.
    logits = torch.randn(2, len(full), len(tokenizer), dtype=torch.float64)
    loss, parts = completion_ce(logits, labels)
    logp = torch.log_softmax(logits, -1)
    want = -torch.stack([logp[b, t - 1, full[t]] for b in (0, 1) for t in range(ex.prompt_tokens, len(full))]).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-6) and parts["ce"] == pytest.approx(float(want), rel=1e-6)


def test_generated_set_is_text_data(tmp_path: Path, gpt2_teacher: Path, prompts: list[str]) -> None:
    root = tmp_path / "generated"
    gs.ensure_generated(root, _plan(prompts[:5], samples=1), lambda: GenerateOnly(gpt2_teacher))  # type: ignore[arg-type, return-value]
    rows = gs.text_examples(root, "text")
    records = list(gs.iter_records(root))
    assert [r.text for r in rows] == [r["prompt"] + r["completion"] for r in records]
    assert [r.text for r in gs.text_examples(root, "completion")] == [r["completion"] for r in records]
    with pytest.raises(TrainerError, match="textField is 'body'"):
        gs.text_examples(root, "body")
    manifest = json.loads((root / gs.MANIFEST).read_text())
    (root / manifest["shards"][0]["file"]).write_text("changed\n")
    with pytest.raises(TrainerError, match="sha256 differs") as err:
        gs.text_examples(root, "text")
    assert err.value.code == ExitCode.BAD_DATA


# ---- runs -------------------------------------------------------------------------------------
def _prompt_data(root: Path, n: int = 24) -> Path:
    """Half the lines carry a prompt field, half only text (their prompt is the text's start)."""
    paras = [p for _, p in helpers.pydoc_paragraphs(n)]
    rows = [{"prompt": p[:50], "text": p} if i % 2 else {"text": p[:120]} for i, p in enumerate(paras)]
    # Longer than maxSeqLength: no room for a completion token, so it is left out.
    rows.append({"prompt": " ".join(paras)[:600], "text": paras[0]})
    return helpers.write_jsonl(root / "prompts.jsonl", rows)


def _sequence_job(name: str, teacher: str, train: str, eval_: str | None, **kw: Any) -> dict[str, Any]:
    job = helpers.job_dict(
        name,
        "causal-lm",
        teacher,
        train,
        eval_,
        stages=kw.pop("stages", [{"name": "write", "steps": 4, "objectives": ["sequence"]}]),
        extra_distillation={
            "generation": {"samplesPerPrompt": 2, "maxNewTokens": 8, "temperature": 0.9, "topP": 0.95},
            **kw.pop("extra_distillation", {}),
        },
        **kw,
    )
    return job


def test_sequence_run_then_a_later_job_trains_on_the_generated_set(
    tmp_path: Path, gpt2_teacher: Path, causal_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdistill.trainer.runner import main_entry

    monkeypatch.setenv("KDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    prompts = _prompt_data(tmp_path)
    _, ev = causal_data
    job = _sequence_job(
        "seq",
        str(gpt2_teacher),
        str(prompts),
        str(ev),
        stages=[
            {"name": "write", "steps": 4, "objectives": ["sequence"]},
            {"name": "output", "steps": 2, "objectives": ["logits"]},
        ],
    )
    out = tmp_path / "out"
    steps: list[Any] = []
    events: list[tuple[str, dict[str, Any]]] = []
    code = main_entry(
        helpers.write_job(tmp_path / "job.yaml", job),
        out,
        on_step=steps.append,
        on_event=lambda n, f: events.append((n, f)),
    )
    assert code == 0
    assert [s.stage for s in steps] == ["write"] * 4 + ["output"] * 2
    assert set(steps[0].parts) == {"ce", "total"} and steps[0].parts["ce"] > 0
    assert "kd" in steps[-1].parts
    generated = out / "generated"
    manifest = gs.verify(generated)
    assert manifest["records"] == 2 * 24 and manifest["prompts"]["count"] == 24
    assert manifest["teacher"] == {"model": str(gpt2_teacher)}
    assert _count_by_prompt(generated) == dict.fromkeys(range(24), 2)
    first = next(gs.iter_records(generated))
    assert first["prompt"] == text_prefix(json.loads(prompts.read_text().splitlines()[0])["text"])
    ((_, fields),) = [e for e in events if e[0] == "generated"]
    assert fields["completions"] == 48 and fields["path"] == str(generated)

    # A later job reads the set as text (logits KD on what the teacher wrote) ...
    later = helpers.job_dict("later", "causal-lm", str(gpt2_teacher), str(generated), None)
    assert main_entry(helpers.write_job(tmp_path / "later.yaml", later), tmp_path / "later") == 0
    # ... and a sequence stage on it trains on it as it is, without generating again.
    again = _sequence_job("again", str(gpt2_teacher), str(generated), None)
    events.clear()
    code = main_entry(
        helpers.write_job(tmp_path / "again.yaml", again),
        tmp_path / "again",
        on_event=lambda n, f: events.append((n, f)),
    )
    assert code == 0 and not (tmp_path / "again" / "generated").exists()
    assert [f["path"] for n, f in events if n == "generated"] == [str(generated)]


def test_kill_9_during_generation_from_a_served_teacher_then_resume(
    tmp_path: Path, gpt2_teacher: Path, causal_data: tuple[Path, Path]
) -> None:
    """The trainer generates from a real ``kdistill serve``; SIGKILL once some shards are written;
    the restarted trainer keeps them (same files), writes the rest, and trains: every prompt is in
    the set exactly samplesPerPrompt times."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from tests.serving.helpers import ServerProcess

    paras = [p for _, p in helpers.pydoc_paragraphs(400)]
    # Two thirds of the lines are only a prompt, the rest give the start of their text (a job of
    # sequence stages alone needs no text field).
    rows = [{"prompt": p[: 20 + i % 30]} if i % 3 else {"text": p[:90]} for i, p in enumerate(paras * 2)]
    prompts = helpers.write_jsonl(tmp_path / "prompts.jsonl", rows)
    server = ServerProcess(gpt2_teacher, "--max-batch-size", "64", "--max-wait-ms", "5")
    try:
        server.wait_ready()
        job = _sequence_job(
            "seq-kill",
            str(gpt2_teacher),
            str(prompts),
            None,
            stages=[{"name": "write", "steps": 2, "objectives": ["sequence"]}],
        )
        job["spec"]["teacher"]["endpoint"] = server.url
        job["spec"]["distillation"]["generation"]["maxNewTokens"] = 24
        job_file = helpers.write_job(tmp_path / "job.yaml", job)
        out = tmp_path / "out"
        generated = out / "generated"
        cmd = [sys.executable, "-P", "-m", "kdistill.trainer", "--config", str(job_file), "--output", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "KDISTILL_TERMINATION_LOG": str(tmp_path / "termination-log")}
        log = (tmp_path / "first.log").open("w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while len(list(generated.glob("shard-*.jsonl"))) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard written in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        manifest = gs.read_manifest(generated)
        assert manifest is not None and not manifest["complete"]
        kept = {p.name: (p.stat().st_ino, p.read_bytes()) for p in generated.glob("shard-*.jsonl")}
        total = manifest["prompts"]["count"]
        assert 2 <= len(kept) < -(-total // gs.SHARD_PROMPTS), "the kill came after generation ended"

        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert second.returncode == 0, second.stderr[-3000:]
        # The completions came from the server, not from a teacher loaded in the trainer.
        metrics = httpx.get(f"{server.url}/metrics").text
        served = [line for line in metrics.splitlines() if line.startswith('kdistill_tokens_total{kind="generated"}')]
        assert served and float(served[0].split()[-1]) >= total
    finally:
        server.terminate()
    for name, (inode, body) in kept.items():
        path = generated / name
        assert path.stat().st_ino == inode and path.read_bytes() == body, f"{name} was written again"
    manifest = gs.verify(generated)
    assert manifest["complete"] and manifest["records"] == 2 * total
    assert _count_by_prompt(generated) == dict.fromkeys(range(total), 2)
    assert (out / "result.json").is_file()


def test_sequence_run_with_a_student_of_another_tokenizer(
    tmp_path: Path, gpt2_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text is the interface: the student reads the teacher's completions in its own tokens (a
    smaller vocabulary, so a teacher token id would be out of its range)."""
    from transformers import AutoTokenizer

    from kdistill.trainer.runner import main_entry

    monkeypatch.setenv("KDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    student_dir = tmp_path / "student"
    texts = [p.lower() for _, p in helpers.pydoc_paragraphs(200)]
    s_tok = helpers.make_tokenizer(student_dir, texts, vocab_size=264)  # bytes, specials, a few merges
    helpers.save_model(helpers.llama(len(s_tok), layers=2), s_tok, student_dir)
    t_tok = AutoTokenizer.from_pretrained(str(gpt2_teacher))
    assert s_tok.get_vocab() != t_tok.get_vocab() and len(s_tok) < len(t_tok)
    job = _sequence_job(
        "seq-cross", str(gpt2_teacher), str(_prompt_data(tmp_path)), None, student={"model": str(student_dir)}
    )
    steps: list[Any] = []
    assert main_entry(helpers.write_job(tmp_path / "job.yaml", job), tmp_path / "out", on_step=steps.append) == 0
    assert len(steps) == 4 and all(0 < s.parts["ce"] < 20 for s in steps)
    # What the student trained on: the generated text in its own tokens, within its vocabulary.
    records = list(gs.iter_records(tmp_path / "out" / "generated"))
    examples = tokenize_completions(records, s_tok, 48)
    assert examples and max(max(e.input_ids) for e in examples) < len(s_tok)


def test_sequence_sampler_resumes_where_the_uninterrupted_run_is(
    tmp_path: Path, gpt2_teacher: Path, tokenizer: Any, prompts: list[str]
) -> None:
    """The sequence stages' sampler is not checkpointed: its position follows from the sequence
    steps before the resume step (gradient accumulation included)."""
    from kdistill.api import load_job
    from kdistill.trainer.sequence_stage import SequenceBatches
    from kdistill.trainer.stages import build_plan, phase_at, total_steps

    root = tmp_path / "generated"
    gs.ensure_generated(root, _plan(prompts, samples=1), lambda: GenerateOnly(gpt2_teacher))  # type: ignore[arg-type, return-value]
    stages = [
        {"name": "a", "steps": 3, "objectives": ["sequence"]},
        {"name": "b", "steps": 2, "objectives": ["logits"]},
        {"name": "c", "steps": 4, "objectives": ["sequence"]},
    ]
    job = helpers.job_dict(
        "resume",
        "causal-lm",
        str(gpt2_teacher),
        str(root),
        None,
        stages=stages,
        extra_distillation={"gradientAccumulationSteps": 2},
    )
    spec = load_job(helpers.write_job(tmp_path / "job.yaml", job)).spec
    plan = build_plan(spec)

    def batches(start: int) -> list[list[list[int]]]:
        """Per sequence step from ``start`` on, its two micro-batches' token ids."""
        seq = SequenceBatches(
            spec,
            plan,
            tokenizer,
            0,
            output=tmp_path / "unused",
            base_dir=tmp_path,
            rank=0,
            world=1,
            data_rank=0,
            teacher=lambda: pytest.fail("a generated set as data.train needs no teacher"),  # type: ignore[arg-type, return-value]
        )
        seq.ready(start)
        steps = [s for s in range(start, total_steps(plan)) if "sequence" in phase_at(plan, s).objectives]
        return [[seq.next_batch()["input_ids"].tolist() for _ in range(2)] for _ in steps]

    whole = batches(0)
    assert len(whole) == 7
    assert batches(6) == whole[4:]  # 3 + 1 sequence steps before step 6
    assert batches(4) == whole[3:]  # inside the logits stage: 3 sequence steps done


def test_two_ranks_share_generation_by_shard_then_train(tmp_path: Path, gpt2_teacher: Path) -> None:
    """Two real trainer processes (gloo): each writes its own shards with its own in-process
    teacher, they meet on the file system, and both train on the whole set."""
    import re
    import subprocess
    import sys

    from tests.parallel.harness import REPO, child_env, free_port

    paras = [p for _, p in helpers.pydoc_paragraphs(80)]
    data = helpers.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p[:40]} for p in paras])
    job = _sequence_job(
        "seq-ranks",
        str(gpt2_teacher),
        str(data),
        None,
        stages=[{"name": "write", "steps": 3, "objectives": ["sequence"]}],
    )
    job["spec"]["parallelism"] = {"nodes": 2, "gpusPerNode": 0, "student": {"data": 2, "tensor": 1, "pipeline": 1}}
    job_file = helpers.write_job(tmp_path / "job.yaml", job)
    out = tmp_path / "out"
    port = free_port()
    extra = {"KDISTILL_TERMINATION_LOG": str(tmp_path / "termination-log")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-P", "-m", "kdistill.trainer", "--config", str(job_file), "--output", str(out)],
            cwd=REPO,
            env=child_env(r, 2, port, extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    logs = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        logs.append(err)
        assert p.returncode == 0, err[-3000:]
    shards = -(-len(paras) // gs.SHARD_PROMPTS)
    written = []
    for rank, err in enumerate(logs):
        found = re.search(rf"rank {rank} wrote (\d+) shards", err)
        assert found, err[-2000:]
        written.append(int(found.group(1)))
    assert written == [len(range(0, shards, 2)), len(range(1, shards, 2))]
    assert _count_by_prompt(out / "generated") == dict.fromkeys(range(len(paras)), 2)
    assert (out / "result.json").is_file()


def test_kdistill_run_with_a_served_teacher_writes_and_trains(tmp_path: Path, gpt2_teacher: Path) -> None:
    """The same YAML on a laptop: ``kdistill run`` serves the teacher itself (teacher.serve) and
    the sequence stage generates through it, prompts only in the data."""
    import os
    import subprocess
    import sys

    data = helpers.write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": p[:40]} for _, p in helpers.pydoc_paragraphs(40)]
    )
    job = _sequence_job("seq-served", str(gpt2_teacher), str(data), None)
    job["spec"]["teacher"]["serve"] = {"enabled": True, "batching": {"maxBatchSize": 32, "maxWaitMs": 5}}
    job_file = helpers.write_job(tmp_path / "job.yaml", job)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "KDISTILL_TEACHER_URL"}
    env["KDISTILL_TERMINATION_LOG"] = str(tmp_path / "termination-log")
    proc = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "kdistill.cli.main",
            "run",
            str(job_file),
            "--output",
            str(out),
            "--log-format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    served = [e for e in events if e.get("event") == "served-teacher"]
    assert served and served[0]["url"].startswith("http://127.0.0.1:")
    (generated,) = [e for e in events if e.get("event") == "generated"]
    assert generated["completions"] == 80
    manifest = gs.verify(out / "generated")
    assert manifest["teacher"] == {"model": str(gpt2_teacher)}  # not the local server's passing URL
    assert _count_by_prompt(out / "generated") == dict.fromkeys(range(40), 2)
    assert [e["step"] for e in events if e.get("event") == "step"] == [1, 2, 3, 4]
