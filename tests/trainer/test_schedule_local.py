"""`kdistill schedule run` end to end: real rounds of a tiny GPT2 teacher's distillation over a
drifting corpus, through the real CLI (a subprocess), with the same gate as the operator's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from kdistill.api.replay import RunDataPlan
from kdistill.api.schedule import DistillationScheduleStatus
from kdistill.trainer.drift_corpus import build_drift_partitions

from . import helpers

ROOT = Path(__file__).resolve().parents[2]
COMMAND = (sys.executable, "-P", "-m", "kdistill.cli.main", "schedule", "run")


def trained_teacher(out: Path, tokenizer: Any, partitions: Path) -> Path:
    """A tiny GPT2 trained briefly on the partitions' text, so that it beats a fresh student."""
    import torch

    texts = [json.loads(line)["text"] for f in sorted(partitions.glob("*/train.jsonl")) for line in f.open()]
    model = helpers.gpt2(len(tokenizer), layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = tokenizer(texts[step * 8 % len(texts) :][:8], truncation=True, max_length=48, padding=True,
                          return_tensors="pt")  # fmt: skip
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return helpers.save_model(model, tokenizer, out)


def schedule(teacher: Path, partitions: Path, gate: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationSchedule",
        "metadata": {"name": "drift"},
        "spec": {
            "schedule": "0 3 * * *",
            "data": {"partitions": str(partitions), "window": 1, "replay": {"fraction": 0.25, "partitions": 2}},
            "warmStart": "lastPromoted",
            "promotion": {"gate": gate},
            "jobTemplate": {
                "spec": {
                    "task": "causal-lm",
                    "teacher": {"model": str(teacher)},
                    "student": {"fromTeacher": {"numLayers": 1}},
                    "data": {"maxSeqLength": 48},
                    "distillation": {
                        "stages": [{"name": "output", "steps": 4, "objectives": ["logits"]}],
                        "batchSize": 4,
                        "warmupSteps": 1,
                    },
                    "quantization": {"mode": "ptq-int8"},
                    "parallelism": {"nodes": 1, "gpusPerNode": 0},
                    "checkpoint": {"everySteps": 4, "keep": 1},
                    "serving": {"qualityGate": {"minRetention": 0.01}},
                }
            },
        },
    }


def run_schedule(tmp_path: Path, body: dict[str, Any], runs: int) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(body))
    return subprocess.run(
        [*COMMAND, str(path), "--runs", str(runs), "--output", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )


def test_two_rounds_promote_warm_start_and_replay(tmp_path: Path, gpt2_teacher: Path) -> None:
    parts = build_drift_partitions(tmp_path / "partitions", partitions=3)
    loose = {"minRetention": 0.01, "mustBeatServing": False, "maxForgetting": 1.0}
    proc = run_schedule(tmp_path, schedule(gpt2_teacher, tmp_path / "partitions", loose), runs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    status = DistillationScheduleStatus.model_validate(json.loads((out / "status.json").read_text()))
    assert [(e.job, e.promoted, e.version) for e in status.history] == [("drift-1", True, 1), ("drift-2", True, 2)]
    assert status.promoted is not None and (status.promoted.job, status.promoted.version) == ("drift-2", 2)
    first, second = status.history
    assert first.serving_metric is None and first.forgetting is None and "no student served yet" in first.reason
    assert second.serving_metric is not None and second.forgetting is not None
    # The table printed on stdout has both rounds.
    table = proc.stdout.splitlines()
    assert table[0].split()[:3] == ["JOB", "PROMOTED", "VERSION"]
    assert table[1].split()[:3] == ["drift-1", "yes", "1"] and table[2].split()[:3] == ["drift-2", "yes", "2"]

    # Round 1 sees partitions 1-2: fresh is the 2nd, replay from the 1st; round 2 fresh is the 3rd.
    plans = [RunDataPlan.from_json((out / f"drift-{i}" / "data" / "plan.json").read_text()) for i in (1, 2)]
    assert plans[0].fresh == (parts[1].name,) and set(plans[0].replay) == {parts[0].name}
    assert plans[1].fresh == (parts[2].name,) and set(plans[1].replay) <= {parts[0].name, parts[1].name}
    assert plans[1].eval_old == (parts[0].name, parts[1].name)
    for i, plan in enumerate(plans, start=1):
        lines = (out / f"drift-{i}" / "data" / "train.jsonl").read_text().splitlines()
        assert len(lines) == plan.fresh_examples + plan.replay_examples
        assert abs(plan.replay_fraction - 0.25) <= 1 / len(lines)
    # Round 2 starts from round 1's full-precision student; round 1 from the teacher's layers.
    jobs = [yaml.safe_load((out / f"drift-{i}" / "job.yaml").read_text()) for i in (1, 2)]
    assert jobs[0]["spec"]["student"] == {"fromTeacher": {"numLayers": 1}}
    assert jobs[1]["spec"]["student"] == {"model": str((out / "drift-1" / "student").resolve())}


def test_a_student_below_min_retention_is_refused(tmp_path: Path, tokenizer: Any) -> None:
    build_drift_partitions(tmp_path / "partitions", partitions=2)
    teacher = trained_teacher(tmp_path / "teacher", tokenizer, tmp_path / "partitions")
    strict = {"minRetention": 0.99}
    proc = run_schedule(tmp_path, schedule(teacher, tmp_path / "partitions", strict), runs=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = DistillationScheduleStatus.model_validate(json.loads((tmp_path / "out" / "status.json").read_text()))
    (entry,) = status.history
    assert not entry.promoted and entry.version is None and status.promoted is None, entry.reason
    assert entry.reason.startswith("refused: retention") and "< minRetention 0.99" in entry.reason


def test_classifier_rounds_compare_the_champion_on_the_same_labels(
    tmp_path: Path, bert_teacher: Path, cls_data: tuple[Path, Path]
) -> None:
    """A sequence-classification schedule: round 2's trainer scores the champion (round 1's INT8
    classifier) in accuracy on the same eval examples, with the same label numbering."""
    train, ev = cls_data
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    evals = [json.loads(line) for line in ev.read_text().splitlines()]
    for i in range(2):  # two partitions, each with every label
        part = tmp_path / "partitions" / f"2026-11-0{i + 1}"
        helpers.write_jsonl(part / "train.jsonl", rows[i::2])
        helpers.write_jsonl(part / "eval.jsonl", evals[i::2])
    body = schedule(bert_teacher, tmp_path / "partitions", {"minRetention": 0.01, "mustBeatServing": False,
                                                            "maxForgetting": 1.0})  # fmt: skip
    spec = body["spec"]["jobTemplate"]["spec"]
    spec["task"] = "sequence-classification"
    spec["quantization"] = {"mode": "ptq-int8"}
    proc = run_schedule(tmp_path, body, runs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = DistillationScheduleStatus.model_validate(json.loads((tmp_path / "out" / "status.json").read_text()))
    first, second = status.history
    assert first.promoted and second.promoted, (first.reason, second.reason)
    result = json.loads((tmp_path / "out" / "drift-2" / "result.json").read_text())
    metrics = result["metrics"]
    assert metrics["metric"] == "accuracy" and 0.0 <= metrics["champion"] <= 1.0
    assert second.serving_metric == metrics["champion"] and second.forgetting is not None
