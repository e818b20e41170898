"""``python -m kdistill.trainer --config JOB.yaml [--output DIR]``: the entry point torchrun runs in
each worker; the same as ``kdistill train``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .jsonlog import json_event_printer, json_step_printer
from .parallel.distributed import exit_rank
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


if __name__ == "__main__":
    exit_rank(main())
