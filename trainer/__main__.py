"""``python -m kdistill.trainer --config JOB.yaml [--output DIR]``: the entry point torchrun runs in
each worker; the same as ``kdistill train``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .jsonlog import json_event_printer, json_step_printer
from .parallel.launch import LOG_LEVEL_ENV
from .runner import main_entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdistill.trainer", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="DistillationJob YAML")
    parser.add_argument("--output", type=Path, default=None, help="output folder (default ./kdistill-out/NAME)")
    args = parser.parse_args(argv)
    level = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    if LOG_LEVEL_ENV in os.environ:  # a progress view reads this rank's output
        from .console import quiet_import_notices

        quiet_import_notices()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return main_entry(args.config, args.output, on_step=json_step_printer(), on_event=json_event_printer())


def _exit(code: int) -> None:
    """Exit with ``code``. A rank of a multi-process run has left its process group by now
    (``parallel.distributed.shutdown``), yet gloo's threads can still abort the interpreter's
    teardown after a successful run ("terminate called without an active exception", exit -6);
    such a rank flushes its output and leaves without that teardown."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
