"""Rung 4: a DistillationSchedule's two rounds on real pods; the second promoted through a canary
while a load generator runs, with no failed request during the switch.

The schedule runs every minute over a drifting corpus on the data volume. Round 1 trains on the
partitions there are and is promoted at once (no student is served yet): `<schedule>-serving`
serves it. A load generator pod then sends completions to that Service without pause, and a new
partition arrives. Round 2 trains on it, warm-started from round 1's student, passes the gate and
serves beside the champion as `<schedule>-serving-canary`; the operator judges it on the servers'
own /metrics under that load, promotes it (the stable Deployment rolls to its model) and deletes
the canary. Every request the load generator sent answered 200.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kdistill.trainer.drift_corpus import build_drift_partitions

from .cluster.cluster import E2ECluster, shared_root
from .conftest import NAMESPACE, wait
from .diagnose import explained
from .support import RESULTS, volumes_manifest

SCHEDULE = "e2e-nightly"
SERVING = f"{SCHEDULE}-serving"
GROUP, VERSION = "kdistill.io", "v1alpha1"
LOAD_POD = "e2e-load"

# Four clients without pause against the Service (the server batches them: on a busy machine two
# clients did not send the canary's 100 requests in 45 s); every 2 s a JSON line of the counts so far.
LOAD_CODE = """
import json, threading, time, urllib.error, urllib.request
URL = 'http://%(serving)s.%(ns)s.svc:8080/v1/completions'
BODY = json.dumps({'model': '%(schedule)s', 'prompt': 'def ', 'max_tokens': 4}).encode()
counts = {'ok': 0, 'failed': 0, 'errors': {}}
lock = threading.Lock()
def client():
    while True:
        try:
            req = urllib.request.Request(URL, data=BODY, headers={'Content-Type': 'application/json'})
            urllib.request.urlopen(req, timeout=30).read()
            key = None
        except urllib.error.HTTPError as exc:
            key = str(exc.code)
        except Exception as exc:
            key = type(exc).__name__
        with lock:
            if key is None:
                counts['ok'] += 1
            else:
                counts['failed'] += 1
                counts['errors'][key] = counts['errors'].get(key, 0) + 1
for _ in range(4):
    threading.Thread(target=client, daemon=True).start()
while True:
    time.sleep(2)
    with lock:
        print(json.dumps(counts), flush=True)
"""


def _schedule(partitions: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistillationSchedule",
        "metadata": {"name": SCHEDULE},
        "spec": {
            "schedule": "* * * * *",
            "concurrencyPolicy": "Forbid",
            "data": {"partitions": partitions, "window": 1, "replay": {"fraction": 0.2, "partitions": 2}},
            "warmStart": "lastPromoted",
            "promotion": {
                # The mechanics are under test here, not the students' quality: every round passes.
                "gate": {"minRetention": 0.01, "mustBeatServing": False, "maxForgetting": 1.0},
                "canary": {"weight": 50, "analysisSeconds": 90, "maxErrorRate": 0.01, "maxP99Ms": 20000},
            },
            "jobTemplate": {
                "spec": {
                    "task": "causal-lm",
                    "teacher": {"model": "pvc://models/quickstart-teacher"},
                    "student": {"fromTeacher": {"numLayers": 2}},
                    "data": {"maxSeqLength": 64},
                    "distillation": {
                        "stages": [{"name": "output", "steps": 10, "objectives": ["logits"]}],
                        "batchSize": 8,
                        "warmupSteps": 2,
                    },
                    "quantization": {"mode": "ptq-int8"},
                    "parallelism": {"nodes": 1, "gpusPerNode": 0},
                    "checkpoint": {"everySteps": 10, "keep": 1, "volume": {"claimName": "e2e-ckpt"}},
                    "failurePolicy": {"maxRestarts": 2, "backoffSeconds": 5},
                    "template": {"env": [{"name": "OMP_NUM_THREADS", "value": "1"}]},
                    "serving": {
                        "replicas": 1,
                        "qualityGate": {"minRetention": 0.01},
                        "batching": {"maxBatchSize": 8, "maxBatchTokens": 2048, "maxWaitMs": 5},
                    },
                }
            },
        },
    }


def _load_counts(cluster: E2ECluster) -> dict[str, Any]:
    out = cluster.kubectl("logs", "-n", NAMESPACE, LOAD_POD, "--tail", "1", check=False).stdout.strip()
    return dict(json.loads(out.splitlines()[-1])) if out else {}


@pytest.mark.timeout(3600)
def test_two_rounds_the_second_promoted_through_a_canary_under_load(
    cluster: E2ECluster, operator: str, images: dict[str, str], pvc_root: Path
) -> None:
    api = client.CustomObjectsApi(cluster.api_client())
    apps = client.AppsV1Api(cluster.api_client())
    manifest, folders = volumes_manifest(shared_root(), NAMESPACE)
    parts = folders["data"] / "drift"
    subprocess.run(["rm", "-rf", str(parts)], check=True)
    later = build_drift_partitions(parts, partitions=3)[-1]
    # The newest partition arrives after round 1 has started.
    held = parts.parent / f"drift-later-{later.name}"  # outside the folder: not a partition yet
    later.rename(held)
    cluster.kubectl("apply", "-f", "-", input_text=manifest)  # also makes the folders readable by the pods

    def status() -> dict[str, Any]:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "distillationschedules", SCHEDULE)
        return dict(obj.get("status") or {})

    def runs() -> list[str]:
        items = api.list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "distillationjobs", label_selector=f"kdistill.io/schedule={SCHEDULE}"
        )["items"]
        return sorted(j["metadata"]["name"] for j in items)

    api.create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, "distillationschedules", _schedule("pvc://data/drift/")
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    passed = False
    try:
        # 1. Round 1 starts on the first tick and is promoted at once: the schedule's serving.
        wait(lambda: len(runs()) == 1, "round 1", 180)
        held.rename(later)
        later.chmod(0o755)
        for f in later.iterdir():
            f.chmod(0o644)
        wait(lambda: (status().get("promoted") or {}).get("version") == 1, "round 1 promoted", 1800)
        first = status()["promoted"]["job"]
        wait(lambda: (apps.read_namespaced_deployment(SERVING, NAMESPACE).status.available_replicas or 0) >= 1,
             "the schedule's serving Deployment", 600)  # fmt: skip

        # 2. Load on the Service from here to the end.
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": LOAD_POD},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "c", "image": images["trainer"], "imagePullPolicy": "Never",
                                "command": ["python3", "-c", LOAD_CODE % {"serving": SERVING, "ns": NAMESPACE,
                                                                           "schedule": SCHEDULE}]}],
            },
        }  # fmt: skip
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input_text=json.dumps(pod))
        wait(lambda: _load_counts(cluster).get("ok", 0) > 20, "the load generator's first answers", 300)

        # 3. Round 2 (the held tick) trains on the new partition, from round 1's student.
        wait(lambda: len(runs()) >= 2, "round 2", 300)
        second = next(r for r in runs() if r != first)
        api.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "distillationschedules", SCHEDULE,
                                           {"spec": {"suspend": True}})  # fmt: skip
        job = api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "distillationjobs", second)
        assert job["spec"]["student"] == {"model": f"pvc://e2e-ckpt/{NAMESPACE}/{first}/student"}, job["spec"]

        # 4. It is judged as a canary beside the champion under the load, then promoted.
        canary_seen: list[dict[str, Any]] = []

        def promoted_twice() -> bool:
            st = status()
            if st.get("canary"):
                canary_seen.append(st["canary"])
            return (st.get("promoted") or {}).get("version") == 2

        wait(promoted_twice, "round 2 promoted through its canary", 2400, interval=1.0)
        assert any(c["state"] == "Analysing" for c in canary_seen), canary_seen
        plan = json.loads((folders["e2e-ckpt"] / NAMESPACE / second / "data" / "plan.json").read_text())
        assert plan["fresh"] == [later.name], plan
        history = status()["history"]
        assert [(e["job"], e["promoted"]) for e in history] == [(first, True), (second, True)], history
        assert "canary:" in history[-1]["reason"], history[-1]

        def deployments() -> set[str]:
            return {d.metadata.name for d in apps.list_namespaced_deployment(NAMESPACE).items}

        wait(lambda: SERVING + "-canary" not in deployments(), "the canary Deployment gone", 300)
        dep = apps.read_namespaced_deployment(SERVING, NAMESPACE)
        assert dep.metadata.annotations["kdistill.io/model-path"].endswith(f"/{second}/student-int8")
        wait(lambda: (apps.read_namespaced_deployment(SERVING, NAMESPACE).status.available_replicas or 0) >= 1
             and (apps.read_namespaced_deployment(SERVING, NAMESPACE).status.updated_replicas or 0) >= 1,
             "the promoted stable Deployment rolled out", 600)  # fmt: skip

        # 5. Not one request failed, from before the canary to after the switch.
        counts = _load_counts(cluster)
        (RESULTS / "schedule-canary-load.json").write_text(json.dumps(counts) + "\n")
        assert counts["ok"] > 100 and counts["failed"] == 0, counts
        passed = True
    except Exception as exc:
        raise explained(exc, cluster, NAMESPACE, "kdistill.io/job", operator) from exc
    finally:
        (RESULTS / "schedule-canary-status.json").write_text(json.dumps(status(), indent=1) + "\n")
        if not passed:
            events = cluster.kubectl("get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp", check=False)
            (RESULTS / "schedule-canary-events.txt").write_text(events.stdout)
        cluster.kubectl("delete", "pod", LOAD_POD, "-n", NAMESPACE, "--wait=false", check=False)
        cluster.kubectl("delete", "distillationschedule", SCHEDULE, "-n", NAMESPACE, "--wait=true", timeout=300,
                        check=False)  # fmt: skip
