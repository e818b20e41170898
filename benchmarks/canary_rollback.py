"""Rollback time of a failing canary on the real control plane: from the first failed response a
client sees until the champion serves alone.

The real control plane with kwok nodes (tests/cluster) and the real operator (`kdistill operator`,
a subprocess). The nodes' pod ranges are loopback (`kwok.loopback_pod_cidr`), so each kwok pod's
IP is an address of this machine, and a real `kdistill serve` of a tiny model (built from a
config, as tests/serving does) bound to that IP and the template's serving port plays the pod's
server. The operator reads the canary's /metrics at `http://<pod IP>:<port>` as in a cluster.

Each trial is a fresh DistillationSchedule: the benchmark plays the trainer (it ends each run's
worker pod with rank 0's termination message, metrics included); run 1 is promoted and becomes
the champion's Deployment; run 2 passes the gate and serves as a canary beside it. The champion's
server runs with default settings; the canary's with a one-request queue (`--max-queue 1`), so
that concurrent clients get 429s from it: a real failure, counted by the server itself. Clients
send /v1/classify to the two pods at random (the replica split of one champion and one canary,
as the Service spreads connections).

Two variants, interleaved trial by trial:

- `cold`: 12 clients from the start; the canary fails from its first requests, so the time
  includes reaching the fewest requests the analysis judges on (100 for maxErrorRate 0.01).
- `after-healthy`: one client until the canary has answered 100 requests without a failure (a
  one-request queue is enough for one client), then 12: the canary starts failing in the middle
  of its analysis, with a full window behind it.

Times, from the first failed response the clients see (429 or 5xx from the canary):
`deploymentGoneSeconds` (the canary Deployment is gone from the API: the figure),
`historySeconds` (status.history holds the rollback), `podsGoneSeconds` (no canary pod left:
the Service selects the champion alone), `decisionSeconds` (the operator's "rolled back" log
line, which it writes once it has deleted the canary Deployment and posted the Event; read from
the operator's log clock, so it can differ from the API poll's by tens of milliseconds) and, for
`cold`, `minRequestsSeconds` (the canary has answered the fewest requests to
judge). After the rollback the clients go on against the champion alone; every one of its
answers must be a success.

    flock /tmp/kdistill-bench.lock .venv/bin/python -P benchmarks/canary_rollback.py [--trials 3]

Writes benchmarks/results/canary_rollback.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_common import command_line, machine_state, write_report  # noqa: E402
from kdistill.operator import canary_builders, canary_logic, schedule_canary  # noqa: E402
from tests.cluster import Cluster, kwok, start_cluster  # noqa: E402
from tests.operator.cluster_helpers import (  # noqa: E402
    CLAIMS,
    Jobs,
    OperatorProcess,
    eventually,
    install_crd,
    job_body,
    make_claims,
)
from tests.serving.helpers import make_artifact, pydoc_texts  # noqa: E402

GROUP, VERSION, PLURAL = "kdistill.io", "v1alpha1", "distillationschedules"
VARIANTS = ("cold", "after-healthy")
FAILED = frozenset({-1, 429}) | frozenset(range(500, 600))  # -1: no answer at all
TARGET_SECONDS = 30.0


def free_port() -> int:
    """A port free on every address (the servers bind pod IPs, the operator may bind 0.0.0.0)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def raw(resp: Any) -> dict[str, Any]:
    return dict(json.loads(resp.data))


def get_or_none(fn: Any, *args: Any) -> dict[str, Any] | None:
    try:
        return raw(fn(*args, _preload_content=False))
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


# -- the pods' servers -------------------------------------------------------------------------


class PodServer:
    """`kdistill serve` bound to a kwok pod's IP and the serving port: it plays that pod's server."""

    def __init__(self, model_dir: Path, ip: str, port: int, model_name: str, log_path: Path, *extra: str) -> None:
        self.url = f"http://{ip}:{port}"
        self.log_path = log_path
        argv = [
            sys.executable, "-P", "-m", "kdistill.cli.main", "serve", str(model_dir),
            "--host", ip, "--port", str(port), "--model-name", model_name,
            "--threads", "1", "--log-level", "warning", *extra,
        ]  # fmt: skip
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{self.url} not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# -- the clients -------------------------------------------------------------------------------


class Load:
    """Closed-loop clients sending /v1/classify to a pod picked at random from `pods` (as a
    Service spreads connections over its endpoints). `active` clients of the started ones send;
    the others wait. Records, per pod, the answers' statuses and the first failure's time."""

    def __init__(self, pods: list[str], texts: list[str], clients: int, active: int, seed: int) -> None:
        self.pods = list(pods)
        self.texts = texts
        self.active = active
        self.answered: dict[str, Counter[int]] = {}
        self.first_failure: dict[str, float] = {}
        self._seed = seed
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, index: int) -> None:
        rng = random.Random(self._seed * 1000 + index)
        with httpx.Client(timeout=60) as http:
            while not self._stop.is_set():
                if index >= self.active:
                    time.sleep(0.01)
                    continue
                with self._lock:
                    pod = rng.choice(self.pods)
                try:
                    status = http.post(f"{pod}/v1/classify", json={"texts": [rng.choice(self.texts)]}).status_code
                except httpx.HTTPError:
                    status = -1
                now = time.monotonic()
                with self._lock:
                    self.answered.setdefault(pod, Counter())[status] += 1
                    if status in FAILED and pod not in self.first_failure:
                        self.first_failure[pod] = now

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def set_pods(self, pods: list[str]) -> None:
        with self._lock:
            self.pods = list(pods)

    def count(self, pod: str, ok_only: bool = False) -> int:
        with self._lock:
            c = self.answered.get(pod, Counter())
            return sum(n for s, n in c.items() if not ok_only or 200 <= s < 300)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {pod: {str(s): n for s, n in sorted(c.items())} for pod, c in self.answered.items()}


# -- the schedule ------------------------------------------------------------------------------


def schedule_body(name: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    template = job_body("x", nodes=1, gpus=1)["spec"]
    del template["data"]  # each run fills data.train and data.eval
    template["serving"].update(port=port, qualityGate={"minRetention": 0.5})
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistillationSchedule",
        "metadata": {"name": name},
        "spec": {
            "schedule": "* * * * *",
            "suspend": True,  # the first run is started by hand below (a missed tick), not in a minute
            "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": 1,
            "failedJobsHistoryLimit": 1,
            "data": {"partitions": "pvc://data/parts/", "replay": {"fraction": 0.2}},
            "warmStart": "lastPromoted",
            "promotion": {
                "gate": {"minRetention": 0.8, "tolerance": 0.01, "maxForgetting": 0.05},
                "canary": {
                    "weight": 10,
                    "analysisSeconds": args.analysis_seconds,
                    "maxErrorRate": args.max_error_rate,
                    "maxP99Ms": args.max_p99_ms,
                },
            },
            "jobTemplate": {"spec": template},
        },
    }


def run_metrics(student: float, *, champion: float | None = None) -> dict[str, Any]:
    """Rank 0's termination message on success: perplexities against a teacher at 10."""
    metrics: dict[str, Any] = {"metric": "perplexity", "teacher": 10.0, "student": student, "retention": 10 / student}
    if champion is not None:
        metrics.update(champion=champion, studentOlder=student, championOlder=champion)
    return {"reason": "Succeeded", "retryable": False, "message": "done", "result": {"metrics": metrics}}


class Trial:
    def __init__(self, cluster: Cluster, ns: str, name: str, port: int, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.ns = ns
        self.name = name
        self.port = port
        self.args = args
        self.api = client.CustomObjectsApi(cluster.api_client())
        self.apps = client.AppsV1Api(cluster.api_client())
        self.core = cluster.core()
        self.jobs = Jobs(cluster, ns)

    def schedule(self) -> dict[str, Any]:
        return raw(
            self.api.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, self.name, _preload_content=False)
        )

    def status(self) -> dict[str, Any]:
        return dict(self.schedule().get("status") or {})

    def runs(self) -> list[str]:
        items = raw(
            self.api.list_namespaced_custom_object(
                GROUP, VERSION, self.ns, "distillationjobs", label_selector=f"kdistill.io/schedule={self.name}",
                _preload_content=False,
            )
        )["items"]  # fmt: skip
        return sorted(j["metadata"]["name"] for j in items if not j["metadata"].get("deletionTimestamp"))

    def finish(self, job: str, message: dict[str, Any]) -> None:
        (pod,) = self.jobs.wait_running_gang(job, 1, attempt=0, timeout=120)
        self.cluster.succeed_pod(self.ns, pod.metadata.name, message)

    def pods(self, selector: str) -> list[dict[str, Any]]:
        items = raw(self.core.list_namespaced_pod(self.ns, label_selector=selector, _preload_content=False))["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def pod_ip(self, selector: str, what: str) -> str:
        def ip() -> str | None:
            pods = [p for p in self.pods(selector) if (p.get("status") or {}).get("podIP")]
            return str(pods[0]["status"]["podIP"]) if len(pods) == 1 else None

        return eventually(ip, what, 120)

    def patch(self, spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None) -> None:
        if spec is not None:
            self.api.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, self.name, {"spec": spec})
        if status is not None:
            self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.ns, PLURAL, self.name, {"status": status}
            )


def operator_metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def rollback_log_time(op: OperatorProcess, job: str) -> float | None:
    """Wall-clock time of the operator's "canary <job> rolled back" line."""
    for line in op.log_lines():
        if line.get("message", "").startswith(f"canary {job} rolled back"):
            return datetime.fromisoformat(line["time"].replace("Z", "+00:00")).timestamp()
    return None


def one_trial(
    cluster: Cluster,
    ns: str,
    op: OperatorProcess,
    metrics_port: int,
    variant: str,
    index: int,
    artifact: Path,
    texts: list[str],
    work: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    name = f"rollback-{index}"
    port = free_port()
    t = Trial(cluster, ns, name, port, args)
    t.api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, schedule_body(name, port, args))
    # As after an operator restart: one run starts at once for the latest missed tick.
    long_ago = (datetime.now(UTC) - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    t.patch(status={"lastScheduleTime": long_ago})
    t.patch(spec={"suspend": False})
    servers: list[PodServer] = []
    load: Load | None = None
    try:
        (first,) = eventually(lambda: t.runs() or None, "run 1", 60)
        t.finish(first, run_metrics(11.0))
        eventually(lambda: (t.status().get("promoted") or {}).get("job") == first, "run 1 promoted", 90)
        stable = eventually(
            lambda: get_or_none(t.apps.read_namespaced_deployment, f"{name}-serving", ns), "the champion's Deployment"
        )
        champion_ip = t.pod_ip(canary_builders.stable_selector(stable), "the champion pod's IP")
        champion = PodServer(artifact, champion_ip, port, name, work / f"{name}-champion.log", "--max-wait-ms", "5")
        servers.append(champion)
        # Run 2 starts at the next minute's tick.
        second = eventually(lambda: [r for r in t.runs() if r != first] or None, "run 2", 90)[0]
        t.patch(spec={"suspend": True})  # no third run while the canary runs
        t.finish(second, run_metrics(10.5, champion=11.0))
        eventually(lambda: (t.status().get("canary") or {}).get("job") == second, "run 2's canary", 90)
        canary_ip = t.pod_ip(canary_builders.canary_selector(stable), "the canary pod's IP")
        canary = PodServer(
            artifact, canary_ip, port, name, work / f"{name}-canary.log", "--max-queue", "1", "--max-wait-ms", "50"
        )
        servers.append(canary)
        champion.wait_ready()
        canary.wait_ready()
        eventually(lambda: (t.status().get("canary") or {}).get("state") == "Analysing", "the analysis", 60)

        passes0 = operator_metric(metrics_port, "kdistill_schedule_reconcile_duration_seconds_count")
        pass_seconds0 = operator_metric(metrics_port, "kdistill_schedule_reconcile_duration_seconds_sum")
        cold = variant == "cold"
        load = Load([champion.url, canary.url], texts, args.clients, args.clients if cold else 1, seed=index).start()
        load_start = time.monotonic()
        spike: float | None = load_start if cold else None
        need = canary_logic.min_requests(canary_logic_rules(args))
        reached: float | None = None
        deployment_gone = history = pods_gone = None
        deadline = time.monotonic() + args.analysis_seconds + 120
        canary_name = canary_builders.canary_name(f"{name}-serving")
        while time.monotonic() < deadline and None in (deployment_gone, history, pods_gone):
            now = time.monotonic()
            if spike is None and load.count(canary.url, ok_only=True) >= need:
                load.active = args.clients  # the canary has a full healthy window: now overload it
                spike = now
            if cold and reached is None and load.count(canary.url) >= need:
                reached = now
            if deployment_gone is None and get_or_none(t.apps.read_namespaced_deployment, canary_name, ns) is None:
                deployment_gone = now
            if history is None and any(e.get("job") == second for e in t.status().get("history") or []):
                history = now
            if (
                pods_gone is None
                and deployment_gone is not None
                and not t.pods(canary_builders.canary_selector(stable))
            ):
                pods_gone = now
                load.set_pods([champion.url])  # the Service's endpoints: the champion alone
            time.sleep(args.poll_seconds)
        if None in (deployment_gone, history, pods_gone):
            raise TimeoutError(f"{name}: no rollback within {args.analysis_seconds + 120} s: {t.status()}")
        assert deployment_gone is not None and history is not None and pods_gone is not None
        # The champion alone serves on: its answers after the rollback must all succeed.
        after_start = load.count(champion.url)
        eventually(lambda: load.count(champion.url) >= after_start + args.after_requests, "the champion alone", 120)
        load.stop()
        passes = operator_metric(metrics_port, "kdistill_schedule_reconcile_duration_seconds_count") - passes0
        pass_seconds = operator_metric(metrics_port, "kdistill_schedule_reconcile_duration_seconds_sum") - pass_seconds0
        failure = load.first_failure.get(canary.url)
        if failure is None:
            raise AssertionError(f"{name}: the canary never failed: {load.snapshot()}")
        entry = next(e for e in t.status().get("history") or [] if e.get("job") == second)
        decided = rollback_log_time(op, second)
        wall_of_failure = time.time() - (time.monotonic() - failure)
        answered = load.snapshot()
        champion_failed = sum(n for s, n in answered.get(champion.url, {}).items() if int(s) in FAILED)
        result = {
            "variant": variant,
            "schedule": name,
            "canaryJob": second,
            "reason": entry["reason"],
            "promoted": entry["promoted"],
            "canaryAnswered": answered.get(canary.url, {}),
            "championAnswered": answered.get(champion.url, {}),
            "championFailed": champion_failed,
            "failureAfterLoadSeconds": round(failure - load_start, 2),
            "failureAfterSpikeSeconds": round(failure - spike, 2) if spike is not None else None,
            "minRequestsSeconds": round(reached - failure, 2) if reached is not None else None,
            "decisionSeconds": round(decided - wall_of_failure, 2) if decided is not None else None,
            "deploymentGoneSeconds": round(deployment_gone - failure, 2),
            "historySeconds": round(history - failure, 2),
            "podsGoneSeconds": round(pods_gone - failure, 2),
            "operatorPasses": int(passes),
            "operatorPassSecondsMean": round(pass_seconds / passes, 3) if passes else None,
            "loadAverage1m": round(os.getloadavg()[0], 2),
        }
        if entry["promoted"] or "canary rolled back" not in entry["reason"]:
            raise AssertionError(f"{name}: not a canary rollback: {entry}")
        if champion_failed:
            raise AssertionError(f"{name}: the champion failed {champion_failed} request(s): {answered}")
        return result
    finally:
        if load is not None:
            load.stop()
        for server in servers:
            server.stop()
        with contextlib.suppress(client.ApiException):
            t.api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        # Its jobs and Deployments, and their pods, go with it; the pods' IPs return to kwok's pools.
        try:
            eventually(lambda: not t.pods("") or None, f"{name}'s pods gone", 120)
        except AssertionError as exc:
            print(f"cleanup: {exc}", file=sys.stderr)


def canary_logic_rules(args: argparse.Namespace) -> Any:
    from kdistill.api.schedule import Canary

    return Canary(
        weight=10,
        analysis_seconds=args.analysis_seconds,
        max_error_rate=args.max_error_rate,
        max_p99_ms=args.max_p99_ms,
    )


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        rows = [t for t in trials if t["variant"] == variant]
        if not rows:
            continue
        summary: dict[str, Any] = {"trials": len(rows)}
        for key in (
            "deploymentGoneSeconds",
            "historySeconds",
            "podsGoneSeconds",
            "decisionSeconds",
            "minRequestsSeconds",
            "failureAfterSpikeSeconds",
            "operatorPassSecondsMean",
            "loadAverage1m",
        ):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                summary[key + "Median"] = round(statistics.median(values), 2)
                summary[key + "Max"] = round(max(values), 2)
        out[variant] = summary
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3, help="trials of each variant, interleaved")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients once the canary is overloaded")
    parser.add_argument("--analysis-seconds", type=int, default=600)
    parser.add_argument("--max-error-rate", type=float, default=0.01)
    parser.add_argument("--max-p99-ms", type=float, default=5000.0)
    parser.add_argument("--after-requests", type=int, default=100, help="champion answers checked after the rollback")
    parser.add_argument("--poll-seconds", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "canary_rollback.json")
    args = parser.parse_args()

    result: dict[str, Any] = {
        "command": command_line(),
        "machineAtStart": machine_state(),
        "settings": {
            "clients": args.clients,
            "analysisSeconds": args.analysis_seconds,
            "maxErrorRate": args.max_error_rate,
            "maxP99Ms": args.max_p99_ms,
            "minRequests": canary_logic.min_requests(canary_logic_rules(args)),
            "canaryRecheckSeconds": schedule_canary.CANARY_RECHECK_SECONDS,
            "scrapeTimeoutSeconds": schedule_canary.SCRAPE_TIMEOUT_SECONDS,
            "canaryServer": "--max-queue 1 --max-wait-ms 50 --threads 1",
            "championServer": "--max-wait-ms 5 --threads 1",
            "model": "tiny BERT classifier (2 layers, width 64), INT8, from tests.serving.helpers.make_artifact",
            "pollSeconds": args.poll_seconds,
        },
        "targetSeconds": TARGET_SECONDS,
    }
    work = Path(tempfile.mkdtemp(prefix="kdistill-canary-rollback-"))
    artifact = make_artifact(work / "models", "sequence-classification", "ptq-int8")
    texts = [t[:120] for t in pydoc_texts(400)]  # well inside the model's 128 positions
    cluster = start_cluster(gpu_nodes=2, gpus_per_node=4, cpu_nodes=1)
    op: OperatorProcess | None = None
    trials: list[dict[str, Any]] = []
    try:
        core = cluster.core()
        for i, node in enumerate(cluster.nodes):
            kwok.set_pod_cidr(core, node, kwok.loopback_pod_cidr(i + 1))
        install_crd(cluster, work)
        ns = cluster.create_namespace("rollback")
        lease_ns = cluster.create_namespace("kdistill-system")
        make_claims(cluster, ns, CLAIMS)
        metrics_port = free_port()
        op = OperatorProcess(cluster, work / "operator.log", namespace=ns, lease_namespace=lease_ns)
        op.argv[op.argv.index("--metrics-port") + 1] = str(metrics_port)
        op.start()
        op.wait_started()
        order = [v for _ in range(args.trials) for v in args.variants]
        for index, variant in enumerate(order):
            trial = one_trial(cluster, ns, op, metrics_port, variant, index, artifact, texts, work, args)
            trials.append(trial)
            print(json.dumps(trial), flush=True)
    finally:
        if op is not None:
            op.stop()
        cluster.stop()
    result["trials"] = trials
    result["summary"] = summarize(trials)
    result["machineAtEnd"] = machine_state()
    write_report(result, args.out)
    print(f"\n{'variant':<14} {'trials':>6} {'deployment gone':>16} {'history':>8} {'pods gone':>10} {'load':>5}")
    for variant, s in result["summary"].items():
        print(
            f"{variant:<14} {s['trials']:>6} {s['deploymentGoneSecondsMedian']:>14} s "
            f"{s['historySecondsMedian']:>6} s {s['podsGoneSecondsMedian']:>8} s {s['loadAverage1mMedian']:>5}"
        )
    print(f"(medians, seconds from the first failed response; target {TARGET_SECONDS:.0f} s)\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
