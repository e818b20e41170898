"""DistillationJobs applied at once to the real control plane with kwok GPU nodes, and the
real operator (`kdistill operator`, a subprocess) reconciling them: 100 and 500 jobs of 2 pods,
each size on a fresh cluster, the sizes interleaved, 3 runs each, medians reported.

Measures per run: time from each job's creation until all its worker pods exist (p50, max), the
operator's peak RSS, reconcile latency p50/p99 (from its Prometheus histogram), and the time
from a node going NotReady until the replacement pods of every affected job exist.

    flock /tmp/kdistill-bench.lock .venv/bin/python -P benchmarks/operator_scale.py \
        [--sizes 100 500] [--repeats 3] [--notready-seconds 2] [--resync-seconds 30] [--workers 32]

The harness's node-failure timings (tests/cluster Timings: node-monitor-period 1 s, grace 15 s)
are the "test eviction settings"; the NotReady figure is grace + --notready-seconds + the
operator's own reaction. Polling here reads raw JSON (no typed client objects), so that the
measuring loop does not take the CPU it measures.

Writes benchmarks/results/operator_scale.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_common import command_line, machine_state  # noqa: E402
from benchmarks.bench_common import main as bench_main  # noqa: E402
from tests.cluster.controlplane import Timings  # noqa: E402
from tests.operator.cluster_helpers import (  # noqa: E402
    Jobs,
    OperatorProcess,
    install_crd,
    job_body,
    make_claims,
    start_sized_cluster,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def histogram_quantile(text: str, name: str, q: float) -> float | None:
    """Prometheus-style quantile from cumulative buckets (linear inside a bucket)."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_le, prev_count = le, count
    return prev_le


def worker_pods(jobs: Jobs, ns: str) -> list[dict[str, Any]]:
    """Worker pods as plain JSON: typed client objects for hundreds of pods cost seconds of CPU."""
    resp = jobs.core.list_namespaced_pod(ns, label_selector="kdistill.io/role=worker", _preload_content=False)
    return list(json.loads(resp.data).get("items") or [])


def cpu_by_process() -> dict[str, float]:
    """CPU seconds (user + system) of this benchmark's child processes, by name: where the
    time went (the control plane, kwok, the operator)."""
    out: dict[str, float] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            name = child.name()
            if name.startswith("python"):
                name = "operator" if "operator" in " ".join(child.cmdline()) else name
            out[name] = round(out.get(name, 0.0) + sum(child.cpu_times()[:2]), 1)
        except psutil.Error:
            continue
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def api_calls(text: str) -> dict[str, int]:
    """The operator's kdistill_api_requests_total by verb."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("kdistill_api_requests_total{"):
            verb = line.split('verb="')[1].split('"')[0]
            out[verb] = int(float(line.rsplit(" ", 1)[1]))
    return out


# Targets: (jobs, limit, the median it applies to): all pods and NotReady replacement at 100
# jobs, the operator's RSS at 500.
TARGETS = {
    "allPodsWithinSeconds": (100, 30, "allPodsWithinSeconds"),
    "notReadyReplacementSeconds": (100, 60, "notReadyReplacementSecondsMax"),
    "peakRssMB": (500, 250, "operatorPeakRssMB"),
}
# The figures whose median over the runs of one size is reported.
MEDIAN_KEYS = (
    "applySeconds",
    "podsExistSecondsP50",
    "podsExistSecondsMax",
    "allPodsWithinSeconds",
    "allRunningSeconds",
    "operatorCpuSecondsUntilRunning",
    "apiCallsPerJobUntilRunning",
    "reconcileSecondsP50",
    "reconcileSecondsP99",
    "operatorIdleRssMB",
    "operatorPeakRssMB",
)


def measure(args: argparse.Namespace, n_jobs: int) -> dict[str, Any]:
    """One run: a fresh cluster and operator, `n_jobs` jobs applied at once, then a node lost."""
    cluster = start_sized_cluster(n_jobs * args.nodes_per_job)
    result: dict[str, Any] = {
        "jobs": n_jobs,
        "podsPerJob": args.nodes_per_job,
        "operatorWorkers": args.workers,
        "operatorResyncSeconds": args.resync_seconds,
        "clusterStartSeconds": round(cluster.startup_seconds, 1),
        "loadAverageAtStart": [round(x, 2) for x in psutil.getloadavg()],
    }
    op: OperatorProcess | None = None
    try:
        work = cluster.workdir / "bench"
        work.mkdir()
        install_crd(cluster, work)
        ns = cluster.create_namespace("bench")
        lease_ns = cluster.create_namespace("kdistill-system")
        make_claims(cluster, ns, ["ckpt", "models", "data"])
        metrics_port = free_port()
        op = OperatorProcess(
            cluster,
            work / "operator.log",
            namespace=ns,
            lease_namespace=lease_ns,
            notready_seconds=args.notready_seconds,
            extra=["--workers", str(args.workers), "--resync-seconds", str(args.resync_seconds)],
        )
        op.argv[op.argv.index("--metrics-port") + 1] = str(metrics_port)
        op.start()
        proc = psutil.Process(op.proc.pid)  # type: ignore[union-attr]
        peak = {"rss": 0}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                try:
                    peak["rss"] = max(peak["rss"], proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(3)  # the operator holds its lease and its watches are up
        idle_rss = proc.memory_info().rss

        jobs = Jobs(cluster, ns)
        names = [f"bench-{i:03d}" for i in range(n_jobs)]
        created: dict[str, float] = {}

        def create(name: str) -> None:
            jobs.create(
                job_body(name, nodes=args.nodes_per_job, gpus=1, failurePolicy={"maxRestarts": 5, "backoffSeconds": 1})
            )
            created[name] = time.monotonic()

        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, names))
        apply_seconds = time.monotonic() - t0
        all_pods: dict[str, float] = {}
        deadline = time.monotonic() + max(300, 2 * n_jobs)
        while len(all_pods) < len(names) and time.monotonic() < deadline:
            counts: dict[str, int] = {}
            for pod in worker_pods(jobs, ns):
                job = pod["metadata"]["labels"]["kdistill.io/job"]
                counts[job] = counts.get(job, 0) + 1
            now = time.monotonic()
            for name, count in counts.items():
                if count >= args.nodes_per_job and name not in all_pods:
                    all_pods[name] = now
            time.sleep(args.poll_seconds)
        latencies = [all_pods[n] - created[n] for n in names if n in all_pods]
        result["applySeconds"] = round(apply_seconds, 2)
        result["jobsWithAllPods"] = len(latencies)
        result["podsExistSecondsP50"] = round(statistics.median(latencies), 2)
        result["podsExistSecondsMax"] = round(max(latencies), 2)
        result["allPodsWithinSeconds"] = round(max(all_pods.values()) - t0, 2)

        # Everything Running, then a node goes silent.
        running_deadline = time.monotonic() + max(300, 2 * n_jobs)
        while time.monotonic() < running_deadline:
            listed = jobs.api.list_namespaced_custom_object("kdistill.io", "v1alpha1", ns, "distillationjobs")
            phases = [(j.get("status") or {}).get("phase") for j in listed["items"]]
            if phases.count("Running") == len(names):
                break
            time.sleep(1)
        result["allRunningSeconds"] = round(time.monotonic() - t0, 1)
        result["operatorCpuSecondsUntilRunning"] = round(sum(proc.cpu_times()[:2]), 1)
        result["cpuSecondsUntilRunning"] = cpu_by_process()
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        calls = api_calls(text)
        result["apiCallsPerJobUntilRunning"] = round(sum(calls.values()) / len(names), 1)
        result["apiCallsUntilRunning"] = calls
        pods = worker_pods(jobs, ns)
        victim = pods[0]["spec"]["nodeName"]
        affected = sorted(
            {p["metadata"]["labels"]["kdistill.io/job"] for p in pods if p["spec"].get("nodeName") == victim}
        )
        t_lost = time.monotonic()
        cluster.stop_node_heartbeats(victim)
        replaced: dict[str, float] = {}
        deadline = time.monotonic() + max(300, 2 * n_jobs)
        while len(replaced) < len(affected) and time.monotonic() < deadline:
            counts = {}
            for pod in worker_pods(jobs, ns):
                meta = pod["metadata"]
                # any later generation: under load the harness's kwok may delete a fresh pod that
                # reuses an old pod's name (a stale delete by name), which restarts the gang again
                if int(meta["labels"].get("kdistill.io/restart-generation", "0")) >= 1 and not meta.get(
                    "deletionTimestamp"
                ):
                    job = meta["labels"]["kdistill.io/job"]
                    counts[job] = counts.get(job, 0) + 1
            now = time.monotonic()
            for name in affected:
                if counts.get(name, 0) >= args.nodes_per_job and name not in replaced:
                    replaced[name] = now - t_lost
            time.sleep(args.poll_seconds)
        result["notReady"] = {
            "affectedJobs": len(affected),
            "replacedJobs": len(replaced),
            "nodeMonitorPeriod": Timings().node_monitor_period,
            "nodeMonitorGracePeriod": Timings().node_monitor_grace_period,
            "operatorNotReadySeconds": args.notready_seconds,
            "backoffSeconds": 1,
            "replacementSecondsP50": round(statistics.median(replaced.values()), 2) if replaced else None,
            "replacementSecondsMax": round(max(replaced.values()), 2) if replaced else None,
        }
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        name = "kdistill_reconcile_duration_seconds"
        count = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name}_count"))
        result["reconcilePasses"] = int(count)
        result["reconcileSecondsP50"] = round(histogram_quantile(text, name, 0.5) or 0.0, 4)
        result["reconcileSecondsP99"] = round(histogram_quantile(text, name, 0.99) or 0.0, 4)
        result["apiErrors"] = sum(
            float(line.split()[-1]) for line in text.splitlines() if line.startswith("kdistill_api_errors_total{")
        )
        sampling.set()
        result["operatorIdleRssMB"] = round(idle_rss / 2**20, 1)
        result["operatorPeakRssMB"] = round(peak["rss"] / 2**20, 1)
        result["loadAverageAtEnd"] = [round(x, 2) for x in psutil.getloadavg()]
    finally:
        if op is not None:
            op.stop()
        cluster.stop()

    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs of one size, and each run's load average beside them."""
    out: dict[str, Any] = {"runs": len(runs)}
    for key in MEDIAN_KEYS:
        out[key] = round(statistics.median(r[key] for r in runs), 4)
    replaced = [r["notReady"]["replacementSecondsMax"] for r in runs if r["notReady"]["replacementSecondsMax"]]
    out["notReadyReplacementSecondsMax"] = round(statistics.median(replaced), 2) if replaced else None
    out["notReadyReplacedAll"] = all(r["notReady"]["replacedJobs"] == r["notReady"]["affectedJobs"] for r in runs)
    out["jobsWithAllPodsMin"] = min(r["jobsWithAllPods"] for r in runs)
    out["apiErrorsMax"] = max(r["apiErrors"] for r in runs)
    out["loadAverage1mPerRun"] = [r["loadAverageAtEnd"][0] for r in runs]
    return out


def targets_met(medians: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each target against the median of its size (a target of a size not run is not met)."""
    met = {}
    for key, (size, limit, figure) in TARGETS.items():
        value = medians.get(str(size), {}).get(figure)
        met[key] = {"jobs": size, "target": limit, "median": value, "met": value is not None and value <= limit}
    return met


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.sizes}
    for repeat in range(args.repeats):
        for n in args.sizes if repeat % 2 == 0 else list(reversed(args.sizes)):
            print(f"run {repeat + 1}/{args.repeats}: {n} jobs", flush=True)
            runs[n].append(measure(args, n))
    medians = {str(n): summarize(r) for n, r in runs.items()}
    met = targets_met(medians)
    return {
        "command": command_line(),
        "podsPerJob": args.nodes_per_job,
        "operatorWorkers": args.workers,
        "operatorResyncSeconds": args.resync_seconds,
        "machine": machine_state(),
        "targets": met,
        "medians": medians,
        "runs": {str(n): r for n, r in runs.items()},
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"{'jobs':>5}  {'all pods s':>10}  {'pods p50 s':>10}  {'NotReady max s':>14}  {'peak RSS MB':>11}  "
          f"{'reconcile p99 ms':>16}  load per run")  # fmt: skip
    for n, m in report["medians"].items():
        print(
            f"{n:>5}  {m['allPodsWithinSeconds']:>10}  {m['podsExistSecondsP50']:>10}  "
            f"{m['notReadyReplacementSecondsMax']!s:>14}  {m['operatorPeakRssMB']:>11}  "
            f"{m['reconcileSecondsP99'] * 1000:>16.0f}  {m['loadAverage1mPerRun']}"
        )
    for key, t in report["targets"].items():
        print(
            f"target {key} at {t['jobs']} jobs: median {t['median']} <= {t['target']}: "
            f"{'met' if t['met'] else 'MISSED'}"
        )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500], help="jobs applied at once")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size (sizes interleaved)")
    parser.add_argument("--nodes-per-job", type=int, default=2)
    parser.add_argument("--notready-seconds", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=32, help="the operator's --workers")
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=30.0,
        help="the operator's --resync-seconds (its default; the tests use 5)",
    )
    parser.add_argument("--poll-seconds", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "operator_scale.json")
    return parser


if __name__ == "__main__":
    bench_main(parser(), run, print_table)
