"""`kdistill validate`: check job files the way the API server will."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def validate(files: list[Path] = typer.Argument(..., help="Job YAML files.")) -> None:
        """Validate DistillationJob files; print every error with its field path."""
        from kdistill.api import JobValidationError, load_job

        failed = 0
        for path in files:
            try:
                job = load_job(path)
            except JobValidationError as exc:
                failed += 1
                typer.echo(f"{path}: invalid, {len(exc.errors)} error(s)", err=True)
                for err in exc.errors:
                    typer.echo(f"  {err.path}: {err.message}", err=True)
                continue
            spec = job.spec
            typer.echo(
                f"{path}: ok ({job.metadata.name}: {spec.task}, {len(spec.distillation.stages)} stage(s), "
                f"{spec.total_steps} steps, world size {spec.parallelism.world_size})"
            )
        if failed:
            raise typer.Exit(1)
