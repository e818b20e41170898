"""One table of good and bad jobs, checked by pydantic (tests/unit) and by the API server's
schema and CEL rules (tests/integration), so that the two stay in agreement.

Each bad row names the field path the error must point at.
"""

from __future__ import annotations

import copy
from typing import Any


def base_job(name: str = "table-job") -> dict[str, Any]:
    return {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": "pvc://models/teacher"},
            "student": {"fromTeacher": {"numLayers": 2}},
            "data": {"train": "pvc://data/train.jsonl", "eval": "pvc://data/eval.jsonl"},
        },
    }


def with_spec(**changes: Any) -> dict[str, Any]:
    """base_job() with dotted spec paths set, e.g. with_spec(**{"parallelism.nodes": 2})."""
    job = base_job()
    for dotted, value in changes.items():
        node = job["spec"]
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is _DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = copy.deepcopy(value)
    return job


_DELETE = object()

GOOD_SPECS: list[tuple[str, dict[str, Any]]] = [
    ("minimal", base_job()),
    ("explicit-student", with_spec(student={"model": "hf://org/student@main"})),
    ("no-serving-no-eval", with_spec(**{"serving.enabled": False, "data.eval": _DELETE})),
    (
        "scheduled-run",
        with_spec(
            **{
                "data.train": "/mnt/checkpoints/default/nightly-29000000/data/train.jsonl",
                "data.eval": "/mnt/checkpoints/default/nightly-29000000/data/eval-new.jsonl",
                "data.runData": {
                    "partitions": "pvc://data/drift/",
                    "run": "nightly-29000000",
                    "replayFraction": 0.2,
                    "champion": "pvc://ckpt/default/nightly-28999000",
                },
            }
        ),
    ),
    (
        "classification-stratified",
        with_spec(
            task="sequence-classification",
            **{"data.sampling": {"strategy": "stratified", "head": 0.5, "torso": 0.3, "tail": 0.2}},
        ),
    ),
    (
        "mesh-2x2-on-2-nodes",
        with_spec(
            parallelism={
                "nodes": 2,
                "gpusPerNode": 2,
                "teacherPipelineStages": 2,
                "student": {"data": 2, "tensor": 2, "pipeline": 1},
            },
        ),
    ),
    (
        "data-parallel-top-k",
        with_spec(
            parallelism={
                "nodes": 2,
                "gpusPerNode": 0,
                "student": {"data": 2},
                "gradientCompression": {"topK": 0.01, "warmupSteps": 5, "rampSteps": 40, "rampFrom": 1.0},
            }
        ),
    ),
    (
        "data-parallel-top-k-by-magnitude",
        with_spec(
            parallelism={
                "nodes": 2,
                "gpusPerNode": 0,
                "student": {"data": 2},
                "gradientCompression": {"topK": 0.01, "selection": "magnitude"},
            }
        ),
    ),
    (
        "data-parallel-top-k-of-gradients-moving-variance",
        with_spec(
            parallelism={
                "nodes": 2,
                "gpusPerNode": 0,
                "student": {"data": 2},
                "gradientCompression": {"topK": 0.01, "compress": "gradient", "freezeVariance": False},
            }
        ),
    ),
    (
        "split-student-classification-tensor",
        with_spec(
            task="sequence-classification",
            parallelism={"nodes": 1, "gpusPerNode": 2, "student": {"data": 1, "tensor": 2}},
            quantization={"mode": "ptq-int8"},
            **{"data.labelField": "label"},
        ),
    ),
    (
        "split-student-hidden",
        with_spec(
            parallelism={"nodes": 1, "gpusPerNode": 2, "student": {"data": 1, "tensor": 2}},
            quantization={"mode": "ptq-int8"},
            **{"distillation.stages": [{"name": "features", "steps": 5, "objectives": ["hidden", "logits"]}]},
        ),
    ),
    (
        "split-student-attention-pipeline",
        with_spec(
            parallelism={"nodes": 1, "gpusPerNode": 2, "student": {"data": 1, "pipeline": 2}},
            quantization={"mode": "none"},
            **{"distillation.stages": [{"name": "a", "steps": 5, "objectives": ["attention"]}]},
        ),
    ),
    (
        "split-student-top-k-pipeline-x-data",
        with_spec(
            parallelism={
                "nodes": 2,
                "gpusPerNode": 2,
                "student": {"data": 2, "pipeline": 2},
                "gradientCompression": {"topK": 0.01},
            },
            quantization={"mode": "ptq-int8"},
        ),
    ),
    (
        "split-student-top-k-on-the-data-axis",
        with_spec(
            parallelism={
                "nodes": 2,
                "gpusPerNode": 2,
                "student": {"data": 2, "tensor": 2},
                "gradientCompression": {"topK": 0.01},
            },
            quantization={"mode": "ptq-int8"},
        ),
    ),
    (
        "pipeline-split-logits-only",
        with_spec(
            parallelism={"nodes": 1, "gpusPerNode": 2, "student": {"data": 1, "pipeline": 2}},
            quantization={"mode": "none"},
        ),
    ),
    ("cpu-two-pods", with_spec(parallelism={"nodes": 2, "gpusPerNode": 0, "student": {"data": 2}})),
    (
        "three-stages",
        with_spec(
            **{
                "distillation.stages": [
                    {"name": "features", "steps": 5, "objectives": ["hidden"]},
                    {"name": "intermediate", "steps": 5, "objectives": ["hidden", "attention"]},
                    {"name": "output", "steps": 5, "objectives": ["logits"]},
                ]
            }
        ),
    ),
    ("created-volume", with_spec(**{"checkpoint.volume": {"storageClassName": "nfs", "size": "10Gi"}})),
    ("ptq", with_spec(quantization={"mode": "ptq-int8", "qatSteps": 0})),
    (
        "teacher-endpoint-no-model",
        with_spec(teacher={"endpoint": "http://other-teacher:8080"}, student={"model": "pvc://models/student"}),
    ),
    (
        "served-teacher-generate-then-on-policy",
        with_spec(
            **{"teacher.serve": {"enabled": True, "gpusPerReplica": 0}},
            distillation={
                "stages": [
                    {"name": "generate", "steps": 5, "objectives": ["sequence"]},
                    {"name": "on-policy", "steps": 5, "objectives": ["on-policy"]},
                    {"name": "output", "steps": 5, "objectives": ["logits"]},
                ],
                "generation": {"samplesPerPrompt": 2, "maxNewTokens": 32, "temperature": 0.0},
                "onPolicy": {"lambda": 0.5, "beta": 0.0, "topK": 16},
            },
        ),
    ),
    (
        "cross-tokenizer-uld",
        with_spec(student={"model": "pvc://models/other"}, **{"distillation.crossTokenizer": {"method": "byte-span"}}),
    ),
    ("cascade-endpoint-only", with_spec(**{"serving.fallback": {"endpoint": "http://intents-teacher:8080"}})),
    (
        "cascade-every-option",
        with_spec(
            task="sequence-classification",
            **{
                "data.labelField": "label",
                "serving.fallback": {
                    "endpoint": "https://teacher.example.com/base",
                    "minConfidence": 0.75,
                    "timeoutSeconds": 2.5,
                    "model": "teacher-7b",
                    "onTeacherError": "student",
                    "maxInFlight": 8,
                },
            },
        ),
    ),
    (
        "strata-within-tolerance",
        with_spec(**{"data.sampling": {"strategy": "stratified", "head": 0.7, "torso": 0.2, "tail": 0.1000004}}),
    ),
]


def _split_student(**changes: Any) -> dict[str, Any]:
    """A valid tensor-split student (logits KD, PTQ) with ``changes`` applied on top."""
    base = {
        "parallelism": {"nodes": 1, "gpusPerNode": 2, "student": {"data": 1, "tensor": 2}},
        "quantization": {"mode": "ptq-int8"},
    }
    return with_spec(**{**base, **changes})


# What the trainer refuses for a tensor/pipeline-split student, rejected by the API already
# (the trainer's BAD_SPEC check stays as a second line). The third item is the error's path;
# SPLIT_STUDENT_NEEDLES names what each message must mention.
SPLIT_STUDENT_BAD: list[tuple[str, dict[str, Any], str]] = [
    (
        "split-student-sequence",
        _split_student(**{"distillation.stages": [{"name": "seq", "steps": 5, "objectives": ["sequence"]}]}),
        "spec",
    ),
]
SPLIT_STUDENT_NEEDLES = {
    "split-student-sequence": "no sequence or on-policy",
}

# What a tensor/pipeline-split student runs like an unsplit one (tests/parallel/test_split_compose.py
# runs them); the API accepts them.
SPLIT_STUDENT_GOOD: list[tuple[str, dict[str, Any]]] = [
    ("split-student-qat", _split_student(quantization={"mode": "qat-int8", "qatSteps": 10})),
    ("split-student-default-qat", _split_student(quantization=_DELETE)),
    ("split-student-teacher-cache", _split_student(**{"distillation.teacherCache": {"enabled": True}})),
    ("split-student-uncertainty-weighting", _split_student(**{"data.uncertaintyWeighting": {"enabled": True}})),
    (
        "split-student-pipeline-qat-cache-weighting",
        _split_student(
            parallelism={"nodes": 2, "gpusPerNode": 2, "student": {"data": 2, "pipeline": 2}},
            quantization=_DELETE,
            **{"distillation.teacherCache": {"enabled": True}, "data.uncertaintyWeighting": {"enabled": True}},
        ),
    ),
    # A decoder sequence classifier split by pipeline (and tensor), its teacher split into stages
    # (tests/parallel/test_classifier_split.py, test_classifier_loop.py run them).
    (
        "split-student-classification-pipeline",
        _split_student(
            task="sequence-classification",
            parallelism={
                "nodes": 1,
                "gpusPerNode": 2,
                "teacherPipelineStages": 2,
                "student": {"data": 1, "pipeline": 2},
            },
            quantization={"mode": "qat-int8", "qatSteps": 10},
            **{"data.labelField": "label"},
        ),
    ),
    (
        "split-student-classification-pipeline-tensor",
        _split_student(
            task="sequence-classification",
            parallelism={
                "nodes": 2,
                "gpusPerNode": 2,
                "teacherPipelineStages": 2,
                "student": {"data": 1, "pipeline": 2, "tensor": 2},
            },
            **{"data.labelField": "label"},
        ),
    ),
]
GOOD_SPECS += SPLIT_STUDENT_GOOD
GOOD_SPECS.append(
    (
        "teacher-stages-classification",
        with_spec(
            task="sequence-classification",
            **{"data.labelField": "label"},
            parallelism={"nodes": 1, "gpusPerNode": 2, "teacherPipelineStages": 2, "student": {"data": 2}},
        ),
    )
)

BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("missing-task", with_spec(task=_DELETE), "spec.task"),
    ("unknown-task", with_spec(task="translation"), "spec.task"),
    ("missing-teacher-model", with_spec(teacher={"dtype": "float32"}), "spec.teacher"),
    ("bad-dtype", with_spec(**{"teacher.dtype": "int4"}), "spec.teacher.dtype"),
    ("student-both", with_spec(student={"model": "/m", "fromTeacher": {"numLayers": 2}}), "spec.student"),
    ("student-neither", with_spec(student={}), "spec.student"),
    ("zero-layers", with_spec(**{"student.fromTeacher.numLayers": 0}), "spec.student.fromTeacher.numLayers"),
    (
        "heads-not-dividing",
        with_spec(**{"student.fromTeacher": {"numLayers": 2, "hiddenSize": 100, "numAttentionHeads": 3}}),
        "spec.student.fromTeacher",
    ),
    ("missing-train", with_spec(**{"data.train": _DELETE}), "spec.data.train"),
    (
        "run-data-with-pvc-train",
        with_spec(**{"data.runData": {"partitions": "pvc://data/drift/", "run": "r1"}}),
        "spec.data",
    ),
    (
        "run-data-replay-fraction-1",
        with_spec(
            **{
                "data.train": "/out/train.jsonl",
                "data.eval": "/out/eval-new.jsonl",
                "data.runData": {"partitions": "pvc://data/drift/", "run": "r1", "replayFraction": 1.0},
            }
        ),
        "spec.data.runData.replayFraction",
    ),
    ("serving-needs-eval", with_spec(**{"data.eval": _DELETE}), "spec"),
    ("pvc-without-path", with_spec(**{"teacher.model": "pvc://models"}), "spec.teacher.model"),
    ("pvc-bad-claim", with_spec(**{"data.train": "pvc://Bad_Claim/x.jsonl"}), "spec.data.train"),
    ("hf-empty-repo", with_spec(**{"student": {"model": "hf://"}}), "spec.student.model"),
    ("alpha-above-1", with_spec(**{"distillation.alpha": 1.5}), "spec.distillation.alpha"),
    ("alpha-negative", with_spec(**{"distillation.alpha": -0.1}), "spec.distillation.alpha"),
    (
        "temperature-zero",
        with_spec(**{"distillation.temperature": {"start": 0}}),
        "spec.distillation.temperature.start",
    ),
    (
        "temperature-end-negative",
        with_spec(**{"distillation.temperature": {"end": -1}}),
        "spec.distillation.temperature.end",
    ),
    (
        "unknown-schedule",
        with_spec(**{"distillation.temperature": {"schedule": "step"}}),
        "spec.distillation.temperature.schedule",
    ),
    ("unknown-loss", with_spec(**{"distillation.loss": "mse"}), "spec.distillation.loss"),
    (
        "duplicate-stage",
        with_spec(
            **{
                "distillation.stages": [
                    {"name": "a", "steps": 1, "objectives": ["logits"]},
                    {"name": "a", "steps": 1, "objectives": ["hidden"]},
                ]
            }
        ),
        "spec.distillation",
    ),
    (
        "stage-zero-steps",
        with_spec(**{"distillation.stages": [{"name": "a", "steps": 0, "objectives": ["logits"]}]}),
        "spec.distillation.stages[0].steps",
    ),
    (
        "stage-no-objectives",
        with_spec(**{"distillation.stages": [{"name": "a", "steps": 1, "objectives": []}]}),
        "spec.distillation.stages[0].objectives",
    ),
    (
        "stage-unknown-objective",
        with_spec(**{"distillation.stages": [{"name": "a", "steps": 1, "objectives": ["logit"]}]}),
        "spec.distillation.stages[0].objectives[0]",
    ),
    ("no-stages", with_spec(**{"distillation.stages": []}), "spec.distillation.stages"),
    (
        "topk-one",
        with_spec(**{"parallelism.gradientCompression": {"topK": 1.0}}),
        "spec.parallelism.gradientCompression.topK",
    ),
    (
        "ramp-negative",
        with_spec(**{"parallelism.gradientCompression": {"topK": 0.01, "rampSteps": -1}}),
        "spec.parallelism.gradientCompression.rampSteps",
    ),
    (
        "ramp-from-zero",
        with_spec(**{"parallelism.gradientCompression": {"topK": 0.01, "rampFrom": 0.0}}),
        "spec.parallelism.gradientCompression.rampFrom",
    ),
    (
        "ramp-from-above-one",
        with_spec(**{"parallelism.gradientCompression": {"topK": 0.01, "rampFrom": 1.5}}),
        "spec.parallelism.gradientCompression.rampFrom",
    ),
    (
        "byte-budget-zero",
        with_spec(**{"parallelism.gradientCompression": {"topK": 0.01, "byteBudget": 0.0}}),
        "spec.parallelism.gradientCompression.byteBudget",
    ),
    (
        "byte-budget-above-one",
        with_spec(**{"parallelism.gradientCompression": {"topK": 0.01, "byteBudget": 1.5}}),
        "spec.parallelism.gradientCompression.byteBudget",
    ),
    (
        "topk-selection-unknown",
        with_spec(**{"parallelism.gradientCompression": {"topK": 0.01, "selection": "random"}}),
        "spec.parallelism.gradientCompression.selection",
    ),
    (
        "topk-momentum-moving-variance",
        with_spec(**{"parallelism.gradientCompression": {"topK": 0.01, "freezeVariance": False}}),
        "spec.parallelism.gradientCompression",
    ),
    (
        "topk-compress-unknown",
        with_spec(**{"parallelism.gradientCompression": {"topK": 0.01, "compress": "weights"}}),
        "spec.parallelism.gradientCompression.compress",
    ),
    (
        "topk-negative",
        with_spec(**{"parallelism.gradientCompression": {"topK": -0.01}}),
        "spec.parallelism.gradientCompression.topK",
    ),
    (
        "mesh-mismatch",
        with_spec(parallelism={"nodes": 2, "gpusPerNode": 1, "student": {"data": 4}}),
        "spec.parallelism",
    ),
    (
        "teacher-stages-not-dividing",
        with_spec(parallelism={"nodes": 1, "gpusPerNode": 4, "teacherPipelineStages": 3, "student": {"data": 4}}),
        "spec.parallelism",
    ),
    (
        "strata-not-summing",
        with_spec(**{"data.sampling": {"strategy": "stratified", "head": 0.7, "torso": 0.2, "tail": 0.2}}),
        "spec.data.sampling",
    ),
    ("classification-no-label", with_spec(task="sequence-classification", **{"data.labelField": ""}), "spec"),
    (
        "min-retention-zero",
        with_spec(**{"serving.qualityGate": {"minRetention": 0}}),
        "spec.serving.qualityGate.minRetention",
    ),
    (
        "min-retention-above-1",
        with_spec(**{"serving.qualityGate": {"minRetention": 1.01}}),
        "spec.serving.qualityGate.minRetention",
    ),
    ("qat-zero-steps", with_spec(quantization={"mode": "qat-int8", "qatSteps": 0}), "spec.quantization"),
    ("volume-both", with_spec(**{"checkpoint.volume": {"claimName": "a", "size": "1Gi"}}), "spec.checkpoint.volume"),
    ("volume-neither", with_spec(**{"checkpoint.volume": {"storageClassName": "nfs"}}), "spec.checkpoint.volume"),
    (
        "batch-not-divisible",
        with_spec(parallelism={"nodes": 3, "gpusPerNode": 0, "student": {"data": 3}}, **{"distillation.batchSize": 32}),
        "spec",
    ),
    ("negative-gpus", with_spec(**{"parallelism.gpusPerNode": -1}), "spec.parallelism.gpusPerNode"),
    ("unknown-field", with_spec(**{"distillation.temprature": {"start": 2}}), "spec.distillation.temprature"),
    (
        "bad-stage-name",
        with_spec(**{"distillation.stages": [{"name": "Stage One", "steps": 1, "objectives": ["logits"]}]}),
        "spec.distillation.stages[0].name",
    ),
    (
        "autoscaling-inverted",
        with_spec(**{"serving.autoscaling": {"minReplicas": 3, "maxReplicas": 2}}),
        "spec.serving.autoscaling",
    ),
    (
        "teacher-neither-model-nor-endpoint",
        with_spec(teacher={"dtype": "float32"}, student={"model": "pvc://models/student"}),
        "spec.teacher",
    ),
    ("teacher-endpoint-not-url", with_spec(**{"teacher.endpoint": "other-teacher:8080"}), "spec.teacher.endpoint"),
    (
        "teacher-serve-and-endpoint",
        with_spec(**{"teacher.endpoint": "http://t:8080", "teacher.serve": {"enabled": True}}),
        "spec.teacher",
    ),
    (
        "from-teacher-without-teacher-model",
        with_spec(teacher={"endpoint": "http://t:8080"}),
        "spec",
    ),
    (
        "served-teacher-hidden",
        with_spec(
            **{
                "teacher.serve": {"enabled": True},
                "distillation.stages": [{"name": "a", "steps": 5, "objectives": ["hidden"]}],
            }
        ),
        "spec",
    ),
    (
        "served-teacher-pipeline-stages",
        with_spec(
            **{"teacher.endpoint": "http://t:8080", "student": {"model": "pvc://models/s"}},
            parallelism={"nodes": 1, "gpusPerNode": 2, "teacherPipelineStages": 2, "student": {"data": 2}},
        ),
        "spec",
    ),
    (
        "sequence-with-logits",
        with_spec(**{"distillation.stages": [{"name": "a", "steps": 5, "objectives": ["sequence", "logits"]}]}),
        "spec.distillation.stages[0]",
    ),
    (
        "on-policy-classification",
        with_spec(
            task="sequence-classification",
            **{"distillation.stages": [{"name": "a", "steps": 5, "objectives": ["on-policy"]}]},
        ),
        "spec",
    ),
    (
        "on-policy-lambda-above-1",
        with_spec(**{"distillation.onPolicy": {"lambda": 1.5}}),
        "spec.distillation.onPolicy.lambda",
    ),
    (
        "on-policy-beta-negative",
        with_spec(**{"distillation.onPolicy": {"beta": -0.1}}),
        "spec.distillation.onPolicy.beta",
    ),
    (
        "generation-top-p-zero",
        with_spec(**{"distillation.generation": {"topP": 0}}),
        "spec.distillation.generation.topP",
    ),
    (
        "cross-tokenizer-unknown",
        with_spec(**{"distillation.crossTokenizer": {"method": "dskd"}}),
        "spec.distillation.crossTokenizer.method",
    ),
    (
        "teacher-serve-zero-replicas",
        with_spec(**{"teacher.serve": {"enabled": True, "replicas": 0}}),
        "spec.teacher.serve.replicas",
    ),
    (
        "cascade-no-endpoint",
        with_spec(**{"serving.fallback": {"minConfidence": 0.5}}),
        "spec.serving.fallback.endpoint",
    ),
    (
        "cascade-endpoint-not-url",
        with_spec(**{"serving.fallback": {"endpoint": "teacher:8080"}}),
        "spec.serving.fallback.endpoint",
    ),
    (
        "cascade-confidence-above-1",
        with_spec(**{"serving.fallback": {"endpoint": "http://t:8080", "minConfidence": 1.5}}),
        "spec.serving.fallback.minConfidence",
    ),
    (
        "cascade-timeout-zero",
        with_spec(**{"serving.fallback": {"endpoint": "http://t:8080", "timeoutSeconds": 0}}),
        "spec.serving.fallback.timeoutSeconds",
    ),
    (
        "cascade-unknown-on-error",
        with_spec(**{"serving.fallback": {"endpoint": "http://t:8080", "onTeacherError": "retry"}}),
        "spec.serving.fallback.onTeacherError",
    ),
    *SPLIT_STUDENT_BAD,
]
