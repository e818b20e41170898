"""What a failed e2e step leaves behind to explain it: the pods, their logs and the operator's.

CI keeps only the tail of a run's output, so a failure re-raises with a short digest of the
cluster appended to its message; the full logs go under e2e/results/failure/ for a local run.
"""

from __future__ import annotations

import json

from .cluster.cluster import E2ECluster
from .support import RESULTS

TAIL_LINES = 12
FAILURE_DIR = RESULTS / "failure"


def _logs(cluster: E2ECluster, namespace: str, target: str, previous: bool = False) -> str:
    args = ["logs", "-n", namespace, target, "--all-containers", "--tail=400"]
    if previous:
        args.append("--previous")
    proc = cluster.kubectl(*args, check=False, timeout=60)
    return proc.stdout if proc.returncode == 0 else f"(no logs: {proc.stderr.strip()})"


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join("    " + line[:240] for line in text.rstrip().splitlines()[-lines:])


def digest(cluster: E2ECluster, namespace: str, selector: str, operator_namespace: str) -> str:
    """Pods of ``selector`` with their phases and log tails (the previous container's too when
    one restarted), then the operator's log tail. Writes the full logs under FAILURE_DIR."""
    FAILURE_DIR.mkdir(parents=True, exist_ok=True)
    parts = [cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False, timeout=60).stdout.rstrip()]
    listing = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json", check=False, timeout=60)
    pods = json.loads(listing.stdout or "{}").get("items", []) if listing.returncode == 0 else []
    for pod in pods:
        name = pod["metadata"]["name"]
        restarts = sum(c.get("restartCount", 0) for c in pod.get("status", {}).get("containerStatuses") or [])
        sources = [("", False)] + ([(" (previous container)", True)] if restarts else [])
        for label, previous in sources:
            text = _logs(cluster, namespace, name, previous)
            (FAILURE_DIR / f"{name}{'.previous' if previous else ''}.log").write_text(text)
            parts.append(f"--- {name}{label}:\n{_tail(text)}")
    operator = _logs(cluster, operator_namespace, "deployment/kdistill-operator")
    (FAILURE_DIR / "operator.log").write_text(operator)
    parts.append(f"--- operator:\n{_tail(operator)}")
    return "\n".join(parts)


def explained(
    exc: BaseException, cluster: E2ECluster, namespace: str, selector: str, operator_namespace: str
) -> AssertionError:
    """``exc`` with ``digest`` appended to its message, to raise from it."""
    try:
        text = digest(cluster, namespace, selector, operator_namespace)
    except Exception as inner:  # the cluster itself may be what broke
        text = f"(no digest: {inner})"
    return AssertionError(f"{type(exc).__name__}: {exc}\n--- the cluster at the failure:\n{text}")
