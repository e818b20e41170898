"""500 DistillationJobs applied at once to the real control plane with kwok GPU nodes, and the
real operator reconciling them: every job gets exactly its gang (one pod per rank, none twice),
reaches Running, and the operator makes no failed API call. How fast is measured in
benchmarks/operator_scale.py, not here: the waits below only bound a stuck run, and they stretch
while jobs keep making progress."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.operator.cluster_helpers import (
    Jobs,
    OperatorProcess,
    free_port,
    install_crd,
    job_body,
    make_claims,
    start_sized_cluster,
)

pytestmark = pytest.mark.cluster

JOBS = 500
NODES_PER_JOB = 2
# A stuck run fails once this long passes with no job reaching its next state.
STALL_SECONDS = 120.0


@pytest.fixture(scope="module")
def big_cluster() -> Iterator[Cluster]:
    running = start_sized_cluster(JOBS * NODES_PER_JOB)
    try:
        yield running
    finally:
        running.stop()


def _worker_pods(jobs: Jobs, ns: str) -> list[dict[str, Any]]:
    # plain JSON: typed client objects for a thousand pods cost seconds of CPU
    resp = jobs.core.list_namespaced_pod(ns, label_selector="kdistill.io/role=worker", _preload_content=False)
    return list(json.loads(resp.data).get("items") or [])


def _phases(jobs: Jobs, ns: str) -> dict[str, str | None]:
    resp = jobs.api.list_namespaced_custom_object(
        "kdistill.io", "v1alpha1", ns, "distillationjobs", _preload_content=False
    )
    items = json.loads(resp.data).get("items") or []
    return {j["metadata"]["name"]: (j.get("status") or {}).get("phase") for j in items}


def _wait_progressing(what: str, count: Any, goal: int) -> None:
    """Polls `count()` until it reaches `goal`; fails only when it stops moving for STALL_SECONDS."""
    best, last_move = -1, time.monotonic()
    while True:
        now_count = count()
        if now_count >= goal:
            return
        if now_count > best:
            best, last_move = now_count, time.monotonic()
        assert time.monotonic() - last_move < STALL_SECONDS, f"{what}: stuck at {best}/{goal}"
        time.sleep(1.0)


def test_500_jobs_each_get_exactly_their_gang_and_run(big_cluster: Cluster, tmp_path: Path) -> None:
    install_crd(big_cluster, tmp_path)
    ns = big_cluster.create_namespace("scale")
    lease_ns = big_cluster.create_namespace("kdistill-system")
    make_claims(big_cluster, ns, ["ckpt", "models", "data"])
    metrics_port = free_port()
    op = OperatorProcess(big_cluster, tmp_path / "operator.log", namespace=ns, lease_namespace=lease_ns)
    op.argv[op.argv.index("--metrics-port") + 1] = str(metrics_port)
    op.start()
    try:
        op.wait_started()
        jobs = Jobs(big_cluster, ns)
        names = [f"scale-{i:03d}" for i in range(JOBS)]
        body = {"failurePolicy": {"maxRestarts": 5, "backoffSeconds": 1}}
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda n: jobs.create(job_body(n, nodes=NODES_PER_JOB, gpus=1, **body)), names))

        def jobs_with_gang() -> int:
            per_job = Counter(p["metadata"]["labels"]["kdistill.io/job"] for p in _worker_pods(jobs, ns))
            return sum(1 for n in names if per_job[n] >= NODES_PER_JOB)

        _wait_progressing("jobs with all their worker pods", jobs_with_gang, JOBS)
        _wait_progressing("jobs Running", lambda: sum(1 for p in _phases(jobs, ns).values() if p == "Running"), JOBS)

        # exactly one pod per rank per job, none left over from a duplicate create
        ranks: Counter[tuple[str, str]] = Counter()
        for pod in _worker_pods(jobs, ns):
            labels = pod["metadata"]["labels"]
            ranks[(labels["kdistill.io/job"], labels["kdistill.io/replica-index"])] += 1
        assert set(ranks) == {(n, str(r)) for n in names for r in range(NODES_PER_JOB)}
        assert max(ranks.values()) == 1, [k for k, v in ranks.items() if v > 1][:5]
        assert set(_phases(jobs, ns).values()) == {"Running"}

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        errors = [line for line in text.splitlines() if line.startswith("kdistill_api_errors_total{")]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in errors) == 0, errors
    finally:
        code = op.stop()
        print(op.log_path.read_text()[-3000:])
    assert code == 0, f"operator exited {code}"
