"""Runs one of the repository's harness modules the way ``python -m`` would, but safely:

    .venv/bin/python -P scripts/run_module.py tests.cluster [ARGS...]   # make cluster
    .venv/bin/python -P scripts/run_module.py e2e.cluster [ARGS...]     # make e2e-cluster

``python -m tests.cluster`` puts the working directory first on ``sys.path``, ahead of the
standard library, and the repository root holds a folder named ``operator/``: it would shadow
the standard library's ``operator`` for every import that has not happened yet. Under ``-P``
nothing is prepended; this script appends the root instead, so the standard library and the
installed ``kdistill`` package come first and ``tests``/``e2e`` are still found.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
