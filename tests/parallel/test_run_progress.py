"""`kdistill run --log-format rich` on a 2-process job: the ranks' JSON lines come back through
torchrun and are drawn as the stage's progress bar with events above it, not printed raw."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .harness import REPO
from .jobs import make_job


def test_two_rank_run_renders_progress_bars(tmp_path: Path) -> None:
    job = make_job(tmp_path / "w", world=2, steps=4, every=2, batch_size=8)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", COLUMNS="140")
    env.pop("KDISTILL_LOG_LEVEL", None)
    run = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "kdistill.cli.main",
            "run",
            str(job),
            "--output",
            str(tmp_path / "out"),
            "--log-format",
            "rich",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert not [line for line in out.splitlines() if line.startswith('{"event"')], out
    assert re.search(r"output\s.*4/4\s+loss\s+\d+\.\d{4}\s+\d+ tok/s", out), out
    assert "checkpoint at step 2" in out and "checkpoint at step 4" in out
    # The ranks log at WARNING under the view: no INFO lines from the trainer's loggers.
    assert " INFO kdistill." not in out
    assert (tmp_path / "out" / "result.json").is_file() and "wrote " in out
