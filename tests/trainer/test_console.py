"""What `kdistill run` shows: the choice between progress bars and JSON lines, the bars' content
rendered from the trainer's records (a rich Console forced to be a terminal, writing to a
string), and the CLI's output of a real tiny run in both formats."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from kdistill.cli.main import app
from kdistill.trainer.console import ProgressView, choose_format, describe_event, render_lines

from . import helpers


@pytest.mark.parametrize(
    ("requested", "stdout_tty", "stderr_tty", "expected"),
    [
        ("auto", True, True, "rich"),
        ("auto", False, True, "json"),  # piped into grep or a file
        ("auto", True, False, "json"),  # stderr captured: a log collector, not a person
        ("auto", False, False, "json"),
        ("json", True, True, "json"),
        ("rich", False, False, "rich"),
    ],
)
def test_choose_format(requested: str, stdout_tty: bool, stderr_tty: bool, expected: str) -> None:
    assert choose_format(requested, stdout_tty=stdout_tty, stderr_tty=stderr_tty) == expected


def test_choose_format_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="auto, rich, json"):
        choose_format("plain", stdout_tty=True, stderr_tty=True)


def _terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=140, color_system=None), buffer


def _step(stage: str, step: int, loss: float, tps: float, total: int = 6) -> dict:
    return {"event": "step", "stage": stage, "step": step, "totalSteps": total, "loss": loss, "tokensPerSecond": tps}


def test_view_draws_one_bar_per_stage_with_step_loss_speed_and_eta() -> None:
    console, buffer = _terminal()
    plan = {
        "event": "plan",
        "totalSteps": 6,
        "startStep": 0,
        "stages": [
            {"name": "features", "kind": "distill", "start": 0, "steps": 2},
            {"name": "output", "kind": "distill", "start": 2, "steps": 4},
        ],
    }
    with ProgressView(console) as view:
        view.handle(plan)
        view.handle(_step("features", 1, 2.5, 1000.0))
        view.handle(_step("features", 2, 2.25, 1100.0))
        view.handle({"event": "checkpoint", "step": 2, "path": "/out/checkpoints/step-000000002", "seconds": 0.125})
        view.handle(_step("output", 3, 1.875, 1234.4))
    text = buffer.getvalue()
    final = text[text.rindex("features") :]  # the last frame drawn
    assert re.search(r"features\s.*2/2\s+loss\s+2\.2500\s+1100 tok/s\s+ETA", final), final
    assert re.search(r"output\s.*1/4\s+loss\s+1\.8750\s+1234 tok/s\s+ETA", final), final
    assert "checkpoint at step 2: /out/checkpoints/step-000000002 (0.125 s)" in text


def test_view_on_a_resumed_run_starts_bars_where_the_checkpoint_left_off() -> None:
    console, buffer = _terminal()
    stages = [
        {"name": "a", "kind": "distill", "start": 0, "steps": 3},
        {"name": "b", "kind": "distill", "start": 3, "steps": 3},
    ]
    with ProgressView(console) as view:
        view.handle({"event": "plan", "totalSteps": 6, "startStep": 4, "stages": stages})
        view.handle({"event": "resumed", "step": 4, "checkpoint": "/c/step-000000004"})
    text = buffer.getvalue()
    assert "resumed from step 4 (/c/step-000000004)" in text
    assert re.search(r"a\s.*3/3", text) and re.search(r"b\s.*1/3", text), text


def test_view_renders_other_processes_lines_and_stages_without_a_plan() -> None:
    console, buffer = _terminal()
    with ProgressView(console) as view:
        view.handle_line(json.dumps(_step("teacher-pretrain", 50, 5.0, 900.0, total=300)) + "\n")
        view.handle_line("WARNING kdistill.trainer.data: 2 bad lines skipped\n")
        view.handle_line('{"event": "teacher-ready", "eval_perplexity": 42.123456, "steps": 300}\n')
    text = buffer.getvalue()
    assert re.search(r"teacher-pretrain\s.*50/300\s+loss\s+5\.0000\s+900 tok/s", text), text
    assert "WARNING kdistill.trainer.data: 2 bad lines skipped" in text
    assert "teacher-ready: eval_perplexity=42.12, steps=300" in text


def test_describe_evaluated() -> None:
    line = describe_event(
        {"event": "evaluated", "metric": "perplexity", "teacher": 101.234, "student": 120.5, "retention": 0.84012}
    )
    assert line == "evaluated perplexity: teacher 101.2, student 120.5, retention 0.840"


def test_json_format_passes_lines_through(capsys: pytest.CaptureFixture[str]) -> None:
    lines = [json.dumps(_step("s", 1, 1.0, 1.0)) + "\n", "plain\n"]
    render_lines(lines, "json")
    assert capsys.readouterr().out == "".join(lines)


def _tiny_job(tmp_path: Path, teacher: Path, data: tuple[Path, Path]) -> Path:
    train, ev = data
    job = helpers.job_dict(
        "console",
        "causal-lm",
        str(teacher),
        str(train),
        str(ev),
        stages=[
            {"name": "features", "steps": 2, "objectives": ["hidden"]},
            {"name": "output", "steps": 3, "objectives": ["logits"]},
        ],
        every_steps=5,
    )
    return helpers.write_job(tmp_path / "job.yaml", job)


def test_kdistill_run_json_and_rich_output(
    tmp_path: Path, gpt2_teacher: Path, causal_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDISTILL_TERMINATION_LOG", str(tmp_path / "termination"))
    job_file = _tiny_job(tmp_path, gpt2_teacher, causal_data)
    runner = CliRunner()
    as_json = runner.invoke(app, ["run", str(job_file), "--output", str(tmp_path / "a"), "--log-format", "json"])
    assert as_json.exit_code == 0, as_json.output
    records = [json.loads(line) for line in as_json.stdout.splitlines() if line.startswith("{")]
    assert [r["stage"] for r in records if r["event"] == "step"] == ["features"] * 2 + ["output"] * 3
    assert records[0]["event"] == "plan" and [s["steps"] for s in records[0]["stages"]] == [2, 3]

    as_rich = runner.invoke(app, ["run", str(job_file), "--output", str(tmp_path / "b"), "--log-format", "rich"])
    assert as_rich.exit_code == 0, as_rich.output
    out = as_rich.stdout
    assert not any(line.startswith('{"event"') for line in out.splitlines()), out
    assert re.search(r"features\s.*2/2\s+loss\s+\d+\.\d{4}", out), out
    assert re.search(r"output\s.*3/3\s+loss\s+\d+\.\d{4}\s+\d+ tok/s", out), out
    assert "checkpoint at step 5" in out and "evaluated perplexity: teacher" in out
    assert "wrote " in out and "retention" in out
    # Auto under a test runner (no terminal): JSON lines.
    auto = runner.invoke(app, ["run", str(job_file), "--output", str(tmp_path / "c")])
    assert auto.exit_code == 0 and auto.stdout.lstrip().startswith('{"event": "plan"'), auto.output
    bad = runner.invoke(app, ["run", str(job_file), "--log-format", "plain"])
    assert bad.exit_code == 2 and "auto, rich, json" in bad.output
