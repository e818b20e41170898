"""Sequence classification in the training loop as the pods run it (torchrun, gloo on CPU) with the
teacher split into two pipeline stages and the student split by pipeline, tensor or both.

A tiny Llama classifier teacher (4 blocks, width 32, 3 labels) and a 2-block student copied from
it. The plan has a hidden + attention stage and a logits stage, so the split classifier's stages
run the feature terms and its last stage pools (the last non-pad token) and scores. Every layout
must follow the single-process run (whole teacher, whole student) step for step and end at its
student, aux weights and Adam moments; a checkpoint resumes on another layout; QAT follows the
unsplit QAT run and its INT8 artifact is the conversion of the gathered student."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kdistill.api import load_job
from tests.trainer import helpers

from .test_loop_tp_pp import _assert_same_student, _resume_from, _run
from .test_split_compose import _assert_qat_student, _assert_steps
from .test_split_features import EVERY, STEPS, _assert_follows, _assert_same_outputs

PLAN = [
    {"name": "features", "steps": 2, "objectives": ["hidden", "attention"], "attentionRank": 8},
    {"name": "output", "steps": STEPS - 2, "objectives": ["logits"]},
]
LR = 1e-3  # the peak learning rate of helpers.job_dict's runs
QAT_STEPS = 4
QAT = {"mode": "qat-int8", "qatSteps": QAT_STEPS, "reducedPrecisionFraction": 0.0}
LAYOUTS = {
    "pipeline2": {"pipeline": 2},
    "tensor2": {"tensor": 2},
    "pipeline2xtensor2": {"pipeline": 2, "tensor": 2},
}


def _world(layout: dict[str, int]) -> int:
    return layout.get("pipeline", 1) * layout.get("tensor", 1) * layout.get("data", 1)


def _write_job(
    root: Path,
    name: str,
    layout: dict[str, int],
    *,
    teacher_stages: int = 2,
    qat: bool = False,
    teacher: str = "teacher",
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    world = _world(layout)
    logits_only = qat or extra is not None
    job = helpers.job_dict(
        name,
        "sequence-classification",
        str(root / teacher),
        str(root / "data" / "train.jsonl"),
        None,
        stages=[{"name": "output", "steps": STEPS, "objectives": ["logits"]}] if logits_only else PLAN,
        batch_size=8,
        every_steps=EVERY,
        extra_data={"labelField": "label"},
    )
    if qat:
        job["spec"]["quantization"] = dict(QAT)
    for key, value in (extra or {}).items():
        job["spec"][key].update(value)
    # A single process runs the whole teacher; a split run cuts it over its first two ranks' group.
    stages = teacher_stages if world > 1 else 1
    job["spec"]["parallelism"] = {
        "nodes": world,
        "gpusPerNode": 0,
        "teacherPipelineStages": stages,
        "student": {
            "data": layout.get("data", 1),
            "tensor": layout.get("tensor", 1),
            "pipeline": layout.get("pipeline", 1),
        },
    }
    return helpers.write_job(root / f"{name}.yaml", job)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classifier-loop")
    texts = [p for _, p in helpers.pydoc_paragraphs(300)]
    tok = helpers.make_tokenizer(root / "tok", texts)
    teacher = helpers.llama(
        len(tok), layers=4, width=32, heads=4, kv_heads=2, task="sequence-classification", num_labels=3
    )
    helpers.save_model(teacher, tok, root / "teacher")
    helpers.classification_data(root / "data")
    return root


def _single_process(root: Path, name: str, qat: bool = False, **kw: Any) -> tuple[list[dict[str, float]], Path]:
    from kdistill.trainer.options import RunOptions, StepReport
    from kdistill.trainer.outputs import OutputLayout
    from kdistill.trainer.runner import run_job

    assert os.environ.get("WORLD_SIZE", "1") == "1"
    path, out = _write_job(root, name, {}, qat=qat, **kw), root / f"out-{name}"
    reports: list[StepReport] = []
    run_job(load_job(path), RunOptions(output=OutputLayout(out), base_dir=root, on_step=reports.append))
    return [{"loss": r.loss, **r.parts} for r in reports], out


@pytest.fixture(scope="module")
def reference(root: Path) -> tuple[list[dict[str, float]], Path]:
    ref, out = _single_process(root, "one")
    assert [r["loss"] for r in ref][-1] < ref[2]["loss"]  # the logits stage learns
    return ref, out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_split_classifier_with_split_teacher_follows_the_single_process(
    root: Path, reference: tuple[list[dict[str, float]], Path], layout: str
) -> None:
    """teacherPipelineStages=2 (its last stage pools and scores the class logits) with the student
    split by pipeline, tensor or both: the losses and their parts follow the single process step
    for step, and the run ends at its student, aux weights and Adam moments."""
    ref, ref_out = reference
    out = root / f"out-{layout}"
    parts = LAYOUTS[layout]
    steps, _ = _run(_write_job(root, layout, parts), out, _world(parts))
    _assert_follows(steps, ref)
    _assert_same_outputs(out, ref_out)


def test_split_classifier_checkpoint_resumes_on_another_layout(
    root: Path, reference: tuple[list[dict[str, float]], Path]
) -> None:
    """The step-3 checkpoint of the pipeline-split run (the first logits step) resumes on a
    tensor-split student with the teacher still split: the last steps, the final weights, the aux
    weights and the Adam moments are the single-process run's."""
    ref, ref_out = reference
    src = root / "out-pipeline2"
    if not src.exists():
        _run(_write_job(root, "pipeline2", LAYOUTS["pipeline2"]), src, 2)
    again = root / "out-pipeline2-on-tensor2"
    _resume_from(src, EVERY, again)
    steps, result = _run(_write_job(root, "resume-tensor2", LAYOUTS["tensor2"]), again, 2)
    assert result["resumedFrom"] == EVERY
    _assert_follows(steps, ref, first=EVERY + 1)
    _assert_same_outputs(again, ref_out)


@pytest.fixture(scope="module")
def qat_reference(root: Path) -> tuple[list[float], Path]:
    ref, out = _single_process(root, "qat-one", qat=True)
    return [round(r["loss"], 6) for r in ref], out


def _assert_qat_losses(steps: list[dict[str, Any]], ref: list[float]) -> None:
    """The fake-quantized steps to 2e-4 relative. A classifier's loss is a mean over the 8 samples
    of a batch, not over hundreds of tokens, so one activation or weight that the last bits move
    across an int8 rounding boundary (see test_split_compose.py) shifts it about ten times more
    than a causal LM's; one fake-quant step on the split classifier equals torchao's unsplit one
    to 1e-5 (test_classifier_split.py)."""
    assert [s["step"] for s in steps] == list(range(1, len(ref) + 1))
    assert [s["loss"] for s in steps] == pytest.approx(ref, rel=2e-4, abs=2e-6)


def _assert_converted(out: Path) -> None:
    """The served INT8 artifact is exactly the INT8 conversion of the run's gathered float
    classifier; the score head stays in full precision."""
    from transformers import AutoModelForSequenceClassification

    from kdistill.trainer.quantization import int8_modules, quantize_ptq_int8

    served = load_file(str(out / "student-int8" / "model.safetensors"))
    model = quantize_ptq_int8(AutoModelForSequenceClassification.from_pretrained(out / "student"), "weight-only")
    assert len(int8_modules(model)) == 2 * 7  # every projection of both blocks, not the head
    mine = model.state_dict()
    assert {k for k in served if k.endswith("weight_int8")} == {k for k in mine if k.endswith("weight_int8")}
    assert not any(k.startswith("score.") and k.endswith("weight_int8") for k in served)
    for k, v in served.items():
        if k in mine:
            torch.testing.assert_close(v, mine[k].to(v.dtype), rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("layout", ["pipeline2", "pipeline2xtensor2"])
def test_qat_split_classifier_trains_and_converts_like_one_process(
    root: Path, qat_reference: tuple[list[float], Path], layout: str
) -> None:
    """QAT's fake-quant phase on the split classifier (teacher split too) gives the unsplit QAT
    run's losses, its weights within a learning-rate step (tests/parallel/test_split_compose.py
    says why QAT is compared so), and the INT8 conversion of the gathered student."""
    ref, ref_out = qat_reference
    assert len(ref) == STEPS + QAT_STEPS
    parts = LAYOUTS[layout]
    out = root / f"out-qat-{layout}"
    steps, result = _run(_write_job(root, f"qat-{layout}", parts, qat=True), out, _world(parts))
    _assert_steps(steps[:STEPS], ref[:STEPS])  # before fake quantization: the exact comparison
    _assert_qat_losses(steps, ref)
    assert result["quantization"] == "qat-int8"
    _assert_qat_student(out, ref_out, lr=LR)
    _assert_converted(out)
    _assert_converted(ref_out)


# k = 2 of the 3 labels: KD over 2 buckets and the tail; entropy weights per sample.
CACHE_WEIGHTING = {
    "distillation": {"teacherCache": {"enabled": True, "topK": 2}},
    "data": {"uncertaintyWeighting": {"enabled": True, "beta": 0.5}},
}


@pytest.fixture(scope="module")
def sharp_teacher(root: Path) -> str:
    """The teacher with its score head scaled up: confident class predictions. Over a nearly
    uniform teacher every weight 1 - (H/log C)^beta is a difference of nearly equal numbers, as
    sensitive to the last bits of the teacher's logits as the weights of real data are not."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = root / "teacher-sharp"
    if not (path / "config.json").exists():
        model = AutoModelForSequenceClassification.from_pretrained(root / "teacher")
        with torch.no_grad():
            model.score.weight.mul_(30.0)
        helpers.save_model(model, AutoTokenizer.from_pretrained(root / "teacher"), path)
    return path.name


def test_split_classifier_with_teacher_cache_and_entropy_weighting_follows_the_single_process(
    root: Path, sharp_teacher: str
) -> None:
    """The class logits' top-k from the teacher cache (stored from the split teacher's pooled
    logits) and per-sample entropy weights on a pipeline x tensor classifier: the single-process
    losses and student."""
    kw: dict[str, Any] = {"teacher": sharp_teacher, "extra": CACHE_WEIGHTING}
    ref, ref_out = _single_process(root, "cache-weighting-one", **kw)
    parts = LAYOUTS["pipeline2xtensor2"]
    out = root / "out-cache-weighting-pipeline2xtensor2"
    steps, _ = _run(_write_job(root, "cache-weighting-pipeline2xtensor2", parts, **kw), out, _world(parts))
    _assert_steps(steps, [round(r["loss"], 6) for r in ref])
    _assert_same_student(out, ref_out)
    assert list((out / "teacher-cache").glob("*.kdtc"))
