"""`kdistill train --config JOB.yaml`: the trainer entry point the worker pods run."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        config: Path = typer.Option(..., "--config", help="DistillationJob YAML (the operator's ConfigMap)."),
        output: Path | None = typer.Option(None, "--output", help="Output folder; default ./kdistill-out/NAME."),
    ) -> None:
        """Run the trainer for one job (one rank; torchrun starts one per process)."""
        import logging
        import sys

        from kdistill.trainer.jsonlog import json_event_printer, json_step_printer
        from kdistill.trainer.runner import main_entry

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
        code = main_entry(config, output, on_step=json_step_printer(), on_event=json_event_printer())
        raise typer.Exit(code)
