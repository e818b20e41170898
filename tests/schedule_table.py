"""One table of good and bad DistillationSchedules, checked by pydantic (tests/unit) and by the
API server's schema and CEL rules (tests/integration/test_schedule_api.py), so that the two agree.

Each bad row names the field path the error must point at.
"""

from __future__ import annotations

import copy
from typing import Any

_DELETE = object()


def base_schedule(name: str = "table-schedule") -> dict[str, Any]:
    return {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationSchedule",
        "metadata": {"name": name},
        "spec": {
            "schedule": "0 3 * * *",
            "data": {"partitions": "pvc://data/intents/"},
            "jobTemplate": {
                "spec": {
                    "task": "causal-lm",
                    "teacher": {"model": "pvc://models/teacher"},
                    "student": {"fromTeacher": {"numLayers": 2}},
                }
            },
        },
    }


def with_spec(**changes: Any) -> dict[str, Any]:
    """base_schedule() with dotted spec paths set; `jobTemplate.spec.x` reaches into the template."""
    schedule = base_schedule()
    for dotted, value in changes.items():
        node = schedule["spec"]
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is _DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = copy.deepcopy(value)
    return schedule


def _long_name() -> dict[str, Any]:
    schedule = base_schedule()
    schedule["metadata"]["name"] = "s" * 53
    return schedule


GOOD_SCHEDULES: list[tuple[str, dict[str, Any]]] = [
    ("minimal", base_schedule()),
    ("macro-in-berlin", with_spec(schedule="@daily", timeZone="Europe/Berlin")),
    ("lists-ranges-steps-names", with_spec(schedule="*/15 1-5,22 * jan,jul mon-fri")),
    ("every-minute-replace", with_spec(schedule="* * * * *", concurrencyPolicy="Replace", startingDeadlineSeconds=90)),
    (
        "replay-warm-start-gate",
        with_spec(
            data={"partitions": "/data/partitions", "window": 2, "replay": {"fraction": 0.2, "partitions": 3}},
            warmStart="lastPromoted",
            promotion={
                "gate": {"minRetention": 0.8, "mustBeatServing": False, "tolerance": 0.01, "maxForgetting": 0.05},
                "canary": {"weight": 25, "analysisSeconds": 60, "maxErrorRate": 0.0, "maxP99Ms": 50},
            },
        ),
    ),
    ("template-data-settings", with_spec(**{"jobTemplate.spec.data": {"textField": "body", "maxSeqLength": 64}})),
    ("template-serving-off", with_spec(**{"jobTemplate.spec.serving": {"enabled": False}})),
    ("template-labels", with_spec(**{"jobTemplate.metadata": {"labels": {"team": "search"}}})),
    ("history-limits-zero", with_spec(successfulJobsHistoryLimit=0, failedJobsHistoryLimit=0)),
    ("name-of-52", {**base_schedule(), "metadata": {"name": "s" * 52}}),
]

BAD_SCHEDULES: list[tuple[str, dict[str, Any], str]] = [
    ("cron-minute-61", with_spec(schedule="61 * * * *"), "spec.schedule"),
    ("cron-hour-24", with_spec(schedule="0 24 * * *"), "spec.schedule"),
    ("cron-four-fields", with_spec(schedule="0 3 * *"), "spec.schedule"),
    ("cron-six-fields", with_spec(schedule="0 0 3 * * *"), "spec.schedule"),
    ("cron-words", with_spec(schedule="every night"), "spec.schedule"),
    ("cron-step-zero", with_spec(schedule="*/0 * * * *"), "spec.schedule"),
    ("cron-day-of-month-0", with_spec(schedule="0 3 0 * *"), "spec.schedule"),
    ("cron-unknown-macro", with_spec(schedule="@fortnightly"), "spec.schedule"),
    ("time-zone-not-a-name", with_spec(timeZone="UTC+2 hours"), "spec.timeZone"),
    ("replay-fraction-one", with_spec(**{"data.replay": {"fraction": 1.0}}), "spec.data.replay.fraction"),
    ("replay-fraction-negative", with_spec(**{"data.replay": {"fraction": -0.1}}), "spec.data.replay.fraction"),
    ("replay-partitions-zero", with_spec(**{"data.replay": {"partitions": 0}}), "spec.data.replay.partitions"),
    ("window-zero", with_spec(**{"data.window": 0}), "spec.data.window"),
    ("partitions-bad-claim", with_spec(**{"data.partitions": "pvc://Bad_Claim/x"}), "spec.data.partitions"),
    ("no-partitions", with_spec(data={"window": 1}), "spec.data.partitions"),
    ("concurrency-allow", with_spec(concurrencyPolicy="Allow"), "spec.concurrencyPolicy"),
    ("history-limit-negative", with_spec(successfulJobsHistoryLimit=-1), "spec.successfulJobsHistoryLimit"),
    ("deadline-zero", with_spec(startingDeadlineSeconds=0), "spec.startingDeadlineSeconds"),
    ("warm-start-unknown", with_spec(warmStart="best"), "spec.warmStart"),
    ("canary-weight-100", with_spec(**{"promotion.canary": {"weight": 100}}), "spec.promotion.canary.weight"),
    ("gate-retention-zero", with_spec(**{"promotion.gate": {"minRetention": 0}}), "spec.promotion.gate.minRetention"),
    (
        "gate-forgetting-above-1",
        with_spec(**{"promotion.gate": {"maxForgetting": 1.5}}),
        "spec.promotion.gate.maxForgetting",
    ),
    ("unknown-field", with_spec(scheduel="0 3 * * *"), "spec.scheduel"),
    ("no-template", with_spec(jobTemplate=_DELETE), "spec.jobTemplate"),
    (
        "template-train-given",
        with_spec(**{"jobTemplate.spec.data": {"train": "pvc://data/train.jsonl"}}),
        "spec.jobTemplate.spec.data.train",
    ),
    (
        "template-eval-given",
        with_spec(**{"jobTemplate.spec.data": {"eval": "pvc://data/eval.jsonl"}}),
        "spec.jobTemplate.spec.data.eval",
    ),
    ("template-no-teacher", with_spec(**{"jobTemplate.spec.teacher": _DELETE}), "spec.jobTemplate.spec.teacher"),
    ("template-task-unknown", with_spec(**{"jobTemplate.spec.task": "translation"}), "spec.jobTemplate.spec.task"),
    (
        "template-alpha-2",
        with_spec(**{"jobTemplate.spec.distillation": {"alpha": 2}}),
        "spec.jobTemplate.spec.distillation.alpha",
    ),
    (
        "template-two-students",
        with_spec(**{"jobTemplate.spec.student": {"model": "pvc://m/s", "fromTeacher": {"numLayers": 2}}}),
        "spec.jobTemplate.spec.student",
    ),
    (
        "template-batch-not-divisible",
        with_spec(**{"jobTemplate.spec.distillation": {"batchSize": 33, "gradientAccumulationSteps": 2}}),
        "spec.jobTemplate.spec",
    ),
    (
        "template-classification-no-label",
        with_spec(**{"jobTemplate.spec.task": "sequence-classification", "jobTemplate.spec.data": {"labelField": ""}}),
        "spec.jobTemplate.spec",
    ),
    ("name-of-53", _long_name(), "metadata.name"),
]
