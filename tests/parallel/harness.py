"""Run a function on N real processes joined through kdistill's own rendezvous (gloo on CPU).

``run_ranks(world, "tests.parallel.workers:name", workdir, args)`` starts ``world`` Python
processes, each importing the target and calling ``fn(env, workdir, args)`` after
``init_distributed``; they exchange results through files in ``workdir``. Children run with
OMP_NUM_THREADS=1: the machine has two cores shared with other work.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RankResult:
    rank: int
    returncode: int
    stderr: str


def child_env(rank: int, world: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TRANSFORMERS_VERBOSITY="error",
        TORCHELASTIC_USE_AGENT_STORE="",
    )
    env.update(extra or {})
    return env


def start_ranks(
    world: int,
    target: str,
    workdir: Path,
    args: dict | None = None,
    ranks: list[int] | None = None,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> list[subprocess.Popen]:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in ranks if ranks is not None else range(world):
        cmd = [sys.executable, "-m", "tests.parallel.child", target, str(workdir), json.dumps(args or {})]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=child_env(rank, world, port, extra_env),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def wait_ranks(procs: list[subprocess.Popen], timeout: float = 240) -> list[RankResult]:
    out = []
    for rank, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(RankResult(rank, p.returncode, err))
    return out


def run_ranks(world: int, target: str, workdir: Path, args: dict | None = None, timeout: float = 240) -> None:
    results = wait_ranks(start_ranks(world, target, workdir, args), timeout)
    bad = [r for r in results if r.returncode != 0]
    assert not bad, "\n".join(f"rank {r.rank} exit {r.returncode}:\n{r.stderr[-3000:]}" for r in bad)
