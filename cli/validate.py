"""`kdistill validate`: check job and schedule files the way the API server will."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def validate(
        files: list[Path] = typer.Argument(..., help="DistillationJob or DistillationSchedule files."),
    ) -> None:
        """Validate DistillationJob and DistillationSchedule files; print every error with its field path."""
        from kdistill.api import DistillationJob, JobValidationError, load_resource

        failed = 0
        for path in files:
            try:
                obj = load_resource(path)
            except JobValidationError as exc:
                failed += 1
                typer.echo(f"{path}: invalid, {len(exc.errors)} error(s)", err=True)
                for err in exc.errors:
                    typer.echo(f"  {err.path}: {err.message}", err=True)
                continue
            if isinstance(obj, DistillationJob):
                spec = obj.spec
                typer.echo(
                    f"{path}: ok ({obj.metadata.name}: {spec.task}, {len(spec.distillation.stages)} stage(s), "
                    f"{spec.total_steps} steps, world size {spec.parallelism.world_size})"
                )
            else:
                s = obj.spec
                typer.echo(
                    f"{path}: ok ({obj.metadata.name}: schedule {s.schedule!r} in {s.time_zone}, window "
                    f"{s.data.window}, replay {s.data.replay.fraction:g} of up to {s.data.replay.partitions} "
                    f"partition(s), {s.job_template.spec.task} jobs of {s.job_template.spec.total_steps} steps)"
                )
        if failed:
            raise typer.Exit(1)
