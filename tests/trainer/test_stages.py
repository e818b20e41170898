"""Stages switch what is optimised; the temperature runs once over all distillation stages; the
teacher cache gives the same training as the live teacher when k covers the vocabulary."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from kdistill.api import parse_job
from kdistill.trainer.loop import Trainer
from kdistill.trainer.options import RunOptions, StepReport
from kdistill.trainer.outputs import OutputLayout
from kdistill.trainer.stages import build_plan, phase_at, temperature

from . import helpers


def trainer_for(tmp_path: Path, job: dict, on_step=None) -> Trainer:  # type: ignore[no-untyped-def]
    return Trainer(
        parse_job(job),
        RunOptions(output=OutputLayout(tmp_path / "out"), base_dir=tmp_path, on_step=on_step, evaluate=False),
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_each_stage_optimises_only_its_objectives(
    tmp_path: Path, gpt2_teacher: Path, causal_data: tuple[Path, Path]
) -> None:
    train, _ = causal_data
    job = helpers.job_dict(
        "stages",
        "causal-lm",
        str(gpt2_teacher),
        str(train),
        None,
        every_steps=100,
        student={"fromTeacher": {"numLayers": 2, "hiddenSize": 16, "numAttentionHeads": 2}},
        stages=[
            {"name": "hidden", "steps": 3, "objectives": ["hidden"]},
            {"name": "attention", "steps": 3, "objectives": ["attention"], "attentionRank": 4},
            {"name": "output", "steps": 3, "objectives": ["logits"]},
        ],
    )
    snaps: dict[str, dict] = {}
    reports: list[StepReport] = []

    def on_step(r: StepReport) -> None:
        reports.append(r)
        if r.step in (3, 6, 9):
            snaps[r.stage] = {name: snapshot(m) for name, m in t.aux.items()} | {"student": snapshot(t.student)}

    t = trainer_for(tmp_path, job, on_step)
    assert set(t.aux) == {"hidden", "attention_r4"}
    start = {name: snapshot(m) for name, m in t.aux.items()} | {"student": snapshot(t.student)}
    head_before = t.student.lm_head.weight.detach().clone()
    t.train()
    # Each stage trains its own aux module only; the others get no gradient at all.
    s_hidden, s_attn, s_out = snaps["hidden"], snaps["attention"], snaps["output"]

    def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return any(not torch.equal(a[k], b[k]) for k in a)

    assert differs(start["hidden"], s_hidden["hidden"])
    assert not differs(start["attention_r4"], s_hidden["attention_r4"])
    assert differs(s_hidden["attention_r4"], s_attn["attention_r4"])
    assert not differs(s_hidden["hidden"], s_attn["hidden"])
    assert not differs(s_attn["hidden"], s_out["hidden"]) and not differs(s_attn["attention_r4"], s_out["attention_r4"])
    assert differs(s_attn["student"], s_out["student"])
    # The output embedding/head is trained by the logits stage (tied with the input embedding).
    assert not torch.equal(head_before, t.student.lm_head.weight)
    parts = [set(r.parts) - {"total"} for r in reports]
    assert parts[:3] == [{"hidden"}] * 3
    assert parts[3:6] == [{"attention"}] * 3
    assert all(p == {"kd", "ce", "logits"} for p in parts[6:])


def test_temperature_spans_all_distillation_stages() -> None:
    from kdistill.trainer.quantization import qat_phase_split
    from kdistill.trainer.schedules import temperature_at

    job = helpers.job_dict(
        "t",
        "causal-lm",
        "x",
        "y",
        None,
        quantization="qat-int8",
        stages=[
            {"name": "a", "steps": 4, "objectives": ["hidden"]},
            {"name": "b", "steps": 7, "objectives": ["logits"]},
        ],
    )
    job["spec"]["quantization"] = {"mode": "qat-int8", "qatSteps": 4, "reducedPrecisionFraction": 0.5}
    spec = parse_job(job).spec
    plan = build_plan(spec, qat_phase_split)
    assert [p.kind for p in plan] == ["distill", "distill", "qat-reduced", "qat-fake-quant"]
    assert sum(p.steps for p in plan) == spec.total_steps == 15
    temps = [temperature(spec, plan, s, temperature_at) for s in range(15)]
    assert temps[0] == 5.0 and temps[10] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(temps[:11]))  # falls through both stages
    assert temps[11:] == [1.0] * 4  # QAT uses end
    assert phase_at(plan, 4).name == "b" and phase_at(plan, 11).kind == "qat-reduced"


def test_teacher_cache_matches_live_teacher_and_skips_teacher(tmp_path: Path, gpt2_teacher: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    train, _ = helpers.causal_data(tmp_path / "data", n_train=16, n_eval=4)
    vocab = len(tokenizer)

    def run(cache: bool, name: str) -> tuple[Trainer, list[int]]:
        job = helpers.job_dict(
            name,
            "causal-lm",
            str(gpt2_teacher),
            str(train),
            None,
            every_steps=100,
            stages=[{"name": "output", "steps": 30, "objectives": ["logits"]}],
            extra_distillation={"teacherCache": {"enabled": cache, "topK": vocab}},
        )
        (tmp_path / name).mkdir()
        t = trainer_for(tmp_path / name, job)
        calls: list[int] = []
        # On the backbone: the row-only logits path calls it without the LM wrapper.
        t.teacher.transformer.register_forward_hook(lambda *_: calls.append(1))
        per_step: list[int] = []
        t.opts.on_step = lambda r: per_step.append(len(calls))
        t.train()
        return t, per_step

    live, live_calls = run(False, "live")
    cached, cache_calls = run(True, "cached")
    assert live_calls[-1] == 30
    # 16 examples, batches of 4: once every example has been seen, every batch is a cache hit
    # (a batch misses while any of its examples is new, so the first passes still call the teacher).
    assert cache_calls[-1] < 20 and cache_calls[-1] == cache_calls[-8], cache_calls
    for (name, a), b in zip(live.student.named_parameters(), cached.student.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-2, msg=name)
    assert any(p.stat().st_size > 0 for p in (tmp_path / "cached" / "out" / "teacher-cache").rglob("*") if p.is_file())
