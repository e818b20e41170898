"""The import layout promises of DESIGN.md."""

from __future__ import annotations

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
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    import zipfile

    (wheel,) = tmp_path.glob("kdistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "kdistill/api/spec.py",
        "kdistill/cli/main.py",
        "kdistill/operator/__init__.py",
        "kdistill/trainer/__init__.py",
        "kdistill/serving/__init__.py",
    ):
        assert module in names, module
    assert not any(n.startswith("operator/") for n in names), "operator/ must not install as a top-level package"
