"""The objects a DistillationSchedule creates, as pure functions of the schedule (no I/O).

A run's job is the template with:
- `data.runData`: the partitions, window, replay and seed of the schedule, the run's name, and
  the champion's output folder; the trainer writes the run's data to `data.train` and
  `data.eval` (plain paths under the job's output on its checkpoint volume) and scores the
  champion there (trainer/run_data.py, trainer/run_scores.py);
- `serving.enabled: false`: a run never rolls itself out; the schedule promotes it, or not;
- with `warmStart: lastPromoted` and a champion, `student.model` at the champion's
  full-precision student;
- the label `kdistill.io/schedule`, the annotation `kdistill.io/scheduled-time` and the schedule
  as its controller owner.

In a cluster every run writes to, and reads the champion from, checkpoint volumes: the
template must set `checkpoint.volume`. A run's output folder is
`<volume>/<namespace>/<job>`, the path in `pvc://<claim>/<namespace>/<job>`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kopf

from kdistill.api import DistillationJob
from kdistill.api.metadata import STUDENT_DIR
from kdistill.api.schedule import DistillationSchedule
from kdistill.api.spec import DistillationJobSpec, RunData, Student

from . import names
from .schedule_logic import job_name

Manifest = dict[str, Any]


class ScheduleBuildError(ValueError):
    """A schedule that cannot run in a cluster as written."""


def check_runnable(schedule: DistillationSchedule) -> None:
    """What a schedule needs in a cluster beyond what the API server checks."""
    spec = schedule.spec
    if spec.job_template.spec.checkpoint.volume is None:
        raise ScheduleBuildError(
            "spec.jobTemplate.spec.checkpoint.volume: a schedule's runs keep their data and students on a "
            "checkpoint volume (claimName: a shared ReadWriteMany claim, or size: one claim per run), from which "
            "the next run reads the champion and the serving Deployment reads the promoted student"
        )
    if "://" in spec.data.partitions and not spec.data.partitions.startswith("pvc://"):
        raise ScheduleBuildError("spec.data.partitions: in a cluster, a pvc://CLAIM/PATH folder")


def claim_of(schedule: DistillationSchedule, job: str) -> str:
    """The checkpoint claim a run of the schedule writes to."""
    volume = schedule.spec.job_template.spec.checkpoint.volume
    assert volume is not None  # check_runnable
    return volume.claim_name or names.checkpoint_claim(job)


def output_uri(schedule: DistillationSchedule, job: str) -> str:
    """A run's output folder as a source URI (what another run's pods mount read-only)."""
    return f"pvc://{claim_of(schedule, job)}/{schedule.namespace}/{job}"


def run_spec(schedule: DistillationSchedule, job: str, champion: str | None) -> DistillationJobSpec:
    """The spec of run `job`, with `champion` (a promoted run's job name) as the served student."""
    spec = schedule.spec
    out = names.output_dir(schedule.namespace, job)
    run = spec.job_template.job_spec(f"{out}/data/train.jsonl", f"{out}/data/eval-new.jsonl")
    run_data = RunData(
        partitions=spec.data.partitions,
        window=spec.data.window,
        replay_fraction=spec.data.replay.fraction,
        replay_partitions=spec.data.replay.partitions,
        seed=spec.data.seed,
        run=job,
        champion=output_uri(schedule, champion) if champion else None,
    )
    updates: dict[str, Any] = {
        "data": run.data.model_copy(update={"run_data": run_data}),
        "serving": run.serving.model_copy(update={"enabled": False}),
    }
    if spec.warm_start == "lastPromoted" and champion:
        updates["student"] = Student(model=f"{output_uri(schedule, champion)}/{STUDENT_DIR}")
    # Validated once more as a whole: the run's own spec must pass every job rule.
    return DistillationJobSpec.model_validate(run.model_copy(update=updates).to_wire())


def owner_reference(body: Manifest) -> Manifest:
    meta = body["metadata"]
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def run_job(schedule: DistillationSchedule, body: Manifest, run_time: datetime, champion: str | None) -> Manifest:
    """The DistillationJob of the run at `run_time`, owned by the schedule `body`."""
    name = job_name(schedule.metadata.name, run_time)
    template = schedule.spec.job_template
    meta = {
        "name": name,
        "namespace": schedule.namespace,
        "labels": {
            **template.metadata.labels,
            names.LABEL_SCHEDULE: schedule.metadata.name,
            names.LABEL_MANAGED_BY: names.MANAGER,
        },
        "annotations": {**template.metadata.annotations, names.ANNOTATION_SCHEDULED_TIME: _rfc3339(run_time)},
        "ownerReferences": [owner_reference(body)],
    }
    return {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": meta,
        "spec": run_spec(schedule, name, champion).to_wire(),
    }


def serving_job(schedule: DistillationSchedule, job: str) -> DistillationJob:
    """Run `job` as the serving builders see it: with the template's serving settings, enabled,
    under the schedule's one serving name."""
    template = schedule.spec.job_template.spec
    serving = template.serving.model_copy(
        update={"enabled": True, "name": names.schedule_serving(schedule.metadata.name, template.serving.name)}
    )
    spec = run_spec(schedule, job, None).model_copy(update={"serving": serving})
    return DistillationJob.model_validate(
        {"metadata": {"name": job, "namespace": schedule.namespace}, "spec": spec.to_wire()}
    )


def adopt_by_schedule(objs: list[Manifest], body: Manifest) -> list[Manifest]:
    """The schedule becomes the controller owner: the served student outlives its run's job."""
    kopf.adopt(objs, owner=body)  # type: ignore[arg-type]
    return objs


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
