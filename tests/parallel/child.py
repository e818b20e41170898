"""Entry point of one test rank: join the group, run the target, exit with the trainer's codes."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

from kdistill.api.failures import ExitCode
from kdistill.trainer.errors import TrainerError
from kdistill.trainer.parallel.distributed import env_from, exit_rank, init_distributed, shutdown


def main() -> int:
    target, workdir, args = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    torch.set_num_threads(1)
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    env = env_from()
    try:
        init_distributed(env, prefer_gpu=False)
        fn(env, workdir, args)
    except TrainerError as exc:
        # No teardown here: destroying a group whose peer died can block.
        print(f"kdistill: {exc}", file=sys.stderr, flush=True)
        return int(exc.code)
    shutdown()
    return int(ExitCode.OK)


if __name__ == "__main__":
    # As the trainer's entry point: a rank that lost a peer must not let gloo's teardown abort
    # the interpreter and replace its exit code with -6.
    exit_rank(main())
