"""Hidden-state and attention transfer with a student split by tensor and/or pipeline parallelism,
in the training loop as the pods run it (torchrun, gloo on CPU).

A tiny Llama teacher (4 blocks, width 32) and a narrower Llama student (2 blocks, width 16, so the
hidden projections are real Linear layers): with the default layer map the student's block 0
pairs with teacher block 1 and its block 1 (after the final norm) with teacher block 3, so under
``pipeline=2`` each stage owns one pair. The plan has a hidden-only stage, a hidden + attention
stage and a logits stage, so phase changes (aux parameters and the LM head without gradients)
are covered. Every layout must follow the single-process run step for step and end at its
student and aux weights; a checkpoint written mid-plan resumes to the same end.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from kdistill.api import load_job
from tests.trainer import helpers

from .checkpoints import assert_same_moments, aux_weights
from .test_loop_tp_pp import _resume_from, _run

STEPS, EVERY = 6, 3
PLAN = [
    {"name": "features", "steps": 2, "objectives": ["hidden"]},
    {"name": "intermediate", "steps": 2, "objectives": ["hidden", "attention", "logits"], "attentionRank": 8},
    {"name": "output", "steps": 2, "objectives": ["logits"]},
]


def _write_job(
    root: Path,
    name: str,
    *,
    pipeline: int = 1,
    data: int = 1,
    tensor: int = 1,
    family: str = "llama",
    **spec: Any,
) -> Path:
    world = pipeline * data * tensor
    prefix = "" if family == "llama" else f"{family}-"
    job = helpers.job_dict(
        name,
        "causal-lm",
        str(root / f"{prefix}teacher"),
        str(root / "data" / "train.jsonl"),
        None,
        student={"model": str(root / f"{prefix}student")},
        stages=PLAN,
        batch_size=8,
        every_steps=EVERY,
    )
    # Entries whose gradient is a near-cancelling sum of ~1e-9 (below AdamW's eps) keep a relative
    # rounding error of ~1% between layouts (different summation order), which Adam turns into an
    # update error proportional to the learning rate; 1e-3 keeps it below the 1e-5 compared here.
    job["spec"]["distillation"]["learningRate"] = 1e-3
    job["spec"]["parallelism"] = {
        "nodes": world,
        "gpusPerNode": 0,
        "student": {"data": data, "tensor": tensor, "pipeline": pipeline},
        **spec,
    }
    return helpers.write_job(root / f"{name}.yaml", job)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("split-features")
    texts = [p for _, p in helpers.pydoc_paragraphs(300)]
    tok = helpers.make_tokenizer(root / "tok", texts)
    helpers.save_model(helpers.llama(len(tok), layers=4, width=32, heads=4, kv_heads=2), tok, root / "teacher")
    helpers.save_model(helpers.llama(len(tok), layers=2, width=16, heads=4, kv_heads=2, seed=1), tok, root / "student")
    helpers.causal_data(root / "data", n_train=96, n_eval=16)
    # GPT2 without dropout (the split and the single run draw dropout masks differently).
    helpers.save_model(_gpt2(len(tok), layers=4, width=32, seed=0), tok, root / "gpt2-teacher")
    helpers.save_model(_gpt2(len(tok), layers=2, width=16, seed=1), tok, root / "gpt2-student")
    return root


def _gpt2(vocab: int, *, layers: int, width: int, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=128,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def reference(root: Path) -> tuple[list[dict[str, float]], Path]:
    return _single_process(root, "llama")


@pytest.fixture(scope="module")
def gpt2_reference(root: Path) -> tuple[list[dict[str, float]], Path]:
    return _single_process(root, "gpt2")


def _single_process(root: Path, family: str) -> tuple[list[dict[str, float]], Path]:
    """The single-process run, in this process: per-step loss and parts as rank 0 prints them."""
    from kdistill.trainer.options import RunOptions, StepReport
    from kdistill.trainer.outputs import OutputLayout
    from kdistill.trainer.runner import run_job

    assert os.environ.get("WORLD_SIZE", "1") == "1"
    path, out = _write_job(root, f"one-{family}", family=family), root / f"out-one-{family}"
    reports: list[StepReport] = []
    run_job(load_job(path), RunOptions(output=OutputLayout(out), base_dir=root, on_step=reports.append))
    assert [r.step for r in reports] == list(range(1, STEPS + 1))
    return [{"loss": r.loss, **r.parts} for r in reports], out


def _assert_follows(steps: list[dict[str, Any]], ref: list[dict[str, float]], first: int = 1) -> None:
    assert [s["step"] for s in steps] == list(range(first, STEPS + 1))
    for got, want in zip(steps, ref[first - 1 :], strict=True):
        assert math.isfinite(got["loss"])
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-5, abs=2e-6), (got, want)
        # The same objectives, each with the single-process value (printed to 6 decimals).
        assert set(got["parts"]) == {k for k in want if k != "loss"}, (got, want)
        for k, v in got["parts"].items():
            assert v == pytest.approx(want[k], rel=2e-5, abs=2e-6), (k, got, want)
    assert {"hidden", "attention"} <= {k for s in steps for k in s["parts"]} or first > 2


def _assert_same_outputs(out: Path, ref_out: Path, step: int = STEPS) -> None:
    """The final student, and the aux modules and Adam moments of the last checkpoint, equal the
    single process's."""
    ckpt, ref_ckpt = out / "checkpoints" / f"step-{step:09d}", ref_out / "checkpoints" / f"step-{step:09d}"
    pairs = (
        (helpers.load_student(out / "student"), helpers.load_student(ref_out / "student")),
        (aux_weights(ckpt), aux_weights(ref_ckpt)),
    )
    for x, y in pairs:
        assert set(x) == set(y)
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-5, msg=k)
    assert_same_moments(ckpt, ref_ckpt)


@pytest.mark.parametrize(
    ("layout", "world"),
    [({"pipeline": 2}, 2), ({"tensor": 2}, 2), ({"pipeline": 2, "tensor": 2}, 4), ({"pipeline": 2, "data": 2}, 4)],
    ids=["pipeline2", "tensor2", "pipeline2xtensor2", "pipeline2xdata2"],
)
def test_hidden_and_attention_follow_the_single_process(
    root: Path, reference: tuple[list[dict[str, float]], Path], layout: dict[str, int], world: int
) -> None:
    ref, ref_out = reference
    name = "x".join(f"{k}{v}" for k, v in layout.items())
    out = root / f"out-{name}"
    steps, _ = _run(_write_job(root, name, **layout), out, world)
    _assert_follows(steps, ref)
    _assert_same_outputs(out, ref_out)


def test_resume_mid_plan_restores_the_aux_modules(root: Path, reference: tuple[list[dict[str, float]], Path]) -> None:
    """The step-3 checkpoint (inside the hidden + attention stage) of a 2-rank pipeline run resumes
    on a 2-rank tensor-parallel layout: the aux weights and their Adam moments come back, so the
    last steps and the final weights are the single-process run's."""
    ref, ref_out = reference
    src = root / "out-pipeline2"
    if not src.exists():
        _run(_write_job(root, "pipeline2", pipeline=2), src, 2)
    again = root / "out-pipeline2-on-tensor2"
    _resume_from(src, EVERY, again)
    steps, result = _run(_write_job(root, "resume-tensor2", tensor=2), again, 2)
    assert result["resumedFrom"] == EVERY
    _assert_follows(steps, ref, first=EVERY + 1)
    _assert_same_outputs(again, ref_out)


def test_split_teacher_delivers_the_pairs_to_a_split_student(
    root: Path, reference: tuple[list[dict[str, float]], Path]
) -> None:
    """teacherPipelineStages=2 with a pipeline-split student on the same 2 ranks: the teacher's
    hidden states and q/k/v come from its own stages, each rank keeps what its student blocks need."""
    ref, ref_out = reference
    out = root / "out-teacher2-pipeline2"
    steps, _ = _run(_write_job(root, "teacher2-pipeline2", pipeline=2, teacherPipelineStages=2), out, 2)
    _assert_follows(steps, ref)
    _assert_same_outputs(out, ref_out)


@pytest.mark.parametrize(
    ("layout", "world"), [({"tensor": 2}, 2), ({"pipeline": 2, "tensor": 2}, 4)], ids=["tensor2", "pipeline2xtensor2"]
)
def test_gpt2_tensor_parallel_follows_the_single_process(
    root: Path, gpt2_reference: tuple[list[dict[str, float]], Path], layout: dict[str, int], world: int
) -> None:
    """GPT2 under tensor parallelism: the fused c_attn cut into each rank's q/k/v columns, c_fc by
    columns, both c_proj by rows (tied embedding and head replicated); with hidden and attention
    transfer in the plan, the run follows the single process and ends at its weights, and the
    checkpoints hold the unsplit Conv1D layout."""
    ref, ref_out = gpt2_reference
    name = "gpt2-" + "x".join(f"{k}{v}" for k, v in layout.items())
    out = root / f"out-{name}"
    steps, _ = _run(_write_job(root, name, family="gpt2", **layout), out, world)
    _assert_follows(steps, ref)
    _assert_same_outputs(out, ref_out)


def test_sequence_classifier_split_by_tensor_follows_the_single_process(root: Path) -> None:
    """A Llama sequence classifier split by tensor parallelism: the class logits are scored as a
    one-position sequence (KD + CE per sample, normalised over the global batch); with a hidden +
    attention stage and a logits stage it follows the single process and ends at its weights."""
    from kdistill.trainer.options import RunOptions, StepReport
    from kdistill.trainer.outputs import OutputLayout
    from kdistill.trainer.runner import run_job

    texts = [p for _, p in helpers.pydoc_paragraphs(300)]
    tok = helpers.make_tokenizer(root / "cls-tok", texts)
    teacher = helpers.llama(
        len(tok), layers=4, width=32, heads=4, kv_heads=2, task="sequence-classification", num_labels=3
    )
    helpers.save_model(teacher, tok, root / "cls-teacher")
    helpers.classification_data(root / "cls-data")

    def job(name: str, tensor: int) -> Path:
        spec = helpers.job_dict(
            name,
            "sequence-classification",
            str(root / "cls-teacher"),
            str(root / "cls-data" / "train.jsonl"),
            None,
            stages=[
                {"name": "features", "steps": 2, "objectives": ["hidden", "attention"], "attentionRank": 8},
                {"name": "output", "steps": 4, "objectives": ["logits"]},
            ],
            batch_size=8,
            every_steps=EVERY,
            extra_data={"labelField": "label"},
        )
        spec["spec"]["distillation"]["learningRate"] = 1e-3
        spec["spec"]["parallelism"] = {"nodes": tensor, "gpusPerNode": 0, "student": {"tensor": tensor}}
        return helpers.write_job(root / f"{name}.yaml", spec)

    ref_out = root / "out-cls-one"
    reports: list[StepReport] = []
    run_job(
        load_job(job("cls-one", 1)), RunOptions(output=OutputLayout(ref_out), base_dir=root, on_step=reports.append)
    )
    ref = [{"loss": r.loss, **r.parts} for r in reports]
    out = root / "out-cls-tensor2"
    steps, _ = _run(job("cls-tensor2", 2), out, 2)
    _assert_follows(steps, ref)
    _assert_same_outputs(out, ref_out)
