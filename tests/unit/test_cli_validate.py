"""`kdistill validate` as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.spec_table import BAD_SPECS

ROOT = Path(__file__).resolve().parents[2]


def _validate(*files: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdistill.cli.main", "validate", *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_examples_validate() -> None:
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 3
    result = _validate(*examples)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok") == len(examples)


def test_bad_specs_exit_nonzero_with_field_paths(tmp_path: Path) -> None:
    files = []
    for name, job, _ in BAD_SPECS:
        f = tmp_path / f"{name}.yaml"
        f.write_text(yaml.safe_dump(job))
        files.append(f)
    result = _validate(*files)
    assert result.returncode == 1
    for (name, _, path), f in zip(BAD_SPECS, files, strict=True):
        block = result.stderr.split(f"{f}: invalid")[1].split("invalid,")[0]
        assert f"  {path}: " in block, f"{name}: {block}"


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    result = _validate(tmp_path / "missing.yaml", broken)
    assert result.returncode == 1
    assert "cannot read" in result.stderr
    assert "not valid YAML" in result.stderr
