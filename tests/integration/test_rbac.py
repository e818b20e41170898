"""Least privilege, proven on the real control plane.

The chart's RBAC (rendered by helm, applied as admin) is the only thing the operator runs
with: it authenticates with a token of the chart's ServiceAccount, not as admin. A job then
lives its whole life: create, Running, rank-0 progress, a gang restart, success, the rollout
of the serving Deployment, a serving change, and deletion; a second job, serving off, is
deleted by the operator when its ttlSecondsAfterFinished expires; and a third runs its teacher as
a service: the teacher's Deployment and Service first, the worker after it is ready, a teacher pod
replaced without a gang restart, and the teacher's objects deleted when the job succeeds; last, a
DistillationSchedule starts a run, which succeeds, is promoted and rolled out.

- With the chart's rules, no request is Forbidden: neither the operator's own API calls
  (its `kdistill_api_errors_total` metric counts every failed call by HTTP code) nor kopf's
  watches (its log).
- Without any single rule of the ClusterRole or of the leader-Lease Role, some part of that
  life fails: a step does not happen, or a request is Forbidden.
- The per-job worker Role, which the operator creates, lets rank 0 report progress on its own
  job and nothing else; without its rule, rank 0's report is Forbidden.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from kdistill.api.metadata import LABEL_ATTEMPT
from tests.chart.helm import CHART, REPO, helm
from tests.cluster import Cluster
from tests.operator.cluster_helpers import (
    GROUP,
    PLURAL,
    VERSION,
    Jobs,
    OperatorProcess,
    delete_claims,
    install_crd,
    job_body,
    make_claims,
    succeed_gang,
)

pytestmark = pytest.mark.cluster

RULES_DIR = CHART / "files" / "rbac"
FULLNAME = "kdistill-rbac"
OPERATOR = f"{FULLNAME}-operator"  # the chart's ServiceAccount, ClusterRole and bindings
LEASE = "kdistill-operator"
JOB = "life"
TTL_JOB = "life-ttl"
TEACHER_JOB = "life-teacher"
SCHEDULE = "life-schedule"


def _rules(file: str) -> list[dict[str, Any]]:
    return yaml.safe_load((RULES_DIR / file).read_text())


CLUSTER_ROLE_RULES = _rules("namespaced.yaml") + _rules("cluster.yaml")
LEASE_ROLE_RULES = [{**r, "resourceNames": [LEASE]} if r.get("resourceNames") else r for r in _rules("leader.yaml")]


def _rule_id(rule: dict[str, Any]) -> str:
    names = f"[{','.join(rule['resourceNames'])}]" if rule.get("resourceNames") else ""
    return f"{'+'.join(rule['resources'])}{names}:{'+'.join(rule['verbs'])}"


# -- installing the chart's RBAC ------------------------------------------------------------


def chart_rbac(release_ns: str, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's ServiceAccount and RBAC objects, as `helm template` renders them."""
    args = ["template", "kdistill", str(CHART), "--namespace", release_ns, "--kube-version", "1.34.0",
            "--set", f"fullnameOverride={FULLNAME}", "--set", "crds.install=false"]  # fmt: skip
    for key, value in (values or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    docs = [d for d in yaml.safe_load_all(helm(*args).stdout) if d]
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    return [d for d in docs if d["kind"] in kinds]


def apply(cluster: Cluster, objs: list[dict[str, Any]]) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=test-rbac", "-f", "-",
                    input=yaml.safe_dump_all(objs))  # fmt: skip


def delete_cluster_scoped(cluster: Cluster) -> None:
    cluster.kubectl("delete", "clusterrole,clusterrolebinding", OPERATOR, "--ignore-not-found", check=False)


def without(objs: list[dict[str, Any]], kind: str, rule: dict[str, Any]) -> list[dict[str, Any]]:
    """`objs` with `rule` taken out of the one object of `kind` that holds it."""
    out = []
    for obj in objs:
        if obj["kind"] == kind and rule in (obj.get("rules") or []):
            obj = {**obj, "rules": [r for r in obj["rules"] if r != rule]}
        out.append(obj)
    return out


# -- the operator, as the chart's ServiceAccount ------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The operator's own client says "HTTP 403"; kopf names the error Forbidden.
FORBIDDEN = re.compile(r"HTTP 403|Forbidden|forbidden|\(403\)|status[=:] ?403")


@dataclass
class Operator:
    proc: OperatorProcess
    metrics_port: int

    def forbidden(self) -> list[str]:
        """Every sign of a Forbidden request: the operator's 403 counters and kopf's log."""
        found: list[str] = []
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            for line in text.splitlines():
                if line.startswith("kdistill_api_errors_total{") and 'code="403"' in line and not line.endswith(" 0.0"):
                    found.append(line)
        except OSError:
            pass  # not up yet, or gone: the log still tells
        log = self.proc.log_path.read_text(errors="replace") if self.proc.log_path.exists() else ""
        found += [line[:300] for line in log.splitlines() if FORBIDDEN.search(line)]
        return found


def start_operator(cluster: Cluster, release_ns: str, workdir: Path, *, watch: list[str]) -> Operator:
    """`kdistill operator` with a token of the chart's ServiceAccount (never the admin kubeconfig)."""
    kubeconfig = cluster.serviceaccount_kubeconfig(release_ns, OPERATOR)
    port = free_port()
    proc = OperatorProcess(cluster, workdir / f"operator-{uuid.uuid4().hex[:6]}.log", namespace="-",
                           lease_namespace=release_ns)  # fmt: skip
    argv = proc.argv
    # The helper watches one namespace as admin; here: the chart's modes, as the chart's account.
    i = argv.index("--namespace")
    del argv[i : i + 2]
    for ns in watch:
        argv += ["--namespace", ns]
    argv[argv.index("--kubeconfig") + 1] = str(kubeconfig)
    argv[argv.index("--metrics-port") + 1] = str(port)
    argv += ["--lease-name", LEASE]
    # KUBECONFIG too: kopf's own login reads the client library's default location, which the
    # library fixes from KUBECONFIG when it is first imported.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KUBECONFIG": str(kubeconfig)}
    proc._log = proc.log_path.open("ab")
    proc.proc = subprocess.Popen(argv, stdout=proc._log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                 start_new_session=True)  # fmt: skip
    return Operator(proc, port)


# -- a job's whole life ---------------------------------------------------------------------------


class Forbidden(AssertionError):
    pass


@dataclass
class Life:
    steps: list[str] = field(default_factory=list)
    failed_step: str | None = None
    error: str = ""
    forbidden: list[str] = field(default_factory=list)


def until(check: Callable[[], Any], what: str, timeout: float, op: Operator, fail_fast: bool) -> Any:
    """Polls `check` until truthy. With `fail_fast`, a Forbidden request ends the wait at once."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except client.ApiException as exc:
            last = exc
        if fail_fast and (seen := op.forbidden()):
            raise Forbidden(f"{what}: forbidden: {seen[:3]}")
        if not op.proc.alive():
            raise AssertionError(f"{what}: the operator exited ({op.proc.proc.returncode if op.proc.proc else '?'})")
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s: {what}" + (f" (last error: {last})" if last else ""))


def worker_api(cluster: Cluster, ns: str, account: str) -> client.CustomObjectsApi:
    """The custom-objects API as the job's worker ServiceAccount: what rank 0 runs with."""
    kubeconfig = cluster.serviceaccount_kubeconfig(ns, account)
    return client.CustomObjectsApi(config.new_client_from_config(config_file=str(kubeconfig)))


def report_progress(api: client.CustomObjectsApi, ns: str, name: str, step: int) -> None:
    """Rank 0's progress report: the same merge patch of the status subresource as trainer/progress.py."""
    body = {"status": {"stage": "output", "step": step, "totalSteps": 100, "progress": f"{step}%", "loss": 2.5}}
    api.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, name, body,
                                              _content_type="application/merge-patch+json")  # fmt: skip


METRICS = {"teacher": 10.0, "student": 10.2, "retention": 0.98, "metric": "perplexity"}
SUCCESS = {"reason": "Succeeded", "retryable": False, "message": "done", "result": {"metrics": METRICS}}
NCCL_TIMEOUT = {"reason": "NCCL_TIMEOUT", "retryable": True, "message": "watchdog caught collective timeout"}


def job_life(cluster: Cluster, ns: str, op: Operator, *, timeout: float, fail_fast: bool) -> Life:
    """Create → Running → progress → restart → Succeeded (rollout) → serving change → delete; then a
    job with serving off succeeds and the operator deletes it when its TTL expires."""
    life = Life()
    jobs = Jobs(cluster, ns)
    apps = client.AppsV1Api(cluster.api_client())

    def step(name: str, fn: Callable[[], Any]) -> Any:
        value = fn()
        life.steps.append(name)
        return value

    def gang(attempt: int) -> list[Any]:
        return until(lambda: (p := [x for x in jobs.live_pods(JOB)
                                    if x.metadata.labels.get(LABEL_ATTEMPT) == str(attempt)
                                    and x.status.phase == "Running"]) and len(p) == 2 and p,
                     f"2 running pods of gang attempt {attempt}", timeout, op, fail_fast)  # fmt: skip

    def finish_gang(pods: list[Any]) -> None:
        """The others exit 0, then rank 0 succeeds with the metrics summary (the operator deletes
        the workers once rank 0 has succeeded). Under load kwok 0.7 can delete a fresh pod that
        reuses an old pod's name (a stale delete by name), which restarts the gang once more: then
        the next attempt's gang is finished instead."""
        attempt = int(pods[0].metadata.labels[LABEL_ATTEMPT])
        while True:
            try:
                succeed_gang(cluster, ns, pods, SUCCESS)
                return
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
            attempt += 1
            pods = gang(attempt)

    try:
        # The operator creates the checkpoint claim (storageClassName + size); a PV waits for it.
        body = job_body(JOB, nodes=2, gpus=2, checkpoint={"volume": {"storageClassName": CKPT_CLASS, "size": "1Gi"}})
        step("create", lambda: jobs.create(body))
        pods = step("workers", lambda: gang(0))
        step("running", lambda: until(lambda: jobs.status(JOB).get("phase") == "Running", "phase Running",
                                      timeout, op, fail_fast))  # fmt: skip
        account = pods[0].spec.service_account_name
        rank0 = worker_api(cluster, ns, account)
        step("progress", lambda: report_progress(rank0, ns, JOB, 40))
        step("progress-seen", lambda: until(lambda: jobs.status(JOB).get("step") == 40, "status.step 40",
                                            timeout, op, fail_fast))  # fmt: skip
        cluster.fail_pod(ns, pods[0].metadata.name, exit_code=1, message=NCCL_TIMEOUT)
        pods = step("restart", lambda: gang(1))
        step("restarts-counted", lambda: until(lambda: jobs.status(JOB).get("restarts") == 1, "restarts 1",
                                               timeout, op, fail_fast))  # fmt: skip
        report_progress(rank0, ns, JOB, 100)
        finish_gang(pods)
        status = step("succeeded", lambda: until(
            lambda: (s := jobs.status(JOB)).get("phase") == "Succeeded" and s, "phase Succeeded", timeout * 2,
            op, fail_fast))  # fmt: skip
        assert status.get("endpoint"), status
        deployment = f"{JOB}-serving"
        step("rollout", lambda: until(lambda: (apps.read_namespaced_deployment(deployment, ns).status
                                               .available_replicas or 0) >= 1, "serving available", timeout,
                                      op, fail_fast))  # fmt: skip
        jobs.patch_spec(JOB, {"serving": {"replicas": 2}})
        step("scaled", lambda: until(lambda: apps.read_namespaced_deployment(deployment, ns).spec.replicas == 2,
                                     "serving scaled to 2", timeout, op, fail_fast))  # fmt: skip
        jobs.delete(JOB)
        step("deleted", lambda: until(
            lambda: not jobs.exists(JOB) and not jobs.pods(JOB)
            and not apps.list_namespaced_deployment(ns).items, "job, pods and serving gone", timeout, op,
            fail_fast))  # fmt: skip
        jobs.create(job_body(TTL_JOB, nodes=1, gpus=1, serving=False, ttlSecondsAfterFinished=1))
        (ttl_pod,) = step("ttl-worker", lambda: until(
            lambda: (p := [x for x in jobs.live_pods(TTL_JOB) if x.status.phase == "Running"]) and p,
            "the TTL job's worker running", timeout, op, fail_fast))  # fmt: skip
        cluster.succeed_pod(ns, ttl_pod.metadata.name, SUCCESS)
        step("ttl-deleted", lambda: until(lambda: not jobs.exists(TTL_JOB), "the TTL job deleted after its TTL",
                                          timeout, op, fail_fast))  # fmt: skip
        teacher_life(cluster, ns, op, step, timeout=timeout, fail_fast=fail_fast)
        schedule_life(cluster, ns, op, step, timeout=timeout, fail_fast=fail_fast)
    except AssertionError as exc:
        life.failed_step = _next_step(life.steps)
        life.error = str(exc)[:500]
    except client.ApiException as exc:
        life.failed_step = _next_step(life.steps)
        life.error = f"HTTP {exc.status}: {exc.reason}"
    life.forbidden = op.forbidden()
    return life


def teacher_life(cluster: Cluster, ns: str, op: Operator, step: Callable[[str, Callable[[], Any]], Any], *,
                 timeout: float, fail_fast: bool) -> None:  # fmt: skip
    """teacher.serve: the teacher's Deployment and Service, its pod replaced, both deleted at the end."""
    jobs, apps = Jobs(cluster, ns), client.AppsV1Api(cluster.api_client())
    teacher = f"{TEACHER_JOB}-teacher"
    body = job_body(TEACHER_JOB, nodes=1, gpus=1, serving=False)
    body["spec"]["teacher"] = {"model": "pvc://models/teacher", "serve": {"enabled": True, "gpusPerReplica": 0}}
    jobs.create(body)

    def teacher_pods() -> list[Any]:
        return [p for p in jobs.core.list_namespaced_pod(ns, label_selector=f"kdistill.io/job={TEACHER_JOB},"
                                                         "kdistill.io/role=teacher").items
                if p.metadata.deletion_timestamp is None and p.status.phase == "Running"]  # fmt: skip

    def available() -> bool:
        return (apps.read_namespaced_deployment(teacher, ns).status.available_replicas or 0) >= 1

    step("teacher", lambda: until(lambda: available() and jobs.core.read_namespaced_service(teacher, ns),
                                  "the teacher available, with its Service", timeout, op, fail_fast))  # fmt: skip
    (worker,) = step("teacher-worker", lambda: until(
        lambda: (p := [x for x in jobs.live_pods(TEACHER_JOB) if x.status.phase == "Running"
                       and x.metadata.labels.get("kdistill.io/role") == "worker"]) and p,
        "the served-teacher job's worker running", timeout, op, fail_fast))  # fmt: skip
    (victim,) = teacher_pods()
    jobs.core.delete_namespaced_pod(victim.metadata.name, ns, grace_period_seconds=0)
    step("teacher-replaced", lambda: until(
        lambda: [p for p in teacher_pods() if p.metadata.name != victim.metadata.name] and available()
        and (jobs.status(TEACHER_JOB).get("teacher") or {}).get("state") == "Ready",
        "a replacement teacher pod, ready", timeout, op, fail_fast))  # fmt: skip
    assert jobs.status(TEACHER_JOB).get("restarts") == 0, jobs.status(TEACHER_JOB)
    cluster.succeed_pod(ns, worker.metadata.name, SUCCESS)
    step("teacher-deleted", lambda: until(
        lambda: jobs.status(TEACHER_JOB).get("phase") == "Succeeded"
        and not [d for d in apps.list_namespaced_deployment(ns).items if d.metadata.name == teacher]
        and not [s for s in jobs.core.list_namespaced_service(ns).items if s.metadata.name == teacher],
        "the teacher's Deployment and Service deleted after success", timeout, op, fail_fast))  # fmt: skip


def schedule_life(cluster: Cluster, ns: str, op: Operator, step: Callable[[str, Callable[[], Any]], Any], *,
                  timeout: float, fail_fast: bool) -> None:  # fmt: skip
    """A schedule whose last run was long ago starts a run at once; the run succeeds, is judged
    (the schedule's status), promoted and rolled out as the schedule's serving Deployment."""
    jobs, apps = Jobs(cluster, ns), client.AppsV1Api(cluster.api_client())
    api = client.CustomObjectsApi(cluster.api_client())
    template = job_body("x", nodes=1, gpus=1)["spec"]
    del template["data"]
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DistillationSchedule", "metadata": {"name": SCHEDULE},
            "spec": {"schedule": "* * * * *", "suspend": True, "data": {"partitions": "pvc://data/parts/"},
                     "jobTemplate": {"spec": template}}}  # fmt: skip
    api.create_namespaced_custom_object(GROUP, VERSION, ns, "distillationschedules", body)
    # As admin, as if its last run were long past; then resumed: a run is due at once.
    long_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 600))
    api.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "distillationschedules", SCHEDULE,
                                              {"status": {"lastScheduleTime": long_ago}})  # fmt: skip
    api.patch_namespaced_custom_object(GROUP, VERSION, ns, "distillationschedules", SCHEDULE,
                                       {"spec": {"suspend": False}})  # fmt: skip

    def runs() -> list[str]:
        selector = f"kdistill.io/schedule={SCHEDULE}"
        items = api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, label_selector=selector)["items"]
        return [j["metadata"]["name"] for j in items]

    (run,) = step("schedule-run", lambda: until(runs, "the schedule's run created", timeout, op, fail_fast))
    (worker,) = until(lambda: (p := [x for x in jobs.live_pods(run) if x.status.phase == "Running"]) and p,
                      "the scheduled run's worker running", timeout, op, fail_fast)  # fmt: skip
    cluster.succeed_pod(ns, worker.metadata.name, SUCCESS)

    def promoted() -> bool:
        status = api.get_namespaced_custom_object(GROUP, VERSION, ns, "distillationschedules", SCHEDULE).get("status")
        return bool((status or {}).get("promoted"))

    step("schedule-promoted", lambda: until(
        lambda: promoted() and apps.read_namespaced_deployment(f"{SCHEDULE}-serving", ns),
        "the run promoted and rolled out", timeout, op, fail_fast))  # fmt: skip


STEPS = ["create", "workers", "running", "progress", "progress-seen", "restart", "restarts-counted", "succeeded",
         "rollout", "scaled", "deleted", "ttl-worker", "ttl-deleted", "teacher", "teacher-worker", "teacher-replaced",
         "teacher-deleted", "schedule-run", "schedule-promoted"]  # fmt: skip


def _next_step(done: list[str]) -> str:
    return STEPS[len(done)] if len(done) < len(STEPS) else "after the last step"


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    install_crd(cluster, tmp_path_factory.mktemp("crd"))


CLAIMS = ["ckpt", "models", "data"]  # job_body's checkpoint volume and pvc:// sources
CKPT_CLASS = "kdistill-rbac-test"


def checkpoint_pv(cluster: Cluster, ns: str) -> str:
    """A PV pre-bound to the claim the operator will create for the life's job."""
    from kdistill.operator import names

    pv = f"{ns}-ckpt-{JOB}"
    cluster.core().create_persistent_volume({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany", "ReadWriteOnce"],
                 "hostPath": {"path": f"/tmp/kdistill-pv/{pv}"}, "storageClassName": CKPT_CLASS,
                 "persistentVolumeReclaimPolicy": "Retain",
                 "claimRef": {"namespace": ns, "name": names.checkpoint_claim(JOB)}},
    })  # fmt: skip
    return pv


@dataclass
class Setup:
    release_ns: str
    job_ns: str
    objs: list[dict[str, Any]]


@pytest.fixture
def setup(cluster: Cluster, crd: None) -> Iterator[Setup]:
    # A cluster-mode operator sees every namespace. In one that an earlier test is still deleting,
    # the API server refuses new objects (Events too) with 403 "being terminated", which this
    # file would count as an RBAC denial: start only once no namespace is terminating.
    core = cluster.core()
    until_quiet = time.monotonic() + 180
    while any(ns.status.phase == "Terminating" for ns in core.list_namespace().items):
        assert time.monotonic() < until_quiet, "namespaces of earlier tests still terminating after 180 s"
        time.sleep(1)
    release_ns = cluster.create_namespace("kd-system")
    job_ns = cluster.create_namespace("kd-jobs")
    make_claims(cluster, job_ns, CLAIMS)
    pv = checkpoint_pv(cluster, job_ns)
    objs = chart_rbac(release_ns)
    try:
        yield Setup(release_ns, job_ns, objs)
    finally:
        cluster.kubectl("delete", "pv", pv, "--ignore-not-found", "--wait=false", check=False)
        delete_cluster_scoped(cluster)
        empty_namespace(cluster, job_ns)
        for ns in (job_ns, release_ns):
            cluster.core().delete_namespace(ns)
        delete_claims(cluster, job_ns, CLAIMS)


def empty_namespace(cluster: Cluster, ns: str) -> None:
    """Serving Deployments, pods (at once, no grace) and claims deleted before the namespace: the
    namespace controller starts 5 s after the namespace's deletion and then finds them gone, where
    pods in their grace period and protected claims would each cost it another pass (and the next
    test's setup that much longer a wait for the namespace to terminate)."""
    apps = client.AppsV1Api(cluster.api_client())
    apps.delete_collection_namespaced_deployment(ns, propagation_policy="Background")
    core = cluster.core()
    core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
    core.delete_collection_namespaced_persistent_volume_claim(ns)


def run_life(cluster: Cluster, s: Setup, objs: list[dict[str, Any]], tmp_path: Path, *, watch: list[str],
             timeout: float, fail_fast: bool) -> Life:  # fmt: skip
    apply(cluster, objs)
    op = start_operator(cluster, s.release_ns, tmp_path, watch=watch)
    try:
        return job_life(cluster, s.job_ns, op, timeout=timeout, fail_fast=fail_fast)
    finally:
        op.proc.stop()


# -- the tests ---------------------------------------------------------------------------------------


def test_the_charts_rules_are_exactly_the_ones_under_test(setup: Setup) -> None:
    (cluster_role,) = [o for o in setup.objs if o["kind"] == "ClusterRole"]
    assert cluster_role["rules"] == CLUSTER_ROLE_RULES
    (lease_role,) = [o for o in setup.objs if o["kind"] == "Role"]
    assert lease_role["rules"] == LEASE_ROLE_RULES
    # ttlSecondsAfterFinished: the operator deletes the finished job itself.
    assert {"apiGroups": ["kdistill.io"], "resources": ["distillationjobs"], "verbs": ["delete"]} in cluster_role[
        "rules"
    ]
    for obj in setup.objs:
        for rule in obj.get("rules") or []:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]


def test_a_jobs_whole_life_with_the_charts_cluster_mode_rbac_is_never_forbidden(
    cluster: Cluster, setup: Setup, tmp_path: Path
) -> None:
    life = run_life(cluster, setup, setup.objs, tmp_path, watch=[], timeout=90, fail_fast=False)
    assert life.failed_step is None, f"the life stopped at {life.failed_step}: {life.error}"
    assert life.steps == STEPS
    assert life.forbidden == []


def test_a_jobs_whole_life_with_the_charts_namespaced_mode_rbac_is_never_forbidden(
    cluster: Cluster, setup: Setup, tmp_path: Path
) -> None:
    objs = chart_rbac(setup.release_ns, {"watch.mode": "namespaced", "watch.namespaces": [setup.job_ns]})
    (cluster_role,) = [o for o in objs if o["kind"] == "ClusterRole"]
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == {"nodes", "customresourcedefinitions",
                                                                                "namespaces"}  # fmt: skip
    life = run_life(cluster, setup, objs, tmp_path, watch=[setup.job_ns], timeout=90, fail_fast=False)
    assert life.failed_step is None, f"the life stopped at {life.failed_step}: {life.error}"
    assert life.forbidden == []
    # Namespaced mode cannot touch another namespace.
    other = cluster.create_namespace("kd-other")
    try:
        sa = cluster.serviceaccount_kubeconfig(setup.release_ns, OPERATOR)
        denied = cluster.kubectl("auth", "can-i", "create", "pods", "-n", other, kubeconfig=sa, check=False)
        assert denied.stdout.strip() == "no"
    finally:
        cluster.core().delete_namespace(other)


NAMESPACED_MODE_RULES = _rules("namespaced-mode.yaml")


@pytest.mark.parametrize("rule", NAMESPACED_MODE_RULES, ids=_rule_id)
def test_without_the_namespaced_mode_rule_kopf_is_refused(
    cluster: Cluster, setup: Setup, tmp_path: Path, rule: dict[str, Any]
) -> None:
    objs = chart_rbac(setup.release_ns, {"watch.mode": "namespaced", "watch.namespaces": [setup.job_ns]})
    life = run_life(cluster, setup, without(objs, "ClusterRole", rule), tmp_path, watch=[setup.job_ns],
                    timeout=60, fail_fast=True)  # fmt: skip
    _assert_forbidden(life, rule)


@pytest.mark.parametrize("rule", CLUSTER_ROLE_RULES, ids=_rule_id)
def test_without_any_single_cluster_role_rule_some_part_of_the_life_fails(
    cluster: Cluster, setup: Setup, tmp_path: Path, rule: dict[str, Any]
) -> None:
    life = run_life(cluster, setup, without(setup.objs, "ClusterRole", rule), tmp_path, watch=[], timeout=60,
                    fail_fast=True)  # fmt: skip
    _assert_forbidden(life, rule)


@pytest.mark.parametrize("rule", LEASE_ROLE_RULES, ids=_rule_id)
def test_without_any_single_lease_role_rule_the_operator_is_refused_and_never_acts(
    cluster: Cluster, setup: Setup, tmp_path: Path, rule: dict[str, Any]
) -> None:
    life = run_life(cluster, setup, without(setup.objs, "Role", rule), tmp_path, watch=[], timeout=60,
                    fail_fast=True)  # fmt: skip
    _assert_forbidden(life, rule)
    assert "workers" not in life.steps, "the operator acted without holding its Lease"


def _assert_forbidden(life: Life, rule: dict[str, Any]) -> None:
    """The proof is a Forbidden request, not a slow step: on a loaded machine a timeout proves nothing."""
    print(f"\nwithout {_rule_id(rule)}: life stopped at {life.failed_step}; first refusal: "
          f"{life.forbidden[0][:240] if life.forbidden else '-'}")  # fmt: skip
    assert life.forbidden, (
        f"without {_rule_id(rule)} no request was Forbidden (life stopped at {life.failed_step}: {life.error}): "
        "the rule is more than the operator needs"
    )


def test_the_worker_role_allows_rank_0_its_own_jobs_progress_and_nothing_else(
    cluster: Cluster, setup: Setup, tmp_path: Path
) -> None:
    """The Role the operator creates for a job's workers: every rule is needed, nothing more is allowed."""
    apply(cluster, setup.objs)
    op = start_operator(cluster, setup.release_ns, tmp_path, watch=[])
    jobs = Jobs(cluster, setup.job_ns)
    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    try:
        jobs.create(job_body(JOB, nodes=2, gpus=2))
        jobs.create(job_body("neighbour", nodes=1, gpus=1, serving=False))
        pods = until(lambda: jobs.live_pods(JOB), "worker pods", 60, op, fail_fast=True)
        account = pods[0].spec.service_account_name
        role = until(lambda: next((r for r in rbac.list_namespaced_role(setup.job_ns).items
                                   if any(s.name == account for b in rbac.list_namespaced_role_binding(
                                       setup.job_ns).items if b.role_ref.name == r.metadata.name
                                       for s in b.subjects or [])), None),
                     "the worker Role", 30, op, fail_fast=True)  # fmt: skip
        rules = [r.to_dict() for r in role.rules]
        rank0 = worker_api(cluster, setup.job_ns, account)
        report_progress(rank0, setup.job_ns, JOB, 7)
        until(lambda: jobs.status(JOB).get("step") == 7, "rank 0's progress", 30, op, fail_fast=True)
        sa_kc = cluster.serviceaccount_kubeconfig(setup.job_ns, account)

        def can(*args: str) -> bool:
            out = cluster.kubectl("auth", "can-i", *args, "-n", setup.job_ns, kubeconfig=sa_kc, check=False)
            return out.stdout.strip() == "yes"

        # Nothing beyond its own job's status: not the neighbour's, not the spec, not pods or secrets.
        assert can("patch", f"distillationjobs.{GROUP}/{JOB}", "--subresource=status")
        assert not can("patch", f"distillationjobs.{GROUP}/neighbour", "--subresource=status")
        assert not can("patch", f"distillationjobs.{GROUP}/{JOB}")
        assert not can("delete", f"distillationjobs.{GROUP}/{JOB}")
        assert not can("list", "pods")
        assert not can("get", "secrets")
        with pytest.raises(client.ApiException) as denied:
            report_progress(rank0, setup.job_ns, "neighbour", 1)
        assert denied.value.status == 403
        # Every rule is needed: without it, rank 0's report is Forbidden. The operator is stopped
        # first, so that its next reconcile does not put the rule back.
        op.proc.stop()
        for rule in rules:
            current = rbac.read_namespaced_role(role.metadata.name, setup.job_ns)
            current.rules = [client.V1PolicyRule(**r) for r in rules if r != rule]
            rbac.replace_namespaced_role(role.metadata.name, setup.job_ns, current)
            assert _forbidden_soon(lambda: report_progress(rank0, setup.job_ns, JOB, 8)), (
                f"rank 0 could still report progress without {rule}"
            )
    finally:
        op.proc.stop()


def _forbidden_soon(call: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Whether `call` is refused with 403 within `timeout` (RBAC changes take effect within moments)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            call()
        except client.ApiException as exc:
            if exc.status == 403:
                return True
            raise
        time.sleep(0.3)
    return False
