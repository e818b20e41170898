"""Joining the process group from torchrun's environment, with bounded waits.

Two timeouts, two exit codes, because the operator treats them differently in its messages:
- the rendezvous (reaching MASTER_ADDR:MASTER_PORT and waiting for all ranks) is bounded by
  ``rendezvous_timeout``; missing it is ``ExitCode.RENDEZVOUS_TIMEOUT``;
- a collective that fails or does not finish within ``collective_timeout`` means a peer died or
  hangs; that is ``ExitCode.PEER_LOST``. With gloo a peer killed by SIGKILL closes its sockets,
  so survivors fail at their next collective within milliseconds; a hung peer is caught by the
  timeout.
Both are retryable: the gang restarts from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kdistill.api.failures import ExitCode

from ..errors import TrainerError

log = logging.getLogger(__name__)

DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
ENV_RENDEZVOUS_TIMEOUT = "KDISTILL_RENDEZVOUS_TIMEOUT_S"
ENV_COLLECTIVE_TIMEOUT = "KDISTILL_COLLECTIVE_TIMEOUT_S"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    # Under torchrun the agent already hosts the store at MASTER_PORT; workers only connect.
    agent_store: bool = False
    restart_count: int = 0  # TORCHELASTIC_RESTART_COUNT: which attempt of the group this is

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(env: dict[str, str], name: str, default: int | None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise TrainerError(ExitCode.BAD_SPEC, f"environment variable {name} is required for a multi-process run")
        return default
    try:
        return int(raw)
    except ValueError:
        raise TrainerError(ExitCode.BAD_SPEC, f"environment variable {name}={raw!r} is not an integer") from None


def env_from(env: dict[str, str] | None = None) -> DistEnv:
    """Read torchrun's variables; without WORLD_SIZE this is a single-process run."""
    env = dict(os.environ if env is None else env)
    world = _int_env(env, "WORLD_SIZE", 1)
    if world < 1:
        raise TrainerError(ExitCode.BAD_SPEC, f"WORLD_SIZE must be >= 1, got {world}")
    if world == 1:
        return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), _int_env(env, "MASTER_PORT", 29500))
    rank = _int_env(env, "RANK", None)
    if not 0 <= rank < world:
        raise TrainerError(ExitCode.BAD_SPEC, f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=_int_env(env, "LOCAL_RANK", rank),
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_int_env(env, "MASTER_PORT", None),
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
        restart_count=_int_env(env, "TORCHELASTIC_RESTART_COUNT", 0),
    )


def timeout_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise TrainerError(ExitCode.BAD_SPEC, f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise TrainerError(ExitCode.BAD_SPEC, f"{name} must be positive, got {value}")
    return value


def pick_backend(prefer_gpu: bool = True) -> tuple[str, torch.device]:
    """NCCL on a GPU when one is visible (and wanted), gloo on CPU otherwise."""
    if prefer_gpu and torch.cuda.is_available():
        return "nccl", torch.device("cuda")
    return "gloo", torch.device("cpu")


def init_distributed(
    env: DistEnv,
    *,
    prefer_gpu: bool = True,
    rendezvous_timeout_s: float | None = None,
    collective_timeout_s: float | None = None,
) -> torch.device:
    """Join the default process group and return this rank's device.

    A single-process run initialises nothing. The store is opened by hand so that reaching it
    has its own bound, separate from the (longer) bound on collectives.
    """
    backend, device = pick_backend(prefer_gpu)
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not env.distributed:
        return device
    rdzv = rendezvous_timeout_s or timeout_from_env(ENV_RENDEZVOUS_TIMEOUT, DEFAULT_RENDEZVOUS_TIMEOUT_S)
    coll = collective_timeout_s or timeout_from_env(ENV_COLLECTIVE_TIMEOUT, DEFAULT_COLLECTIVE_TIMEOUT_S)
    where = f"{env.master_addr}:{env.master_port}"
    try:
        base_store = dist.TCPStore(
            env.master_addr,
            env.master_port,
            env.world_size,
            is_master=env.rank == 0 and not env.agent_store,
            timeout=timedelta(seconds=rdzv),
            wait_for_workers=False,
        )
        # torchrun's agent keeps one store across restarts: keys of an earlier attempt (gloo's
        # peer addresses among them) must not be seen by the next one.
        store = dist.PrefixStore(f"kdistill/attempt-{env.restart_count}/", base_store)
        # Every rank checks in and waits for all the others, still under the rendezvous bound.
        store.add("kdistill/joined", 1)
        _wait_for_all(store, "kdistill/joined", env.world_size, rdzv)
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise TrainerError(
            ExitCode.RENDEZVOUS_TIMEOUT,
            f"rank {env.rank}/{env.world_size} could not complete the rendezvous at {where} within "
            f"{rdzv:.0f}s ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "check that worker 0 is running and the rendezvous Service resolves",
        ) from None
    base_store.set_timeout(timedelta(seconds=coll))
    global _STORE, _RANK, _WORLD
    _STORE, _RANK, _WORLD = store, env.rank, env.world_size
    dist.init_process_group(
        backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=coll),
        device_id=device if device.type == "cuda" else None,
    )
    log.info("rank %d/%d joined %s with %s", env.rank, env.world_size, where, backend)
    return device


def _wait_for_all(store: dist.Store, key: str, world: int, timeout_s: float) -> None:
    """Wait until every rank has added 1 to the counter ``key``."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = store.add(key, 0)
        if count >= world:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {count} of {world} ranks reached {key}")
        time.sleep(0.02)


_STORE: dist.Store | None = None
_RANK, _WORLD = 0, 1
LEAVE_TIMEOUT_S = 30.0


def shutdown() -> None:
    """Leave the group so that no rank tears down while a peer still talks to it.

    Rank 0 hosts the store. If it exits while another rank is still inside
    destroy_process_group, that rank's gloo threads can be destroyed joinable and the process
    aborts ("terminate called without an active exception") after a successful run. So all
    ranks meet at a barrier, tear down, check out through the store, and rank 0 leaves last.
    """
    global _STORE
    if not (dist.is_available() and dist.is_initialized()):
        return
    # Work objects still referenced (a DDP reducer's, a comm hook's futures) would otherwise be
    # freed by gloo's threads during interpreter finalization, which aborts the process.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    store, _STORE = _STORE, None
    if store is None:
        return
    try:
        store.add("kdistill/left", 1)
        if _RANK == 0:
            _wait_for_all(store, "kdistill/left", _WORLD, LEAVE_TIMEOUT_S)
    except (RuntimeError, OSError, TimeoutError) as exc:  # a peer gone at exit is not this rank's failure
        log.warning("leaving the process group: %s", exc)


_PEER_SIGNS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
    "connection refused",
    "socket",
    "nccl",
    "gloo",
    "watchdog",
)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether an exception raised inside a collective means a peer is gone or hanging."""
    kinds = (getattr(dist, "DistNetworkError", OSError), getattr(dist, "DistBackendError", OSError))
    if isinstance(exc, (*kinds, TimeoutError, ConnectionError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(sign in text for sign in _PEER_SIGNS)


@contextlib.contextmanager
def peer_guard(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective inside the block into ``TrainerError(PEER_LOST)``."""
    try:
        yield
    except TrainerError:
        raise
    except Exception as exc:
        if dist.is_initialized() and is_peer_failure(exc):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainerError(
                ExitCode.PEER_LOST,
                f"rank {dist.get_rank()}: a peer was lost during {what}: {first[:300]}",
            ) from None
        raise


def exit_rank(code: int) -> None:
    """Exit with ``code``. A rank of a multi-process run has left its process group by now
    (``shutdown``) or lost a peer, yet gloo's threads can still abort the interpreter's teardown
    ("terminate called without an active exception", exit -6) and so hide the code the operator
    reads; such a rank flushes its output and leaves without that teardown."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
