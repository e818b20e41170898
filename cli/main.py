"""The `kdistill` command. Each subcommand imports its part lazily, so that `validate` and
`crds` run without torch or the Kubernetes client installed."""

from __future__ import annotations

from pathlib import Path

import typer

from .operator import register as register_operator
from .run import register as register_run
from .schedule import register as register_schedule
from .serve import register as register_serve
from .train import register as register_train
from .validate import register as register_validate

app = typer.Typer(
    name="kdistill",
    help="Knowledge distillation as a Kubernetes resource.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

register_validate(app)
register_train(app)
register_run(app)
register_serve(app)
register_operator(app)
register_schedule(app)


@app.command()
def crds(
    out: Path = typer.Option(Path("crds"), help="Folder to write the CRDs into."),
    check: bool = typer.Option(False, help="Exit 1 if a file on disk differs instead of writing."),
) -> None:
    """Generate the CRDs in crds/ (DistillationJob, DistillationSchedule) from the API models."""
    from .generated import crd_texts, write_or_check

    for name, text in crd_texts().items():
        write_or_check(out / name, text, check)


@app.command("api-docs")
def api_docs(
    out: Path = typer.Option(Path("docs/api.md"), help="Markdown file to write."),
    check: bool = typer.Option(False, help="Exit 1 if the file on disk differs instead of writing."),
) -> None:
    """Generate docs/api.md, the field reference, from the API models."""
    from .generated import api_docs_text, write_or_check

    write_or_check(out, api_docs_text(), check)


@app.command()
def rbac(
    out: Path = typer.Option(Path("charts/kdistill/files/rbac"), help="Folder to write the rule files into."),
    check: bool = typer.Option(False, help="Exit 1 if a file on disk differs instead of writing."),
) -> None:
    """Generate the chart's files/rbac/*.yaml from operator/rbac.py."""
    from .generated import rbac_texts, write_or_check

    for name, text in rbac_texts().items():
        write_or_check(out / name, text, check)


@app.command("chart-version")
def chart_version(
    chart: Path = typer.Option(Path("charts/kdistill/Chart.yaml"), help="The chart's Chart.yaml."),
    check: bool = typer.Option(False, help="Exit 1 if the file on disk differs instead of writing."),
) -> None:
    """Set the chart's version and appVersion to kdistill's version (kdistill/__init__.py)."""
    from .generated import chart_text, write_or_check

    write_or_check(chart, chart_text(chart.read_text()), check)


@app.command()
def version() -> None:
    """Print kdistill's version."""
    from kdistill import __version__

    typer.echo(__version__)


def main() -> None:
    app(prog_name="kdistill")


if __name__ == "__main__":
    main()
