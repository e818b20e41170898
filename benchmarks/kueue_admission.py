"""Kueue admission latency: the real operator (`--kueue`) and a real Kueue controller on the rung-3
control plane with kwok GPU nodes, a ClusterQueue whose `nvidia.com/gpu` quota fits one 2x2 gang.

Each round:
  1. job A is created on an idle queue: creation -> Admitted (the job's condition) -> all its
     worker pods Running;
  2. job B is created and waits (Queued) while A runs; A's workers then succeed: A's end ->
     B Admitted -> all B's pods Running, and B's whole queue wait (creation -> Admitted).
Rounds are repeated (--rounds, default 3); the figures are medians, with the load average
beside each round.

    flock /tmp/kdistill-bench.lock .venv/bin/python -P benchmarks/kueue_admission.py [--rounds 3]

Writes benchmarks/results/kueue_admission.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_common import command_line, machine_state, main  # noqa: E402
from tests.cluster import start_cluster  # noqa: E402
from tests.cluster.kueue import start_kueue  # noqa: E402
from tests.operator.cluster_helpers import (  # noqa: E402
    CLAIMS,
    Jobs,
    OperatorProcess,
    install_crd,
    job_body,
    make_claims,
    success_message,
)

POLL = 0.05


def until(check: Callable[[], Any], what: str, timeout: float = 120.0) -> float:
    """Polls `check` until truthy; returns the monotonic time it first was."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(POLL)
    raise TimeoutError(f"timed out after {timeout:.0f}s: {what}")


def admitted(jobs: Jobs, name: str) -> bool:
    cond = jobs.condition(name, "Admitted")
    return cond is not None and cond["status"] == "True"


def running(jobs: Jobs, name: str) -> bool:
    pods = jobs.live_pods(name)
    return len(pods) == 2 and all(p.status.phase == "Running" for p in pods)


def finish(jobs: Jobs, name: str) -> None:
    for pod in jobs.live_pods(name):
        last = pod.metadata.name.endswith("-0")
        jobs.cluster.succeed_pod(jobs.ns, pod.metadata.name, message=success_message(0.95) if last else None)


def queued_job(name: str) -> dict[str, Any]:
    body = job_body(name, nodes=2, gpus=2, serving=False)
    body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpus"}
    return body


def one_round(jobs: Jobs, r: int) -> dict[str, Any]:
    load_start = os.getloadavg()[0]
    a, b = f"a{r}", f"b{r}"
    t0 = time.monotonic()
    jobs.create(queued_job(a))
    a_admitted = until(lambda: admitted(jobs, a), f"{a} admitted")
    a_running = until(lambda: running(jobs, a), f"{a} running")
    b_created = time.monotonic()
    jobs.create(queued_job(b))
    until(lambda: jobs.status(b).get("phase") == "Queued", f"{b} Queued")
    t1 = time.monotonic()
    finish(jobs, a)
    b_admitted = until(lambda: admitted(jobs, b), f"{b} admitted")
    b_running = until(lambda: running(jobs, b), f"{b} running")
    finish(jobs, b)
    until(lambda: jobs.status(b).get("phase") == "Succeeded", f"{b} Succeeded")
    return {
        "idleQueue": {"admissionSeconds": round(a_admitted - t0, 3), "allRunningSeconds": round(a_running - t0, 3)},
        "afterRelease": {
            "admissionSeconds": round(b_admitted - t1, 3),
            "allRunningSeconds": round(b_running - t1, 3),
            "queueWaitSeconds": round(b_admitted - b_created, 3),
        },
        "loadAverageStart": round(load_start, 2),
        "loadAverageEnd": round(os.getloadavg()[0], 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    state = machine_state()
    cluster = start_cluster(gpu_nodes=2, gpus_per_node=4, cpu_nodes=1)
    workdir = Path(tempfile.mkdtemp(prefix="kdistill-kueue-bench-"))
    kueue = None
    op = None
    try:
        install_crd(cluster, workdir)
        lease_ns = cluster.create_namespace("kdistill-system")
        ns = cluster.create_namespace("bench")
        make_claims(cluster, ns, CLAIMS)
        kueue = start_kueue(cluster, workdir / "kueue")
        kueue.queues(ns, gpus=4)
        op = OperatorProcess(cluster, workdir / "operator.log", namespace=ns, lease_namespace=lease_ns,
                             extra=["--lease-name", "bench", "--kueue"]).start()  # fmt: skip
        op.wait_started()
        jobs = Jobs(cluster, ns)
        rounds = [one_round(jobs, r) for r in range(args.rounds)]
    finally:
        if op is not None:
            op.stop()
        if kueue is not None:
            kueue.stop()
        cluster.stop()

    def median(section: str, key: str) -> float:
        return round(statistics.median(r[section][key] for r in rounds), 3)

    return {
        "command": command_line(),
        "machine": state,
        "kueue": "v0.17.0",
        "quota": "ClusterQueue nvidia.com/gpu 4; each job 2 pods x 2 GPUs",
        "rounds": rounds,
        "median": {
            "idleQueue": {k: median("idleQueue", k) for k in ("admissionSeconds", "allRunningSeconds")},
            "afterRelease": {
                k: median("afterRelease", k) for k in ("admissionSeconds", "allRunningSeconds", "queueWaitSeconds")
            },
        },
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"{'round':>5} {'idle: admit':>12} {'idle: running':>14} {'release: admit':>15} "
          f"{'release: running':>17} {'load':>6}")  # fmt: skip
    for i, r in enumerate(report["rounds"]):
        idle, rel = r["idleQueue"], r["afterRelease"]
        load = r["loadAverageStart"]
        print(f"{i:>5} {idle['admissionSeconds']:>12.2f} {idle['allRunningSeconds']:>14.2f} "
              f"{rel['admissionSeconds']:>15.2f} {rel['allRunningSeconds']:>17.2f} {load:>6.2f}")  # fmt: skip
    m = report["median"]
    print(f"median: idle queue admit {m['idleQueue']['admissionSeconds']} s, all running "
          f"{m['idleQueue']['allRunningSeconds']} s; after release admit {m['afterRelease']['admissionSeconds']} s, "
          f"all running {m['afterRelease']['allRunningSeconds']} s")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "kueue_admission.json")
    main(parser, run, print_table)
