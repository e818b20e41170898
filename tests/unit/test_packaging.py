"""The import layout: kdistill.* maps onto top-level folders, operator/ never shadows the standard
library's operator, the operator and the light CLI commands never import torch, and every Python
start in the Makefile and scripts/ uses -P."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, *flags: str) -> str:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_stdlib_operator_is_not_shadowed_from_repo_root() -> None:
    path = _run("import operator; print(operator.__file__)")
    assert not path.startswith(str(ROOT)), path
    assert Path(path).parent.name.startswith("python3"), path


def test_operator_package_does_not_import_torch() -> None:
    out = _run(
        "import sys, pkgutil, importlib, kdistill.operator as op\n"
        "for m in pkgutil.walk_packages(op.__path__, 'kdistill.operator.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    assert out == "False False"


def test_validate_and_crds_run_without_torch() -> None:
    out = _run(
        "import sys\n"
        "from kdistill.cli.main import app\n"
        "from kdistill.api.crd import build_crd\n"
        "from kdistill.api import load_job\n"
        "load_job('examples/quickstart-cpu.yaml'); build_crd()\n"
        "print('torch' in sys.modules)"
    )
    assert out == "False"


def test_plain_wheel_maps_every_folder(tmp_path: Path) -> None:
    # Build from a copy of the sources: setuptools reuses a checkout's build/lib, whose stale
    # files would hide a package missing from pyproject.toml.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("kdistill", "api", "operator", "trainer", "serving", "cli"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    import zipfile

    (wheel,) = wheels.glob("kdistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every module of every mapped folder, subpackages included: a folder missing from
    # pyproject's package list installs fine in editable mode but not in the images' wheel.
    mapped = {"api": "api", "operator": "operator", "trainer": "trainer", "serving": "serving", "cli": "cli"}
    expected = {
        f"kdistill/{package}/{source.relative_to(ROOT / folder).as_posix()}"
        for package, folder in mapped.items()
        for source in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in source.parts
    }
    assert expected, "no sources found"
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel (add their package to pyproject.toml): {missing}"
    assert not any(n.startswith("operator/") for n in names), "operator/ must not install as a top-level package"
    # The licence travels as an SPDX expression with its text (PEP 639), as LICENSE states it.
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


# A Python interpreter at the start of a shell command: `$(PY)`, `"${PY}"`, `python3`, `.venv/bin/python`...
_INTERPRETER = r'(?:"?\$\{?PY(?:THON)?\}?"?|\$\((?:PY|PYTHON)\)|(?:[\w.${}()/-]*/)?python3?(?:\.\d+)?)'
# ... where a command starts: the line's start (after make's `@`, `exec`, VAR=value assignments)
# or after `&&`, `||`, `|`, `;`, `$(` (a command substitution, not a make variable such as `$(VENV)`).
_COMMAND_START = r"(?:^[\t ]*@?(?:exec\s+)?(?:\w+=\S*\s+)*|(?:&&|\|\|?|;|\$\((?![A-Z_]+\)))\s*)"
_PYTHON_START = re.compile(_COMMAND_START + _INTERPRETER + r"(?:\s+(?P<arg>\S+)|$)")


def _python_starts(path: Path) -> list[tuple[int, str, str]]:
    """(line number, line, first argument) of every Python start in a Makefile or shell script."""
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("#!"):
            if "python" in line:
                found.append((number, line, "-P" if re.search(r"python3?\s+-P\b", line) else line))
            continue
        if line.lstrip().startswith("#"):
            continue
        for match in _PYTHON_START.finditer(line):
            found.append((number, line, match.group("arg") or ""))
    return found


def test_every_python_start_in_the_makefile_and_scripts_uses_dash_p() -> None:
    # -P keeps the working directory (the repository root, which holds operator/) off the front
    # of sys.path: without it, `python -m ...` from the root could import operator/ as the
    # standard library's operator. CONTRIBUTING.md states the rule.
    files = [ROOT / "Makefile", *sorted((ROOT / "scripts").glob("*.sh"))]
    starts = [(path, *start) for path in files for start in _python_starts(path)]
    assert len(starts) >= 10, "the scan found too few Python starts: the pattern is broken"
    missing = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p, n, line, arg in starts if arg != "-P"]
    assert not missing, "Python started without -P:\n" + "\n".join(missing)


def test_the_dash_p_scan_sees_the_forms_the_scripts_use(tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text(
        "#!/usr/bin/env bash\n"
        '"$PY" -m kdistill.trainer\n'
        'exec "${PY}" -P scripts/run_module.py e2e.cluster\n'
        "\t@test -x $(PY) || $(PYTHON) -m venv .venv\n"
        "PY := $(VENV)/bin/python\n"
        "X=1 python3 - <<'EOF'\n"
        "out=$(.venv/bin/python -c 'print(1)')\n"
        'ln -sf python3.11 "$work/usr/bin/python"\n'
        "# python3 -m in a comment\n"
    )
    args = [arg for _, _, arg in _python_starts(script)]
    assert args == ["-m", "-P", "-m", "-", "-c"]
