"""``kdistill run`` for a world larger than one: torchrun on this machine, one process per rank.

torchrun (``torch.distributed.run``) is the same launcher the worker pods use, so a local run
exercises the same environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, the agent's
store) and the same restart path: with ``--max-restarts`` the agent restarts the whole group
when a rank dies, and every rank resumes from the newest complete checkpoint. In the cluster the
operator restarts gangs instead (pods run ``--max-restarts=0``).

Each rank runs ``python -m kdistill.trainer``; gloo on CPU, NCCL when GPUs are visible (the
trainer picks). On CPU every rank gets ``OMP_NUM_THREADS = cores // world`` (at least 1) unless
the caller set it, so ranks do not oversubscribe the cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kdistill.api import DistillationJob

from .distributed import ENV_COLLECTIVE_TIMEOUT, ENV_RENDEZVOUS_TIMEOUT

# The log level of ``python -m kdistill.trainer`` (default INFO).
LOG_LEVEL_ENV = "KDISTILL_LOG_LEVEL"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(
    config: Path,
    output: Path,
    world: int,
    *,
    max_restarts: int = 0,
    port: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The torchrun command line for a local run of ``world`` ranks (pure: no side effects)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={world}",
        f"--max-restarts={max_restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port or free_port()}",
        "--monitor-interval=1",
        "-m",
        "kdistill.trainer",
        "--config",
        str(config),
        "--output",
        str(output),
    ]


def launch_env(
    world: int,
    *,
    rendezvous_timeout_s: float | None = None,
    collective_timeout_s: float | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    if rendezvous_timeout_s is not None:
        env[ENV_RENDEZVOUS_TIMEOUT] = str(rendezvous_timeout_s)
    if collective_timeout_s is not None:
        env[ENV_COLLECTIVE_TIMEOUT] = str(collective_timeout_s)
    return env


def run_local(
    job: DistillationJob,
    config: Path,
    output: Path,
    *,
    max_restarts: int | None = None,
    on_line: Callable[[str], None] | None = None,
) -> int:
    """Start the ranks under torchrun and return its exit code.

    Local runs let torchrun restart the group up to ``failurePolicy.maxRestarts`` times. torchrun
    collapses its workers' codes into 1; the failing rank's own code and reason are in its
    stderr and in the termination message.

    With ``on_line`` the ranks' stdout and stderr (rank 0's JSON progress lines, warnings, the
    termination line) go to it line by line instead of to this process's streams, and the ranks
    log at WARNING rather than INFO.
    """
    world = job.spec.parallelism.world_size
    restarts = job.spec.failure_policy.max_restarts if max_restarts is None else max_restarts
    cmd = torchrun_command(config, output, world, max_restarts=restarts)
    env = launch_env(world)
    if on_line is None:
        return subprocess.call(cmd, env=env)
    env[LOG_LEVEL_ENV] = "WARNING"
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_line(line)
    return proc.returncode
