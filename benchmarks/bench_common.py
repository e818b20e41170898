"""What the benchmark scripts share: the machine's state beside each figure, writing the JSON
result, and the command-line skeleton (parse, run, write, print)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def command_line(argv: list[str] | None = None) -> str:
    """The command that produced a result, as it is rerun from the repository root. Every results
    file names it in its top-level "command" field (tests/unit/test_results_files.py)."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join([".venv/bin/python", "-P", str(shown), *argv[1:]])


def machine_state() -> dict[str, Any]:
    """CPU count and load average: every figure here was taken on a shared machine, and the load
    says how much of it the benchmark had."""
    return {"cpus": os.cpu_count(), "load_average": list(os.getloadavg())}


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 <= p <= 1)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def write_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    print_table: Callable[[dict[str, Any]], None],
) -> None:
    """Parse ``parser`` (which must define ``--out``), run, write the JSON, print the table."""
    args = parser.parse_args()
    report = run(args)
    write_report(report, args.out)
    print_table(report)
    print(f"\nwrote {args.out}")
