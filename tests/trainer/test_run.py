"""Short end-to-end runs through the real entry point, one per task, plus failure exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.api.failures import ExitCode
from kdistill.trainer.runner import main_entry

from . import helpers


@pytest.fixture
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("KDISTILL_TERMINATION_LOG", str(path))
    return path


def test_causal_lm_two_stage_run(
    tmp_path: Path, gpt2_teacher: Path, causal_data: tuple[Path, Path], termination_log: Path
) -> None:
    train, ev = causal_data
    job = helpers.job_dict(
        "causal",
        "causal-lm",
        str(gpt2_teacher),
        str(train),
        str(ev),
        stages=[
            {"name": "features", "steps": 3, "objectives": ["hidden", "attention"], "attentionRank": 4},
            {"name": "output", "steps": 4, "objectives": ["logits"]},
        ],
        every_steps=3,
        extra_distillation={"loss": "jsd", "gradientAccumulationSteps": 2},
    )
    job_file = helpers.write_job(tmp_path / "job.yaml", job)
    steps: list[dict] = []
    out = tmp_path / "out"
    code = main_entry(
        job_file,
        out,
        on_step=lambda r: steps.append({"step": r.step, "stage": r.stage, "parts": r.parts, "T": r.temperature}),
    )
    assert code == 0
    assert [s["stage"] for s in steps] == ["features"] * 3 + ["output"] * 4
    assert set(steps[0]["parts"]) == {"hidden", "attention", "total"}
    assert {"kd", "ce", "logits"} <= set(steps[-1]["parts"]) and "hidden" not in steps[-1]["parts"]
    assert steps[0]["T"] == 5.0 and steps[-1]["T"] == 1.0
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 7 and result["tokensSeen"] > 0 and result["tokensPerSecond"] > 0
    m = result["metrics"]
    assert m["metric"] == "perplexity" and m["retention"] == pytest.approx(m["teacher"] / m["student"])
    # The student: safetensors + config + tokenizer, loadable with Auto classes.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(str(out / "student"), use_safetensors=True)
    assert student.config.n_layer == 2
    assert AutoTokenizer.from_pretrained(str(out / "student")).get_vocab()
    assert (out / "student" / "model.safetensors").is_file()
    # quantization none still writes the served artifact the rollout reads, with full-precision weights.
    assert result["artifact"] == str(out / "student-int8")
    served = json.loads((out / "student-int8" / "kdistill.json").read_text())
    assert served["quantization"]["mode"] == "none" and served["task"] == "causal-lm"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000003", "step-000000006"]
    term = json.loads(termination_log.read_text())
    assert term["reason"] == "Succeeded" and term["result"]["metrics"]["metric"] == "perplexity"


def test_classification_run_stratified_weighted(
    tmp_path: Path, bert_teacher: Path, cls_data: tuple[Path, Path], termination_log: Path
) -> None:
    train, ev = cls_data
    job = helpers.job_dict(
        "cls",
        "sequence-classification",
        str(bert_teacher),
        str(train),
        str(ev),
        batch_size=6,
        stages=[
            {"name": "intermediate", "steps": 2, "objectives": ["hidden", "attention"], "attentionRank": 4},
            {"name": "output", "steps": 3, "objectives": ["logits"]},
        ],
        extra_distillation={"loss": "reverse-kl"},
        extra_data={
            "sampling": {"strategy": "stratified", "head": 0.5, "torso": 0.3, "tail": 0.2},
            "uncertaintyWeighting": {"enabled": True, "beta": 0.5},
        },
    )
    job_file = helpers.write_job(tmp_path / "job.yaml", job)
    out = tmp_path / "out"
    assert main_entry(job_file, out) == 0
    result = json.loads((out / "result.json").read_text())
    m = result["metrics"]
    assert m["metric"] == "accuracy" and 0.0 <= m["student"] <= 1.0
    assert m["retention"] == pytest.approx(m["student"] / m["teacher"])
    weights = load_file(str(out / "student" / "model.safetensors"))
    assert weights["classifier.weight"].shape == (3, 32)
    assert not torch.equal(
        weights["classifier.weight"], load_file(str(bert_teacher / "model.safetensors"))["classifier.weight"]
    )


def test_bad_data_exits_with_bad_data(tmp_path: Path, gpt2_teacher: Path, termination_log: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "fine line of text"}\nnot json at all\n{"nottext": 1}\n')
    job_file = helpers.write_job(
        tmp_path / "job.yaml", helpers.job_dict("bad", "causal-lm", str(gpt2_teacher), "train.jsonl", None)
    )
    assert main_entry(job_file, tmp_path / "out") == ExitCode.BAD_DATA
    term = json.loads(termination_log.read_text())
    assert term["reason"] == "BAD_DATA" and term["retryable"] is False
    assert "train.jsonl:2" in term["message"]


def test_missing_teacher_exits_with_model_not_found(
    tmp_path: Path, causal_data: tuple[Path, Path], termination_log: Path
) -> None:
    train, _ = causal_data
    job_file = helpers.write_job(
        tmp_path / "job.yaml", helpers.job_dict("nomodel", "causal-lm", "pvc://models/absent", str(train), None)
    )
    assert main_entry(job_file, tmp_path / "out") == ExitCode.MODEL_NOT_FOUND
    assert json.loads(termination_log.read_text())["reason"] == "MODEL_NOT_FOUND"


def test_qat_int8_run_writes_served_artifact(
    tmp_path: Path, gpt2_teacher: Path, causal_data: tuple[Path, Path], termination_log: Path
) -> None:
    train, ev = causal_data
    job = helpers.job_dict(
        "qat",
        "causal-lm",
        str(gpt2_teacher),
        str(train),
        str(ev),
        every_steps=6,
        stages=[{"name": "output", "steps": 3, "objectives": ["logits"]}],
    )
    job["spec"]["quantization"] = {"mode": "qat-int8", "qatSteps": 4, "reducedPrecisionFraction": 0.5}
    job_file = helpers.write_job(tmp_path / "job.yaml", job)
    out = tmp_path / "out"
    stages: list[str] = []
    assert main_entry(job_file, out, on_step=lambda r: stages.append(r.stage)) == 0
    assert stages == ["output"] * 3 + ["qat-reduced-precision"] * 2 + ["qat-fake-quant"] * 2
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 7 and result["artifact"] == str(out / "student-int8")
    # The gate judges the served (INT8) artifact.
    assert result["metrics"] == result["int8"] and result["int8"]["metric"] == "perplexity"
    from kdistill.trainer.artifact import load_artifact

    art = load_artifact(out / "student-int8")
    assert art.meta["quantization"]["mode"] == "qat-int8"
    # The full-precision student has no fake-quant leftovers: it loads as a plain GPT2.
    weights = load_file(str(out / "student" / "model.safetensors"))
    assert all("fake_quant" not in k and "quantizer" not in k for k in weights)
    # A checkpoint taken inside the fake-quant phase (step 6) resumes into it: the student is
    # wrapped again before its state is loaded.
    first = weights
    shutil.rmtree(out / "student")
    shutil.rmtree(out / "student-int8")
    (out / "result.json").unlink()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000000006"]
    assert main_entry(job_file, out) == 0
    again = json.loads((out / "result.json").read_text())
    assert again["resumedFrom"] == 6
    second = load_file(str(out / "student" / "model.safetensors"))
    assert first.keys() == second.keys()
