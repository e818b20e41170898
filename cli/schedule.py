"""`kdistill schedule run schedule.yaml --runs N`: a DistillationSchedule's rounds on this machine."""

from __future__ import annotations

from pathlib import Path

import typer

schedule_app = typer.Typer(help="DistillationSchedules: continuous distillation over fresh data.", no_args_is_help=True)


@schedule_app.command("run")
def run(
    schedule_file: Path = typer.Argument(..., help="DistillationSchedule YAML."),
    runs: int = typer.Option(1, "--runs", min=1, help="Consecutive rounds, over the newest partitions."),
    output: Path | None = typer.Option(None, "--output", help="Output folder; default ./kdistill-out/NAME."),
) -> None:
    """Run N rounds of a schedule locally: data with replay, the job, the gate; print the history."""
    from kdistill.api import JobValidationError, load_schedule
    from kdistill.trainer.sources import resolve_source

    from .schedule_local import ScheduleRunError, history_table, run_rounds

    try:
        schedule = load_schedule(schedule_file)
    except JobValidationError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(20) from None
    base_dir = schedule_file.resolve().parent
    folder = resolve_source(schedule.spec.data.partitions, base_dir)
    out = output or Path("kdistill-out") / schedule.metadata.name
    try:
        status = run_rounds(schedule, folder, runs, out, lambda line: typer.echo(line, err=True), base_dir)
    except ScheduleRunError as exc:
        typer.echo(f"kdistill schedule run: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(history_table(status))
    typer.echo(f"status: {out / 'status.json'}")


def register(app: typer.Typer) -> None:
    app.add_typer(schedule_app, name="schedule")
