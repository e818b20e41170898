"""Every figure in the docs comes from a committed results file, and every results file names the
command that produced it (a top-level "command"), so that anyone can rerun it."""

from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def test_there_are_results_files() -> None:
    assert len(RESULTS) >= 5, RESULTS


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_results_file_names_a_command_that_exists(path: Path) -> None:
    report = json.loads(path.read_text())
    assert isinstance(report, dict), f"{path.name}: the top level is not an object"
    command = report.get("command")
    assert isinstance(command, str) and command.strip(), f"{path.name} has no top-level 'command'"
    # Leading VAR=value assignments are part of the command, not its program.
    words = list(itertools.dropwhile(lambda w: re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w), shlex.split(command)))
    assert words, f"{path.name}: {command!r} runs nothing"
    if words[0] == "make":
        # A make target (`make e2e` writes e2e.json): it must exist in the Makefile.
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
        assert words[1] in targets, f"{path.name}: the Makefile has no target {words[1]!r}"
        return
    scripts = [w for w in words if w.endswith((".py", ".sh"))]
    assert scripts, f"{path.name}: {command!r} names no script"
    script = ROOT / scripts[0]
    assert script.is_file(), f"{path.name}: {scripts[0]} is not in the repository"
    # Python starts with -P in this repository (CONTRIBUTING.md).
    python = next((w for w in words if re.search(r"(^|/)python3?(\.\d+)?$", w)), None)
    assert python is None or words[words.index(python) + 1] == "-P", f"{path.name}: {command!r} lacks -P"
    if script.suffix == ".sh":
        return
    # Every option the command passes is one the script defines.
    source = script.read_text()
    for option in (w.split("=", 1)[0] for w in words[words.index(scripts[0]) + 1 :] if w.startswith("--")):
        assert f'"{option}"' in source, f"{path.name}: {scripts[0]} defines no option {option}"
