"""Keeps a started cluster in the foreground for a person, until Ctrl-C.

Shared by `python -m tests.cluster` (make cluster) and `python -m e2e.cluster`
(make e2e-cluster): both print how to use the cluster, watch its processes, and
remove it on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from typing import Protocol


class Held(Protocol):
    def check_alive(self) -> None: ...

    def stop(self) -> None: ...


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM (from `timeout` or a CI runner) then tears down like Ctrl-C does; call it before starting.

    SIGINT gets the same handler explicitly: a process started in the background by a
    non-interactive shell inherits SIGINT as ignored, and Python then installs no
    KeyboardInterrupt handler, so Ctrl-C (or a SIGINT from a test) would do nothing."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)


def hold(cluster: Held, banner: Iterable[str], interval: float = 2.0) -> None:
    """Prints `banner`, checks the cluster's processes until interrupted, then stops the cluster."""
    try:
        for line in banner:
            print(line)
        print("Ctrl-C stops it and removes its data.", flush=True)
        while True:
            # A component that died raises here, with its log's tail, and the cluster is removed.
            cluster.check_alive()
            time.sleep(interval)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        cluster.stop()
