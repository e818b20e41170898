"""`kdistill run job.yaml [--output DIR] [--log-format auto|rich|json]`: the whole job on this machine.

One process per rank: a world of one runs in this process; a larger one starts torchrun with
``python -m kdistill.trainer`` per rank. With ``teacher.serve.enabled`` a local ``kdistill serve``
runs the teacher beside them for the length of the run (served_teacher.py). On a terminal every
stage gets a progress bar (step, loss, tokens/s, ETA) and events are lines above the bars;
otherwise, or with ``--log-format json``, every step and event is a JSON line on stdout (see trainer/console.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer


def _run_rich(job: Any, job_file: Path, out: Path) -> int:
    import logging

    from rich.logging import RichHandler

    from kdistill.trainer.console import ProgressView, quiet_import_notices

    quiet_import_notices()
    world = job.spec.parallelism.world_size
    with ProgressView() as view:
        if world > 1:
            from kdistill.trainer.parallel.launch import run_local

            return run_local(job, job_file, out, on_line=view.handle_line)
        from kdistill.trainer.jsonlog import step_record
        from kdistill.trainer.runner import main_entry

        handler = RichHandler(console=view.console, show_time=False, show_path=False)
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", handlers=[handler])
        return main_entry(
            job_file,
            out,
            on_step=lambda r: view.handle(step_record(r)),
            on_event=lambda name, fields: view.handle({"event": name, **fields}),
        )


def _run_json(job: Any, job_file: Path, out: Path) -> int:
    import logging

    if job.spec.parallelism.world_size > 1:
        from kdistill.trainer.parallel.launch import run_local

        return run_local(job, job_file, out)
    from kdistill.trainer.jsonlog import json_event_printer, json_step_printer
    from kdistill.trainer.runner import main_entry

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return main_entry(job_file, out, on_step=json_step_printer(), on_event=json_event_printer())


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        job_file: Path = typer.Argument(..., help="DistillationJob YAML."),
        output: Path | None = typer.Option(None, "--output", help="Output folder; default ./kdistill-out/NAME."),
        log_format: str = typer.Option(
            "auto",
            "--log-format",
            help="auto: progress bars on a terminal, JSON lines otherwise; rich: bars; json: JSON lines.",
        ),
    ) -> None:
        """Run a DistillationJob locally: train, quantize, evaluate, write the outputs."""
        from kdistill.api import JobValidationError, load_job
        from kdistill.trainer.console import LOG_FORMATS, choose_format

        if log_format not in LOG_FORMATS:
            typer.echo(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}", err=True)
            raise typer.Exit(2)
        try:
            job = load_job(job_file)
        except JobValidationError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(20) from None
        out = output or Path("kdistill-out") / job.metadata.name
        fmt = choose_format(log_format, stdout_tty=sys.stdout.isatty(), stderr_tty=sys.stderr.isatty())
        code = _run_with_teacher(job, job_file, out, fmt)
        if code == 0 and fmt == "rich":
            _print_summary(out / "result.json")
        raise typer.Exit(code)


def _run_with_teacher(job: Any, job_file: Path, out: Path, fmt: str) -> int:
    """The run, beside a local teacher server when ``teacher.serve.enabled`` (served_teacher.py)."""
    from kdistill.api.failures import ExitCode

    from .served_teacher import TeacherServerFailed, local_teacher_server

    try:
        with local_teacher_server(job, job_file, out) as url:
            if url is not None:
                typer.echo(f"teacher served at {url} (log: {out / 'teacher-server.log'})", err=True)
            return _run_rich(job, job_file, out) if fmt == "rich" else _run_json(job, job_file, out)
    except TeacherServerFailed as exc:
        typer.echo(f"kdistill: {ExitCode.TEACHER_UNAVAILABLE.name}: {exc}", err=True)
        return int(ExitCode.TEACHER_UNAVAILABLE)


def _print_summary(result_path: Path) -> None:
    import json

    result = json.loads(result_path.read_text())
    m = result.get("metrics") or {}
    typer.echo(f"wrote {result_path.parent}: {result['steps']} steps, {result['tokensPerSecond']} tokens/s")
    if m:
        typer.echo(
            f"{m['metric']}: teacher {m['teacher']:.4g}, student {m['student']:.4g}, retention {m['retention']:.3f}"
        )
