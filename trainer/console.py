"""What a person sees of a run: one progress bar per stage on a terminal, JSON lines elsewhere.

The trainer reports progress as records (``jsonlog.step_record`` and the run's events); pods, CI
and pipes read them as JSON lines. ``ProgressView`` renders the same records with ``rich``: a
bar per stage with its step, loss, tokens/s and ETA, and one line per event (checkpoint,
evaluation, resume, QAT) above the bars. It keeps no progress state of its own beyond what the
records carry, so a run renders the same whether the records come from this process or from
the JSON lines of other processes (``render_lines``: torchrun's ranks, ``teacher_pretrain``).

``choose_format`` picks between the two: ``auto`` draws bars only when both stdout and stderr
are terminals.

``python -m kdistill.trainer.console`` renders JSON lines read from stdin.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

LogFormat = Literal["rich", "json"]
LOG_FORMATS = ("auto", "rich", "json")
# Events whose fields are shown with a fixed wording; others are listed as name: key=value.
_QUIET_FIELDS = {"event"}


# Import-time notices of third-party libraries that say nothing about the run (torch's pytree
# deprecation notice when torchao registers its enums); shown as lines above the bars they would
# only push the bars down.
IMPORT_NOTICE_LOGGERS = ("torch.utils._pytree",)


def quiet_import_notices() -> None:
    import logging

    for name in IMPORT_NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def choose_format(requested: str, *, stdout_tty: bool, stderr_tty: bool) -> LogFormat:
    """``rich`` or ``json`` for ``--log-format requested`` (auto: bars only on a terminal)."""
    if requested not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {requested!r}")
    if requested == "auto":
        return "rich" if stdout_tty and stderr_tty else "json"
    return "json" if requested == "json" else "rich"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def describe_event(record: dict[str, Any]) -> str:
    """One readable line for an event record."""
    name = str(record.get("event"))
    fields = {k: v for k, v in record.items() if k not in _QUIET_FIELDS}
    if name == "checkpoint":
        return f"checkpoint at step {fields.get('step')}: {fields.get('path')} ({_number(fields.get('seconds'))} s)"
    if name == "resumed":
        return f"resumed from step {fields.get('step')} ({fields.get('checkpoint')})"
    if name == "evaluated" and {"metric", "teacher", "student", "retention"} <= fields.keys():
        return (
            f"evaluated {fields['metric']}: teacher {_number(fields['teacher'])}, "
            f"student {_number(fields['student'])}, retention {fields['retention']:.3f}"
        )
    shown = {k: v for k, v in fields.items() if not isinstance(v, list | dict)}
    return f"{name}: " + ", ".join(f"{k}={_number(v)}" for k, v in shown.items())


class ProgressView:
    """Renders progress records on a rich console: a bar per stage, events as lines."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description:<16}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:>8}"),
            TextColumn("{task.fields[tps]:>7} tok/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._tasks: dict[str, TaskID] = {}
        self._starts: dict[str, int] = {}  # a stage's first global step

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _stage(self, name: str, start: int, steps: int) -> TaskID:
        if name not in self._tasks:
            self._starts[name] = start
            self._tasks[name] = self.progress.add_task(name, total=steps, loss="-", tps="-")
        return self._tasks[name]

    def _plan(self, record: dict[str, Any]) -> None:
        """The run's stages, announced before its first step: every bar is shown from the start."""
        done = int(record.get("startStep", 0))
        for stage in record.get("stages", []):
            start, steps = int(stage["start"]), int(stage["steps"])
            task = self._stage(str(stage["name"]), start, steps)
            self.progress.update(task, completed=min(max(done - start, 0), steps))

    def _step(self, record: dict[str, Any]) -> None:
        name = str(record.get("stage", "train"))
        # Without a plan the stage's steps are the run's (a single-stage stream).
        task = self._stage(name, 0, int(record.get("totalSteps", record["step"])))
        fields: dict[str, Any] = {"completed": int(record["step"]) - self._starts[name]}
        if "loss" in record:
            fields["loss"] = f"{float(record['loss']):.4f}"
        if "tokensPerSecond" in record:
            fields["tps"] = f"{float(record['tokensPerSecond']):.0f}"
        self.progress.update(task, **fields)

    def handle(self, record: dict[str, Any]) -> None:
        """Show one progress record (a step, the plan, or any other event)."""
        kind = record.get("event")
        if kind == "plan":
            self._plan(record)
        elif kind == "step" and "step" in record:
            self._step(record)
        else:
            self.console.print(escape(describe_event(record)), highlight=False)

    def handle_line(self, line: str) -> None:
        """A line of another process's output: a JSON record is rendered, anything else shown."""
        text = line.rstrip("\n")
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if isinstance(record, dict) and "event" in record:
            self.handle(record)
        elif text:
            self.console.print(escape(text), highlight=False)


def render_lines(lines: Iterable[str], log_format: LogFormat, console: Console | None = None) -> None:
    """Render a stream of JSON lines as bars (``rich``) or pass it through (``json``)."""
    if log_format == "json":
        for line in lines:
            sys.stdout.write(line)
            sys.stdout.flush()
        return
    with ProgressView(console) as view:
        for line in lines:
            view.handle_line(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdistill.trainer.console", description=__doc__)
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="auto")
    args = parser.parse_args(argv)
    fmt = choose_format(args.log_format, stdout_tty=sys.stdout.isatty(), stderr_tty=sys.stderr.isatty())
    render_lines(sys.stdin, fmt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
