"""The training loop with a tensor- and/or pipeline-parallel student, as the pods run it: torchrun
(the launcher's own command line) starting ``python -m kdistill.trainer`` per rank, gloo on CPU,
a tiny Llama teacher and its 2-layer student. Every layout must reproduce the single-process run
step for step (the loss is normalised globally and gradients are clipped by the whole student's
norm), and its checkpoints, gathered to rank 0 in the single-process layout, resume at the same
world size and reshard into a different one."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kdistill.api import load_job, parse_job
from kdistill.api.failures import ExitCode
from kdistill.trainer.errors import TrainerError
from kdistill.trainer.parallel.launch import launch_env, torchrun_command
from kdistill.trainer.parallel.mesh import layout_from_spec
from kdistill.trainer.parallel.runtime import check_supported
from tests.spec_table import SPLIT_STUDENT_BAD
from tests.trainer import helpers

from .checkpoints import assert_same_moments, student_weights
from .harness import REPO

STEPS, EVERY = 6, 3
TIMEOUT_S = 600  # generous: 4 processes share 2 loaded cores


def _write_job(
    root: Path,
    name: str,
    *,
    pipeline: int = 1,
    data: int = 1,
    tensor: int = 1,
    objectives: tuple[str, ...] = ("logits",),
    spec: dict[str, Any] | None = None,
) -> Path:
    world = pipeline * data * tensor
    job = helpers.job_dict(
        name,
        "causal-lm",
        str(root / "teacher"),
        str(root / "data" / "train.jsonl"),
        None,
        stages=[{"name": "output", "steps": STEPS, "objectives": list(objectives)}],
        batch_size=8,
        every_steps=EVERY,
    )
    job["spec"]["distillation"]["learningRate"] = 5e-3
    job["spec"]["parallelism"] = {
        "nodes": world,
        "gpusPerNode": 0,
        "student": {"data": data, "tensor": tensor, "pipeline": pipeline},
    }
    for key, value in (spec or {}).items():
        if isinstance(value, dict) and isinstance(job["spec"].get(key), dict):
            job["spec"][key].update(value)
        else:
            job["spec"][key] = value
    return helpers.write_job(root / f"{name}.yaml", job)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tppp")
    texts = [p for _, p in helpers.pydoc_paragraphs(300)]
    tok = helpers.make_tokenizer(root / "tok", texts)
    # Llama: tensor parallelism cuts q/k/v/o and gate/up/down; 4 heads, 2 KV heads divide by 2.
    helpers.save_model(helpers.llama(len(tok), layers=4, width=32, heads=4, kv_heads=2), tok, root / "teacher")
    helpers.causal_data(root / "data", n_train=96, n_eval=16)
    return root


def write_gpt2_root(root: Path) -> Path:
    """A tokenizer, a 4-layer GPT2 teacher and causal data under ``root``. GPT2 ties its embedding
    and LM head (a pipeline's first and last stage each hold a copy). No dropout: its random masks
    differ between one process and split ranks, or between layouts that number ranks otherwise."""
    texts = [p for _, p in helpers.pydoc_paragraphs(300)]
    tok = helpers.make_tokenizer(root / "tok", texts)
    model = helpers.gpt2(len(tok), layers=4, width=32, heads=4)
    model.config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    helpers.save_model(model, tok, root / "teacher")
    helpers.causal_data(root / "data", n_train=96, n_eval=16)
    return root


def _env(world: int) -> dict[str, str]:
    return launch_env(
        world,
        rendezvous_timeout_s=300,
        collective_timeout_s=300,
        base=dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error"),
    )


def _steps(stdout: str) -> list[dict[str, Any]]:
    out = []
    for line in stdout.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if record.get("event") == "step":
            out.append(record)
    return out


def _run(job: Path, output: Path, world: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One run under torchrun; returns rank 0's step records and result.json."""
    proc = subprocess.run(
        torchrun_command(job, output, world),
        env=_env(world),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return _steps(proc.stdout), json.loads((output / "result.json").read_text())


@pytest.fixture(scope="module")
def reference(root: Path) -> tuple[list[float], Path]:
    """The single-process run (in this process: no second interpreter to start): per-step losses
    rounded as rank 0 prints them, and its output folder."""
    from kdistill.trainer.options import RunOptions, StepReport
    from kdistill.trainer.outputs import OutputLayout
    from kdistill.trainer.runner import run_job

    assert os.environ.get("WORLD_SIZE", "1") == "1"
    path, out = _write_job(root, "one"), root / "out-one"
    reports: list[StepReport] = []
    run_job(load_job(path), RunOptions(output=OutputLayout(out), base_dir=root, on_step=reports.append))
    assert [r.step for r in reports] == list(range(1, STEPS + 1))
    return [round(r.loss, 6) for r in reports], out


def _assert_follows(steps: list[dict[str, Any]], ref: list[float], first: int = 1) -> None:
    losses = [s["loss"] for s in steps]
    assert [s["step"] for s in steps] == list(range(first, STEPS + 1))
    assert all(math.isfinite(x) for x in losses)
    # Step for step the single-process losses (printed to 6 decimals).
    assert losses == pytest.approx(ref[first - 1 :], rel=2e-5, abs=2e-6)
    for s in steps:
        assert s["parts"]["kd"] >= 0 and s["parts"]["ce"] > 0


def _assert_same_student(a: Path, b: Path) -> None:
    x, y = helpers.load_student(a / "student"), helpers.load_student(b / "student")
    assert set(x) == set(y)
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-5, msg=k)


def _resume_from(src: Path, step: int, dst: Path) -> None:
    name = f"step-{step:09d}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


def test_tensor2_trains_like_one_process(root: Path, reference: tuple[list[float], Path]) -> None:
    ref, ref_out = reference
    out = root / "out-tp2"
    steps, _ = _run(_write_job(root, "tp2", tensor=2), out, 2)
    _assert_follows(steps, ref)
    assert ref[-1] < ref[0]  # the loss decreases
    _assert_same_student(out, ref_out)
    # The sharded checkpoint holds the whole student under the single-process names and shapes.
    ckpt = student_weights(out / "checkpoints" / f"step-{STEPS:09d}")
    whole = student_weights(ref_out / "checkpoints" / f"step-{STEPS:09d}")
    assert {k: v.shape for k, v in ckpt.items()} == {k: v.shape for k, v in whole.items()}


def test_pipeline2_trains_like_one_process_and_resumes(root: Path, reference: tuple[list[float], Path]) -> None:
    ref, ref_out = reference
    out = root / "out-pp2"
    job = _write_job(root, "pp2", pipeline=2)
    steps, _ = _run(job, out, 2)
    _assert_follows(steps, ref)
    _assert_same_student(out, ref_out)
    # Resume at the same world size from the step-3 checkpoint: the same last steps and weights.
    again = root / "out-pp2-resumed"
    _resume_from(out, EVERY, again)
    steps2, result2 = _run(job, again, 2)
    assert result2["resumedFrom"] == EVERY
    _assert_follows(steps2, ref, first=EVERY + 1)
    _assert_same_student(again, ref_out)


@pytest.mark.parametrize("split", ["tensor", "pipeline"])
def test_split_teacher_with_split_student_trains_like_one_process(
    root: Path, reference: tuple[list[float], Path], split: str
) -> None:
    """teacherPipelineStages=2 and a student split in two on the same 2 ranks: rank 0 holds teacher
    layers 0-1 and one half of the student, rank 1 the rest of both; the losses follow the
    single-process run step for step and the final student equals its."""
    ref, ref_out = reference
    out = root / f"out-teacher2-{split}2"
    job = _write_job(root, f"teacher2-{split}2", **{split: 2}, spec={"parallelism": {"teacherPipelineStages": 2}})
    steps, _ = _run(job, out, 2)
    _assert_follows(steps, ref)
    _assert_same_student(out, ref_out)


def test_tensor2_x_pipeline2_trains_and_reshards_to_two_ranks(root: Path, reference: tuple[list[float], Path]) -> None:
    ref, ref_out = reference
    out = root / "out-tp2pp2"
    steps, _ = _run(_write_job(root, "tp2pp2", pipeline=2, tensor=2), out, 4)
    _assert_follows(steps, ref)
    _assert_same_student(out, ref_out)
    # The 4-rank checkpoint resumes on 2 ranks with another layout (tensor only): each rank cuts
    # its own tensor slice of every stage out of the whole-student files.
    again = root / "out-tp2pp2-on-tp2"
    _resume_from(out, EVERY, again)
    steps2, result2 = _run(_write_job(root, "tp2-resume", tensor=2), again, 2)
    assert result2["resumedFrom"] == EVERY
    _assert_follows(steps2, ref, first=EVERY + 1)
    _assert_same_student(again, ref_out)
    last = f"step-{STEPS:09d}"
    assert_same_moments(again / "checkpoints" / last, ref_out / "checkpoints" / last)
    _resumes_in_one_process_and_on_data_ranks(root, out, reference)


def _resumes_in_one_process_and_on_data_ranks(root: Path, out: Path, reference: tuple[list[float], Path]) -> None:
    """The sharded checkpoint of a tensor2 x pipeline2 run resumes in one process (the
    single-process flow reads every shard) and on two data ranks (DDP of whole students)."""
    from kdistill.trainer.options import RunOptions, StepReport
    from kdistill.trainer.outputs import OutputLayout
    from kdistill.trainer.runner import run_job

    ref, ref_out = reference
    last = f"step-{STEPS:09d}"
    one = root / "out-tp2pp2-in-one"
    _resume_from(out, EVERY, one)
    reports: list[StepReport] = []
    job = load_job(_write_job(root, "one-resume"))
    run_job(job, RunOptions(output=OutputLayout(one), base_dir=root, on_step=reports.append))
    assert [r.step for r in reports] == list(range(EVERY + 1, STEPS + 1))
    assert [round(r.loss, 6) for r in reports] == pytest.approx(ref[EVERY:], rel=2e-5, abs=2e-6)
    _assert_same_student(one, ref_out)
    assert_same_moments(one / "checkpoints" / last, ref_out / "checkpoints" / last)
    # Two data ranks average per-rank losses (DDP), so they follow the single process closely,
    # not to the last digit.
    data2 = root / "out-tp2pp2-on-data2"
    _resume_from(out, EVERY, data2)
    steps, result = _run(_write_job(root, "data2-resume", data=2), data2, 2)
    assert result["resumedFrom"] == EVERY and [s["step"] for s in steps] == list(range(EVERY + 1, STEPS + 1))
    assert [s["loss"] for s in steps] == pytest.approx(ref[EVERY:], rel=1e-2)
    start = student_weights(out / "checkpoints" / f"step-{EVERY:09d}")
    a = load_file(str(ref_out / "student" / "model.safetensors"))
    b = load_file(str(data2 / "student" / "model.safetensors"))

    def dist(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
        return float(torch.sqrt(sum(((x[k] - y[k]) ** 2).sum() for k in x)))

    assert dist(b, a) < 0.1 * dist(start, a)


# What the trainer's own message names for each of the API's split-student rows.
_TRAINER_NEEDLES = {
    "split-student-sequence": "objectives ['sequence']",
}


@pytest.mark.parametrize(
    ("name", "job"), [(b[0], b[1]) for b in SPLIT_STUDENT_BAD], ids=[b[0] for b in SPLIT_STUDENT_BAD]
)
def test_trainer_refuses_what_the_api_rejects_for_split_students(name: str, job: dict[str, Any]) -> None:
    """The API rejects these rows (tests/spec_table.py); the trainer's check stays as a second
    line for specs that bypassed it. The spec is validated unsplit, then split without validation."""
    split = job["spec"]["parallelism"]["student"]
    unsplit = copy.deepcopy(job)
    unsplit["spec"]["parallelism"]["student"] = {"data": 2, "tensor": 1, "pipeline": 1}
    spec = parse_job(unsplit).spec
    student = spec.parallelism.student.model_copy(
        update={"data": 1, "tensor": split.get("tensor", 1), "pipeline": split.get("pipeline", 1)}
    )
    spec = spec.model_copy(update={"parallelism": spec.parallelism.model_copy(update={"student": student})})
    with pytest.raises(TrainerError) as err:
        check_supported(spec, layout_from_spec(spec.parallelism))
    assert err.value.code == ExitCode.BAD_SPEC
    assert _TRAINER_NEEDLES[name] in err.value.message, err.value.message


def test_model_parallel_bad_spec_exits_20_before_any_peer_joins(root: Path) -> None:
    """The spec check runs before the rendezvous: one rank alone exits BAD_SPEC at once."""
    path = _write_job(root, "bad-sequence", tensor=2, objectives=("sequence",))
    env = dict(
        _env(2),
        RANK="0",
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="1",
        KDISTILL_TERMINATION_LOG=str(root / "bad-termination.log"),
    )
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "kdistill.trainer", "--config", str(path), "--output", str(root / "out-bad")],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == int(ExitCode.BAD_SPEC), proc.stderr[-3000:]
    message = json.loads((root / "bad-termination.log").read_text())
    assert message["retryable"] is False and "sequence" in message["message"]


def test_pipeline2_x_data2_trains_like_one_process(root: Path, reference: tuple[list[float], Path]) -> None:
    """DDP around pipeline stages: each stage runs one backward per micro-batch, which DDP's
    first-step bucket rebuild cannot count (it failed an internal assert at step 2)."""
    ref, ref_out = reference
    out = root / "out-pp2dp2"
    steps, _ = _run(_write_job(root, "pp2dp2", pipeline=2, data=2), out, 4)
    _assert_follows(steps, ref)
    _assert_same_student(out, ref_out)
