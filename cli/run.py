"""`kdistill run job.yaml [--output DIR]`: the whole job on this machine.

One process per rank: a world of one runs in this process; a larger one starts torchrun with
``python -m kdistill.trainer`` per rank. On a terminal a progress bar shows stage, step, loss, T
and tokens/s; otherwise every step is a JSON line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer


def _progress_bar() -> tuple[Any, Any, Any]:
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def on_step(r: Any) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=r.total_steps, initial=r.step - 1, unit="step", dynamic_ncols=True)
        b = bar["bar"]
        b.set_description(r.stage)
        b.set_postfix(loss=f"{r.loss:.4f}", T=f"{r.temperature:.2f}", tok_s=f"{r.tokens_per_second:.0f}", refresh=False)
        b.update(r.step - b.n)

    def on_event(name: str, fields: dict[str, Any]) -> None:
        from tqdm import tqdm as _t

        _t.write(f"{name}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return on_step, on_event, close


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        job_file: Path = typer.Argument(..., help="DistillationJob YAML."),
        output: Path | None = typer.Option(None, "--output", help="Output folder; default ./kdistill-out/NAME."),
    ) -> None:
        """Run a DistillationJob locally: train, quantize, evaluate, write the outputs."""
        import logging

        from kdistill.api import JobValidationError, load_job

        try:
            job = load_job(job_file)
        except JobValidationError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(20) from None
        world = job.spec.parallelism.world_size
        out = output or Path("kdistill-out") / job.metadata.name
        if world > 1:
            # One process per rank under torchrun, restarted up to failurePolicy.maxRestarts times.
            from kdistill.trainer.parallel.launch import run_local

            raise typer.Exit(run_local(job, job_file, out))
        from kdistill.trainer.jsonlog import json_event_printer, json_step_printer
        from kdistill.trainer.runner import main_entry

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if sys.stdout.isatty():
            on_step, on_event, close = _progress_bar()
        else:
            on_step, on_event, close = json_step_printer(), json_event_printer(), lambda: None
        try:
            code = main_entry(job_file, out, on_step=on_step, on_event=on_event)
        finally:
            close()
        if code == 0 and sys.stdout.isatty():
            _print_summary(out / "result.json")
        raise typer.Exit(code)


def _print_summary(result_path: Path) -> None:
    import json

    result = json.loads(result_path.read_text())
    m = result.get("metrics") or {}
    typer.echo(f"wrote {result_path.parent}: {result['steps']} steps, {result['tokensPerSecond']} tokens/s")
    if m:
        typer.echo(
            f"{m['metric']}: teacher {m['teacher']:.4g}, student {m['student']:.4g}, retention {m['retention']:.3f}"
        )
