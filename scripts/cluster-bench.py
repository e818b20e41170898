"""Measures the test control plane: build times of `make cluster-bins` and fixture start-up.

    .venv/bin/python -P scripts/cluster-bench.py [--starts 3]

The cold build time is the one scripts/cluster-bins.sh recorded the last time it built
binaries (in ${KDISTILL_CACHE}/cluster-bins-last-build.json); this script times a warm
(cached) run and starts/stops the cluster a few times. It writes
benchmarks/results/cluster_bins.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# After interpreter start-up, so the repo's operator/ folder cannot shadow the stdlib module.
sys.path.insert(0, str(REPO))

from benchmarks.bench_common import command_line  # noqa: E402
from tests.cluster.binaries import cache_root, versions  # noqa: E402
from tests.cluster.cluster import start_cluster  # noqa: E402


def timed_warm_build() -> float:
    started = time.monotonic()
    subprocess.run(["bash", str(REPO / "scripts" / "cluster-bins.sh")], check=True, capture_output=True)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()

    cold_file = cache_root() / "cluster-bins-last-build.json"
    cold = json.loads(cold_file.read_text()) if cold_file.exists() else None
    warm = [timed_warm_build() for _ in range(3)]
    startups: list[float] = []
    teardowns: list[float] = []
    for _ in range(args.starts):
        cluster = start_cluster()
        startups.append(cluster.startup_seconds)
        t0 = time.monotonic()
        cluster.stop()
        teardowns.append(time.monotonic() - t0)

    result = {
        "command": command_line(),
        "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "cold_build": cold,
        "warm_build_seconds": [round(w, 2) for w in warm],
        "fixture_startup_seconds": [round(s, 2) for s in startups],
        "fixture_teardown_seconds": [round(t, 2) for t in teardowns],
        "fixture": "etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok, 4 GPU + 1 CPU fake nodes",
    }
    out = REPO / "benchmarks" / "results" / "cluster_bins.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'measure':<40}{'seconds':>12}")
    if cold:
        if "module_download_seconds" in cold:
            print(f"{'cold module download (empty GOMODCACHE)':<40}{cold['module_download_seconds']:>12}")
        print(f"{'cold build, all binaries':<40}{cold['total_seconds']:>12}")
        for item in cold["built"]:
            print(f"{'  ' + item['name']:<40}{item['seconds']:>12}")
    print(f"{'warm build (cached), median of 3':<40}{sorted(warm)[1]:>12.2f}")
    print(f"{'fixture start-up, median':<40}{sorted(startups)[len(startups) // 2]:>12.2f}")
    print(f"{'fixture teardown, median':<40}{sorted(teardowns)[len(teardowns) // 2]:>12.2f}")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
