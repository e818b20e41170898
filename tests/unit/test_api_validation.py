"""The pydantic side of the spec table, and the semantics of defaults."""

from __future__ import annotations

import copy

import pytest

from kdistill.api import JobValidationError, parse_job
from tests.spec_table import BAD_SPECS, GOOD_SPECS, SPLIT_STUDENT_BAD, SPLIT_STUDENT_NEEDLES, base_job


@pytest.mark.parametrize(("name", "job"), GOOD_SPECS, ids=[g[0] for g in GOOD_SPECS])
def test_good_specs_are_accepted(name: str, job: dict) -> None:
    parse_job(job)


@pytest.mark.parametrize(("name", "job", "path"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_specs_are_rejected_at_their_field(name: str, job: dict, path: str) -> None:
    with pytest.raises(JobValidationError) as info:
        parse_job(job)
    paths = [e.path for e in info.value.errors]
    assert path in paths, f"{name}: expected an error at {path}, got {info.value}"
    for err in info.value.errors:
        assert len(err.message) > 10, f"message too vague: {err}"


def test_table_is_large_and_distinct() -> None:
    assert len(BAD_SPECS) >= 20
    assert len({b[0] for b in BAD_SPECS}) == len(BAD_SPECS)


def test_defaults_follow_design() -> None:
    spec = parse_job(base_job()).spec
    d = spec.distillation
    assert (d.loss, d.alpha, d.batch_size, d.learning_rate, d.warmup_steps) == ("forward-kl", 0.7, 32, 5e-4, 100)
    assert (d.temperature.schedule, d.temperature.start, d.temperature.end) == ("linear", 5.0, 1.0)
    assert [(s.name, s.steps, s.objectives) for s in d.stages] == [("output", 1000, ["logits"])]
    assert (spec.quantization.mode, spec.quantization.qat_steps) == ("qat-int8", 200)
    p = spec.parallelism
    assert (p.nodes, p.gpus_per_node, p.teacher_pipeline_stages) == (1, 1, 1)
    assert (p.student.data, p.student.tensor, p.student.pipeline) == (1, 1, 1)
    assert (spec.checkpoint.every_steps, spec.checkpoint.keep) == (200, 3)
    assert (spec.failure_policy.max_restarts, spec.failure_policy.backoff_seconds) == (3, 30)
    s = spec.serving
    assert (s.enabled, s.replicas, s.quality_gate.min_retention) == (True, 1, 0.9)
    assert (s.batching.max_batch_size, s.batching.max_batch_tokens, s.batching.max_wait_ms) == (64, 8192, 10)
    assert spec.teacher.trust_remote_code is False
    assert spec.total_steps == 1000 + 200


def test_gpus_per_node_zero_means_one_cpu_process_per_pod() -> None:
    job = base_job()
    job["spec"]["parallelism"] = {"nodes": 3, "gpusPerNode": 0, "student": {"data": 3}}
    job["spec"]["distillation"] = {"batchSize": 33}
    p = parse_job(job).spec.parallelism
    assert (p.procs_per_node, p.world_size) == (1, 3)


def test_every_error_is_reported_not_just_the_first() -> None:
    job = base_job()
    job["spec"]["distillation"] = {"alpha": 2, "loss": "mse"}
    job["spec"]["teacher"]["dtype"] = "int4"
    with pytest.raises(JobValidationError) as info:
        parse_job(job)
    assert {e.path for e in info.value.errors} >= {
        "spec.distillation.alpha",
        "spec.distillation.loss",
        "spec.teacher.dtype",
    }


def test_wire_form_round_trips() -> None:
    job = parse_job(base_job())
    again = parse_job(job.to_wire())
    assert again == job


@pytest.mark.parametrize(("name", "job", "path"), SPLIT_STUDENT_BAD, ids=[b[0] for b in SPLIT_STUDENT_BAD])
def test_split_student_rows_fail_for_their_own_reason(name: str, job: dict, path: str) -> None:
    # Each row breaks exactly one split-student rule; its message names that feature, and the
    # same job with the student unsplit is valid (so the rule, not something else, rejected it).
    with pytest.raises(JobValidationError) as info:
        parse_job(job)
    assert SPLIT_STUDENT_NEEDLES[name] in str(info.value) and "split student" in str(info.value), info.value
    unsplit = copy.deepcopy(job)
    unsplit["spec"]["parallelism"]["student"] = {"data": 2, "tensor": 1, "pipeline": 1}
    parse_job(unsplit)


def test_every_split_student_rule_is_broken_by_a_row_of_the_table() -> None:
    """The rules (one table for pydantic, the CRD's CEL and the trainer) and tests/spec_table.py stay in step."""
    from kdistill.api.spec import SPLIT_STUDENT_RULES

    messages = []
    for _, job, _ in SPLIT_STUDENT_BAD:
        with pytest.raises(JobValidationError) as info:
            parse_job(job)
        messages.append(str(info.value))
    for rule in SPLIT_STUDENT_RULES:
        assert any(rule.why in m for m in messages), rule.why
