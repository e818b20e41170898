"""On-policy distillation end to end: tiny jobs with an [on-policy] stage, the teacher in process
and served by a real ``kdistill serve`` on loopback. Each run must lower the student's divergence
to the teacher on held-out prompts (its own samples, scored by the teacher) against the student
it started from; lambda 0 trains on the dataset's text only, lambda 1 on the student's samples
only, and in between each micro-batch's kind is the seeded draw."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kdistill.trainer.on_policy import OnPolicyBatches, prompted_record, read_prompted, tokenize_prompted
from kdistill.trainer.on_policy_eval import held_out_divergence

from . import helpers

MAX_NEW = 12
MAX_LEN = 48
TOP_K = 16


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def peaked_teacher(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A tiny GPT-2 with a wide initialisation: peaked, context-dependent next-token
    distributions, so that a 2-layer student derived from it starts measurably far from it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=4,
        n_head=4,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        initializer_range=0.15,
    )
    d = tmp_path_factory.mktemp("peaked-teacher")
    return helpers.save_model(GPT2LMHeadModel(cfg), tokenizer, d)


def _job(name: str, teacher: Path, train: Path, eval_: Path, steps: int, **on_policy: Any) -> dict[str, Any]:
    job = helpers.job_dict(
        name,
        "causal-lm",
        str(teacher),
        str(train),
        str(eval_),
        stages=[{"name": "on-policy", "steps": steps, "objectives": ["on-policy"]}],
        batch_size=8,
        every_steps=1000,
        extra_distillation={
            "onPolicy": {"lambda": 1.0, "beta": 1.0, "maxNewTokens": MAX_NEW, "topK": TOP_K, **on_policy},
            "learningRate": 3e-3,
        },
    )
    job["spec"]["serving"] = {"enabled": False}
    return job


def _held_out_prompts(tokenizer: Any, eval_path: Path) -> list[list[int]]:
    records = read_prompted(eval_path, prompt_field="prompt", text_field="text", max_bad_fraction=0.0)
    examples = tokenize_prompted(records[:24], tokenizer, MAX_LEN)
    return [e.input_ids[: min(e.prompt_tokens, MAX_LEN - MAX_NEW)] for e in examples]


def _divergence(student: torch.nn.Module, teacher: Any, tokenizer: Any, prompts: list[list[int]]) -> float:
    result = held_out_divergence(
        student,
        teacher,
        prompts,
        max_new_tokens=MAX_NEW,
        temperature=1.0,
        top_k=TOP_K,
        beta=1.0,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        seed=11,
    )
    assert result["tokens"] > 100
    return result["divergence"]


def _initial_student(job_file: Path) -> torch.nn.Module:
    from kdistill.api import load_job
    from kdistill.trainer.models import load_models

    job = load_job(job_file)
    return load_models(job.spec, job_file.parent).student.eval()


def _run(job_file: Path, out: Path) -> tuple[list[Any], list[tuple[str, dict[str, Any]]]]:
    from kdistill.trainer.runner import main_entry

    steps: list[Any] = []
    events: list[tuple[str, dict[str, Any]]] = []
    code = main_entry(job_file, out, on_step=steps.append, on_event=lambda n, f: events.append((n, f)))
    assert code == 0, (out / "termination-log").read_text() if (out / "termination-log").exists() else code
    return steps, events


def _check_lowers_divergence(
    tmp_path: Path, job: dict[str, Any], teacher_dir: Path, tokenizer: Any, eval_path: Path
) -> list[Any]:
    from transformers import AutoModelForCausalLM

    from kdistill.trainer.local_teacher import LocalTeacher

    job_file = helpers.write_job(tmp_path / "job.yaml", job)
    teacher = LocalTeacher(AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval(), tokenizer)
    prompts = _held_out_prompts(tokenizer, eval_path)
    before = _divergence(_initial_student(job_file), teacher, tokenizer, prompts)
    steps, events = _run(job_file, tmp_path / "out")
    after = _divergence(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "student")), teacher, tokenizer, prompts
    )
    # The student's own samples are closer to what the teacher would write: by a clear margin.
    assert after < 0.8 * before, (before, after)
    assert [n for n, _ in events].count("on-policy-ready") == 1
    for s in steps:
        assert set(s.parts) == {"on-policy", "completion_length", "sampled", "total"}
        assert s.parts["sampled"] == 1.0 and 0 < s.parts["completion_length"] <= MAX_NEW
    first, last = steps[:5], steps[-5:]
    assert sum(s.parts["on-policy"] for s in last) < sum(s.parts["on-policy"] for s in first)
    return steps


def test_in_process_teacher_lowers_the_held_out_divergence(
    tmp_path: Path,
    peaked_teacher: Path,
    tokenizer: Any,
    causal_data: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    train, ev = causal_data
    job = _job("op-local", peaked_teacher, train, ev, steps=30)
    _check_lowers_divergence(tmp_path, job, peaked_teacher, tokenizer, ev)


def test_lambda_chooses_the_kind_of_each_micro_batch(
    tmp_path: Path, peaked_teacher: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data file with prompt fields: lambda 0 trains on the dataset completions only (their
    lengths are what the data holds), lambda 1 on the student's samples only, 0.5 on both, each
    micro-batch as the seeded draw says."""
    monkeypatch.setenv("KDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    paras = [p for _, p in helpers.pydoc_paragraphs(200) if len(p) >= 150][:40]
    rows = [{"prompt": p[:30], "text": " " + p[30:120].strip()} for p in paras]
    train = helpers.write_jsonl(tmp_path / "prompted.jsonl", rows)
    examples = tokenize_prompted([prompted_record(r, "prompt", "text") for r in rows], tokenizer, MAX_LEN)  # type: ignore[misc]
    dataset_lengths = {len(e.input_ids) - e.prompt_tokens for e in examples}
    assert min(dataset_lengths) > MAX_NEW  # a dataset batch cannot pass for a sampled one

    def run(lam: float, accum: int = 1) -> list[Any]:
        job = _job(f"op-l{int(lam * 10)}", peaked_teacher, train, train, steps=6, **{"lambda": lam})
        job["spec"]["distillation"]["gradientAccumulationSteps"] = accum
        steps, _ = _run(helpers.write_job(tmp_path / f"l{lam}.yaml", job), tmp_path / f"out-{lam}")
        return steps

    never = run(0.0)
    assert all(s.parts["sampled"] == 0.0 for s in never)
    assert all(s.parts["completion_length"] > MAX_NEW for s in never)
    always = run(1.0)
    assert all(s.parts["sampled"] == 1.0 and s.parts["completion_length"] <= MAX_NEW for s in always)
    half = run(0.5, accum=2)
    from kdistill.api import load_job

    spec = load_job(tmp_path / "l0.5.yaml").spec
    draws = OnPolicyBatches.__new__(OnPolicyBatches)
    draws.spec, draws.settings = spec, spec.distillation.on_policy
    want = [(draws.samples_batch(2 * i) + draws.samples_batch(2 * i + 1)) / 2 for i in range(6)]
    assert [s.parts["sampled"] for s in half] == want
    assert 0 < sum(want) < len(want)


def test_prompt_records(tokenizer: Any) -> None:
    with_prompt = prompted_record({"prompt": "Q: what is a class?", "text": " A template."}, "prompt", "text")
    assert with_prompt == {"prompt": "Q: what is a class?", "completion": " A template."}
    plain = prompted_record({"text": "  one two three four five six  "}, "prompt", "text")
    assert plain is not None and plain["prompt"] + plain["completion"] == "one two three four five six"
    assert plain["prompt"] == "one two three"
    assert prompted_record({"prompt": "  ", "text": ""}, "prompt", "text") is None
    assert prompted_record({"prompt": "only a prompt"}, "prompt", "text") == {
        "prompt": "only a prompt",
        "completion": "",
    }
    (ex,) = tokenize_prompted([{"prompt": "The for statement", "completion": " is used to iterate"}], tokenizer, 48)
    assert tokenizer.decode(ex.input_ids[: ex.prompt_tokens]) == "The for statement"
    assert tokenizer.decode(ex.input_ids[ex.prompt_tokens :]) == " is used to iterate"
    (alone,) = tokenize_prompted([{"prompt": "only a prompt", "completion": ""}], tokenizer, 48)
    assert alone.prompt_tokens == len(alone.input_ids)


def test_the_example_runs_on_tiny_data(
    tmp_path: Path, peaked_teacher: Path, causal_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/on-policy.yaml as it is, but for its model, data and lengths (a few steps)."""
    import yaml

    monkeypatch.setenv("KDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    job = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "on-policy.yaml").read_text())
    spec = job["spec"]
    assert [s["objectives"] for s in spec["distillation"]["stages"]] == [["on-policy"]]
    train, ev = causal_data
    spec["teacher"]["model"] = str(peaked_teacher)
    spec["data"].update({"train": str(train), "eval": str(ev), "maxSeqLength": MAX_LEN})
    spec["distillation"]["stages"][0]["steps"] = 3
    spec["distillation"].update({"batchSize": 4, "warmupSteps": 1})
    spec["distillation"]["onPolicy"]["maxNewTokens"] = 8
    steps, _ = _run(helpers.write_job(tmp_path / "example.yaml", job), tmp_path / "out")
    assert [s.stage for s in steps] == ["on-policy"] * 3
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["stages"][0]["objectives"] == ["on-policy"] and "fullPrecision" in result


def test_a_student_with_its_own_tokenizer_lowers_the_held_out_divergence(
    tmp_path: Path,
    peaked_teacher: Path,
    tokenizer: Any,
    causal_data: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The teacher scores the text the student's tokens stand for (score_texts), positions are
    aligned by bytes (on_policy_cross): the student, with a vocabulary of its own, still moves
    towards the teacher on its own samples."""
    from transformers import AutoModelForCausalLM

    from kdistill.trainer.local_teacher import LocalTeacher
    from kdistill.trainer.on_policy_cross import TokenBridge

    monkeypatch.setenv("KDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    train, ev = causal_data
    others = [p for _, p in helpers.pydoc_paragraphs(900)][500:]
    s_dir = tmp_path / "student"
    s_tok = helpers.make_tokenizer(s_dir, others, vocab_size=340)
    helpers.save_model(helpers.gpt2(len(s_tok), layers=2, seed=5), s_tok, s_dir)
    job = _job("op-cross", peaked_teacher, train, ev, steps=30)
    job["spec"]["student"] = {"model": str(s_dir)}
    job_file = helpers.write_job(tmp_path / "job.yaml", job)

    teacher = LocalTeacher(AutoModelForCausalLM.from_pretrained(str(peaked_teacher)).eval(), tokenizer)
    bridge = TokenBridge(s_tok, tokenizer, len(s_tok))
    prompts = _held_out_prompts(s_tok, ev)

    def divergence(student: torch.nn.Module) -> float:
        result = held_out_divergence(
            student,
            teacher,
            prompts,
            max_new_tokens=MAX_NEW,
            temperature=1.0,
            top_k=TOP_K,
            beta=1.0,
            eos_id=s_tok.eos_token_id,
            pad_id=s_tok.pad_token_id,
            seed=11,
            bridge=bridge,
        )
        assert result["tokens"] > 20
        return result["divergence"]

    before = divergence(AutoModelForCausalLM.from_pretrained(str(s_dir)))
    steps, events = _run(job_file, tmp_path / "out")
    after = divergence(AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "student")))
    assert after < 0.8 * before, (before, after)
    ((_, fields),) = [e for e in events if e[0] == "on-policy-tokenizers"]
    assert 0 < fields["sharedTokens"] < len(s_tok)
    assert all(s.parts["sampled"] == 1.0 for s in steps)


def _input_tokens(url: str) -> float:
    """Tokens the server has read (scoring counts every token of every sequence sent)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith('kdistill_tokens_total{kind="input"}')
    )


def test_served_teacher_lowers_the_held_out_divergence(
    tmp_path: Path,
    peaked_teacher: Path,
    tokenizer: Any,
    causal_data: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same job with ``teacher.endpoint`` naming a real ``kdistill serve`` of the teacher on
    loopback: the workers hold no teacher weights and every score comes over HTTP."""
    from tests.serving.helpers import running_server

    monkeypatch.setenv("KDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.delenv("KDISTILL_TEACHER_URL", raising=False)
    train, ev = causal_data
    with running_server(peaked_teacher, "--max-wait-ms", "2", "--max-logprobs", str(TOP_K)) as server:
        job = _job("op-served", peaked_teacher, train, ev, steps=30)
        job["spec"]["teacher"]["endpoint"] = server.url
        read_before = _input_tokens(server.url)
        _check_lowers_divergence(tmp_path, job, peaked_teacher, tokenizer, ev)
        read = _input_tokens(server.url) - read_before
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert read >= result["tokensSeen"] > 0  # every trained sequence was scored by the server


def test_two_data_ranks_sample_their_own_prompts(tmp_path: Path) -> None:
    """`kdistill run` of a 2-process (gloo) job with an on-policy stage: each rank samples its
    share of the prompts, DDP averages the gradients, the run finishes and reports the parts."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.parallel.harness import REPO
    from tests.parallel.jobs import make_job

    job_file = make_job(tmp_path / "w", world=2, steps=4, every=2, batch_size=8, name="op-ddp")
    job = yaml.safe_load(job_file.read_text())
    job["spec"]["distillation"]["stages"] = [{"name": "on-policy", "steps": 4, "objectives": ["on-policy"]}]
    job["spec"]["distillation"]["onPolicy"] = {"lambda": 1.0, "beta": 0.5, "maxNewTokens": 8, "topK": 8}
    helpers.write_job(job_file, job)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    run = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "kdistill.cli.main",
            "run",
            str(job_file),
            "--output",
            str(tmp_path / "out"),
            "--log-format",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    steps = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"event": "step"')]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["parts"]["sampled"] == 1.0 and 0 < s["parts"]["completion_length"] <= 8 for s in steps)
    assert (tmp_path / "out" / "result.json").is_file()


def test_kill_9_then_resume_is_bit_exact(tmp_path: Path, peaked_teacher: Path, causal_data: tuple[Path, Path]) -> None:
    """The kind of each micro-batch, the prompts drawn and the student's samples after a resume
    are those of the uninterrupted run: the final students are equal bit for bit."""
    import signal

    from tests.trainer.test_resume import assert_bit_equal, final_weights, kdistill_run, records

    train, ev = causal_data
    job = _job("op-resume", peaked_teacher, train, ev, steps=7, **{"lambda": 0.5})
    job["spec"]["checkpoint"]["everySteps"] = 3
    job["spec"]["distillation"]["gradientAccumulationSteps"] = 2
    job_file = helpers.write_job(tmp_path / "job.yaml", job)
    ref = kdistill_run(job_file, tmp_path / "ref", tmp_path)
    ref_steps = [r for r in records(ref) if r.get("event") == "step"]
    assert ref.wait(timeout=300) == 0
    assert len({s["parts"]["sampled"] for s in ref_steps}) > 1  # both kinds of micro-batch occur

    out = tmp_path / "interrupted"
    proc = kdistill_run(job_file, out, tmp_path)
    for rec in records(proc):
        if rec.get("event") == "step" and rec["step"] == 5:
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    resumed = kdistill_run(job_file, out, tmp_path)
    events = list(records(resumed))
    assert resumed.wait(timeout=300) == 0
    assert [e["step"] for e in events if e["event"] == "resumed"] == [3]
    again = [e for e in events if e.get("event") == "step"]
    assert [s["parts"] for s in again] == [s["parts"] for s in ref_steps[3:]]
    assert_bit_equal(final_weights(tmp_path / "ref"), final_weights(out))


def test_a_served_teacher_with_other_token_ids_is_refused(
    tmp_path: Path, peaked_teacher: Path, causal_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only teacher.endpoint, and a student with a tokenizer of its own: the trainer has no
    tokenizer of the teacher's to read its token ids with, so the job stops before any step."""
    from kdistill.api.failures import ExitCode
    from kdistill.trainer.runner import main_entry
    from tests.serving.helpers import running_server

    monkeypatch.setenv("KDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.delenv("KDISTILL_TEACHER_URL", raising=False)
    train, ev = causal_data
    s_dir = tmp_path / "student"
    s_tok = helpers.make_tokenizer(s_dir, [p for _, p in helpers.pydoc_paragraphs(900)][500:], vocab_size=340)
    helpers.save_model(helpers.gpt2(len(s_tok), layers=2, seed=5), s_tok, s_dir)
    with running_server(peaked_teacher, "--max-wait-ms", "2", "--max-logprobs", str(TOP_K)) as server:
        job = _job("op-other-ids", peaked_teacher, train, ev, steps=2)
        job["spec"]["teacher"] = {"endpoint": server.url}
        job["spec"]["student"] = {"model": str(s_dir)}
        code = main_entry(helpers.write_job(tmp_path / "job.yaml", job), tmp_path / "out")
    assert code == ExitCode.BAD_SPEC
    term = json.loads((tmp_path / "termination-log").read_text())
    assert "tokenizes text differently" in term["message"]


def test_the_example_with_teacher_serve_under_kdistill_run(
    tmp_path: Path, peaked_teacher: Path, causal_data: tuple[Path, Path]
) -> None:
    """The example's comment holds: with ``teacher.serve: {enabled: true}``, ``kdistill run``
    starts a local ``kdistill serve`` of the teacher, the on-policy steps score over HTTP, and the
    server stops with the run."""
    import os
    import subprocess
    import sys

    import yaml

    job = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "on-policy.yaml").read_text())
    spec = job["spec"]
    train, ev = causal_data
    spec["teacher"]["model"] = str(peaked_teacher)
    spec["teacher"]["serve"] = {"enabled": True, "batching": {"maxBatchSize": 8, "maxWaitMs": 2}}
    spec["data"].update({"train": str(train), "eval": str(ev), "maxSeqLength": MAX_LEN})
    spec["distillation"]["stages"][0]["steps"] = 3
    spec["distillation"].update({"batchSize": 4, "warmupSteps": 1})
    spec["distillation"]["onPolicy"]["maxNewTokens"] = 8
    job_file = helpers.write_job(tmp_path / "example.yaml", job)
    env = {k: v for k, v in os.environ.items() if k != "KDISTILL_TEACHER_URL"}
    env.update(OMP_NUM_THREADS="1", KDISTILL_TERMINATION_LOG=str(tmp_path / "termination-log"))
    command = [sys.executable, "-P", "-m", "kdistill.cli.main", "run", str(job_file), "--output", str(tmp_path / "out")]
    proc = subprocess.run([*command, "--log-format", "json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    served = [line for line in lines if line.get("event") == "served-teacher"]
    assert served and served[0]["url"].startswith("http://127.0.0.1:") and served[0]["sameTokens"] is True
    steps = [line for line in lines if line.get("event") == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3] and all(s["parts"]["sampled"] == 1.0 for s in steps)
