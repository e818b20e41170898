"""Rung 4: a job whose teacher runs as its own Deployment, on real pods.

The operator starts `<job>-teacher` (kdistill serve of the quickstart teacher) first and the two
worker pods only once it is ready; the workers load no teacher weights and distil on-policy and
then from the served teacher's log-probs, exchanging top-k compressed momenta between the two
data-parallel ranks (the checkpoints hold each rank's residuals past the warm-up and ramp). Mid-run
the teacher's pod is killed: its Deployment
replaces it, the trainer's client waits for it, and the gang is not restarted. At the end the
student serves and the teacher's objects are gone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kdistill.api import parse_job

from .cluster.cluster import E2ECluster, shared_root
from .conftest import NAMESPACE, wait
from .diagnose import explained
from .support import REPO, RESULTS, volumes_manifest

JOB = "e2e-served"
JOB_FILE = REPO / "e2e" / "jobs" / "served-teacher-on-policy.yaml"
TEACHER = f"{JOB}-teacher"
GROUP, VERSION, PLURAL = "kdistill.io", "v1alpha1", "distillationjobs"


def _status(api: client.CustomObjectsApi) -> dict[str, Any]:
    obj = api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, JOB)
    status = dict(obj.get("status") or {})
    if status.get("phase") == "Failed":
        raise AssertionError(f"the job failed: {status.get('conditions')}")
    return status


def _assert_compressed(job_root: Path) -> None:
    """The last checkpoint holds both ranks' top-k residuals and a hook step past the job's dense
    warm-up and density ramp, so compressed steps ran."""
    from safetensors.torch import load_file

    spec = parse_job(yaml.safe_load(JOB_FILE.read_text())).spec
    compressed_from = spec.parallelism.gradient_compression.warmup_steps + spec.compression_ramp_steps
    files = sorted(job_root.rglob("compression.safetensors"), key=lambda f: f.stat().st_mtime)
    assert files, f"no compression.safetensors under {job_root}"
    saved = load_file(str(files[-1]))
    assert {"rank0", "rank1"} <= set(saved), sorted(saved)
    assert int(saved["hook_step"][0]) > compressed_from, (int(saved["hook_step"][0]), compressed_from)
    assert float(saved["rank0"].abs().sum()) > 0  # unsent mass: the exchange was sparse


def _pods(core: client.CoreV1Api, selector: str) -> list[client.V1Pod]:
    return list(core.list_namespaced_pod(NAMESPACE, label_selector=selector).items)


def _teacher_ready(apps: client.AppsV1Api) -> bool:
    try:
        dep = apps.read_namespaced_deployment(TEACHER, NAMESPACE)
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return (dep.status.available_replicas or 0) >= 1


def _teacher_selector(apps: client.AppsV1Api) -> str:
    labels = apps.read_namespaced_deployment(TEACHER, NAMESPACE).spec.selector.match_labels
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _env(pod: client.V1Pod, name: str) -> str | None:
    return next((e.value for e in pod.spec.containers[0].env or [] if e.name == name), None)


@pytest.mark.timeout(3600)
def test_served_teacher_job_survives_teacher_loss_and_serves(
    cluster: E2ECluster, operator: str, images: dict[str, str], pvc_root: Path,
) -> None:  # fmt: skip
    core, apps = cluster.core(), client.AppsV1Api(cluster.api_client())
    api = client.CustomObjectsApi(cluster.api_client())
    manifest, folders = volumes_manifest(shared_root(), NAMESPACE)
    subprocess.run(["rm", "-rf", str(folders["e2e-ckpt"] / NAMESPACE / JOB)], check=True)
    cluster.kubectl("apply", "-f", "-", input_text=manifest)
    workers = f"kdistill.io/job={JOB},kdistill.io/role=worker"
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(JOB_FILE))
    samples: list[dict[str, Any]] = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    passed = False
    try:
        # 1. The teacher comes first; no worker pod exists until it is ready.
        def teacher_ready_before_workers() -> bool:
            ready = _teacher_ready(apps)
            samples.append({"teacher_ready": ready, "workers": len(_pods(core, workers))})
            return ready

        wait(teacher_ready_before_workers, "the teacher Deployment to be ready", 900)
        early = [s for s in samples if not s["teacher_ready"]]
        assert early and all(s["workers"] == 0 for s in early), f"workers before the teacher was ready: {early}"

        # 2. The workers start with the teacher's URL, on the trainer image, and train.
        wait(lambda: len(_pods(core, workers)) == 2, "both worker pods", 300)
        urls = {_env(p, "KDISTILL_TEACHER_URL") for p in _pods(core, workers)}
        assert all(u and u.startswith(f"http://{TEACHER}.{NAMESPACE}.svc") for u in urls), urls
        wait(lambda: (_status(api).get("step") or 0) >= 5, "training progress in status", 900)

        # 3. The teacher's pod is killed mid-run: its Deployment replaces it, the gang goes on.
        before = _status(api)
        victim = _pods(core, _teacher_selector(apps))[0].metadata.name
        cluster.kubectl("delete", "pod", victim, "-n", NAMESPACE, "--grace-period=0", "--force", check=False)
        wait(lambda: _teacher_ready(apps) and all(p.metadata.name != victim
                                                  for p in _pods(core, _teacher_selector(apps))),
             "a replacement teacher pod", 600)  # fmt: skip
        wait(lambda: (_status(api).get("step") or 0) > before["step"], "training past the step of the kill", 900)
        # The workers' own account of the outage, read while they still run.
        logs = "".join(cluster.kubectl("logs", "-n", NAMESPACE, p.metadata.name, check=False).stdout
                       for p in _pods(core, workers))  # fmt: skip
        (RESULTS / "served-teacher-workers.log").write_text(logs)

        # 4. Success without a gang restart; the INT8 student serves; the teacher is gone.
        wait(lambda: _status(api).get("phase") == "Succeeded", "the job to succeed", 1800)
        final = _status(api)
        assert (final.get("restarts") or 0) == 0, f"the gang restarted: {final}"
        dep = apps.read_namespaced_deployment(f"{JOB}-serving", NAMESPACE)
        assert (dep.status.available_replicas or 0) >= 1
        _assert_compressed(folders["e2e-ckpt"] / NAMESPACE / JOB)
        wait(lambda: not _teacher_ready(apps) and not cluster.kubectl(
            "get", "deployments,services", "-n", NAMESPACE, "-o", "name", "--ignore-not-found",
            TEACHER).stdout.strip(), "the teacher's objects to go", 300)  # fmt: skip
        cluster.kubectl("delete", "dj", JOB, "-n", NAMESPACE, "--wait=true", timeout=300)
        passed = True
    except Exception as exc:
        raise explained(exc, cluster, NAMESPACE, f"kdistill.io/job={JOB}", operator) from exc
    finally:
        (RESULTS / "served-teacher-samples.json").write_text(json.dumps(samples[-50:], indent=1) + "\n")
        if not passed:
            events = cluster.kubectl("get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp", check=False)
            (RESULTS / "served-teacher-events.txt").write_text(events.stdout)
