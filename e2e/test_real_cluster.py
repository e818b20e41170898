"""Rung 4: the operator, trainer and server as real pods on a real multi-node cluster.

`make e2e`. Slow (tens of minutes on 2 shared cores); it is not part of `pytest tests/`.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from .cluster.cluster import E2ECluster, shared_root
from .conftest import NAMESPACE, wait
from .diagnose import explained
from .support import REPO, RESULTS, StatusLog, volumes_manifest, write_transcript

JOB = "e2e-student"
JOB_FILE = REPO / "e2e" / "jobs" / "two-node-cpu.yaml"
GROUP, VERSION, PLURAL = "kdistill.io", "v1alpha1", "distillationjobs"


def _python_pod(name: str, image: str, node: str, code: str, labels: dict[str, str] | None = None,
                hostname: str = "", subdomain: str = "") -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {
        "nodeName": node, "restartPolicy": "Never",
        "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never",
                        "command": ["python3", "-c", code]}],
    }  # fmt: skip
    if hostname:
        spec.update(hostname=hostname, subdomain=subdomain)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}}, "spec": spec}


# Session fixtures (image builds, the cluster, a multi-GB image load) count towards the first test.
@pytest.mark.timeout(7200)
def test_pod_network_and_cluster_dns(cluster: E2ECluster, images: dict[str, str]) -> None:
    """A pod on node 2 finds a pod on node 1 as <pod>.<service>.<ns>.svc and talks to it over TCP."""
    ns = "e2e-net"
    cluster.kubectl("create", "namespace", ns)
    server_code = (
        "import http.server as h\n"
        "class H(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'hello from node 1')\n"
        "h.HTTPServer(('', 8000), H).serve_forever()\n"
    )
    client_code = (
        "import socket, time, urllib.request\n"
        "name = 'srv.peers.e2e-net.svc'\n"
        "for _ in range(60):\n"
        "    try:\n"
        "        addr = socket.gethostbyname(name); break\n"
        "    except OSError: time.sleep(1)\n"
        "for _ in range(60):\n"
        "    try:\n"
        "        body = urllib.request.urlopen(f'http://{name}:8000/', timeout=3).read().decode(); break\n"
        "    except OSError: time.sleep(1)\n"
        "print(addr, body)\n"
    )
    nodes = [n.name for n in cluster.nodes]
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "peers"},
         "spec": {"clusterIP": "None", "selector": {"app": "peer"}, "ports": [{"port": 8000}]}},
        _python_pod("srv", images["operator"], nodes[0], server_code, {"app": "peer"}, "srv", "peers"),
        _python_pod("cli", images["operator"], nodes[1], client_code),
    ]  # fmt: skip
    cluster.kubectl("apply", "-n", ns, "-f", "-", input_text="\n---\n".join(json.dumps(d) for d in docs))
    core = cluster.core()
    wait(lambda: core.read_namespaced_pod("cli", ns).status.phase in ("Succeeded", "Failed"), "client pod", 180)
    srv_ip = core.read_namespaced_pod("srv", ns).status.pod_ip
    out = cluster.kubectl("logs", "-n", ns, "cli").stdout.split()
    cluster.kubectl("delete", "namespace", ns, "--wait=false")
    assert core.read_namespaced_pod("srv", ns).spec.node_name != core.read_namespaced_pod("cli", ns).spec.node_name
    assert out[0] == srv_ip, f"DNS gave {out[0]}, pod has {srv_ip}"
    assert " ".join(out[1:]) == "hello from node 1"


class _Watch:
    """Records what a user sees: `kubectl get dj -w`, and a status sample every second."""

    def __init__(self, cluster: E2ECluster) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.transcript = RESULTS / "get-dj-w.txt"
        self._fh = self.transcript.open("w")
        self._proc = subprocess.Popen([cluster.kubectl_binary, "get", "dj", "-n", NAMESPACE, "-w"],
                                      stdout=self._fh, stderr=subprocess.STDOUT, env=cluster.env())  # fmt: skip
        self.api = client.CustomObjectsApi(cluster.api_client())
        self.log = StatusLog()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def status(self) -> dict[str, Any]:
        """The job's status; a Failed job fails the test at once, with the operator's reason."""
        obj = self.api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, JOB)
        status = dict(obj.get("status") or {})
        if status.get("phase") == "Failed":
            raise AssertionError(f"the job failed: {status.get('conditions')}")
        return status

    def _poll(self) -> None:
        while not self._stop.is_set():
            # The job may not exist yet, or the API may be slow for a moment.
            with contextlib.suppress(Exception):
                self.log.record(self.status())
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._proc.terminate()
        self._proc.wait(10)
        self._fh.close()
        (RESULTS / "status-history.json").write_text(json.dumps(self.log.rows, indent=1) + "\n")


def _worker_pods(core: client.CoreV1Api) -> list[client.V1Pod]:
    return core.list_namespaced_pod(NAMESPACE, label_selector=f"kdistill.io/job={JOB},kdistill.io/role=worker").items


def _checkpoint_steps(ckpt_root: Path) -> list[str]:
    folder = ckpt_root / NAMESPACE / JOB / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.timeout(7200)
def test_two_node_job_survives_node_loss_and_serves(
    cluster: E2ECluster, operator: str, images: dict[str, str], pvc_root: Path,
) -> None:  # fmt: skip
    core = cluster.core()
    manifest, folders = volumes_manifest(shared_root(), NAMESPACE)
    ckpt_root = folders["e2e-ckpt"]
    subprocess.run(["rm", "-rf", str(ckpt_root / NAMESPACE)], check=True)
    cluster.kubectl("apply", "-f", "-", input_text=manifest)
    watch = _Watch(cluster)
    events = ""
    passed = False
    try:
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(JOB_FILE))

        # 1. Both workers run the real trainer on the two nodes and rendezvous over cluster DNS.
        wait(lambda: len(_worker_pods(core)) == 2 and all(p.status.phase == "Running" for p in _worker_pods(core)),
             "both worker pods Running", 600)  # fmt: skip
        wait(lambda: (watch.status().get("step") or 0) > 0, "training progress in status", 900)
        pods = _worker_pods(core)
        assert all(p.spec.containers[0].command[0] == "torchrun" for p in pods)
        assert all(p.spec.containers[0].image == images["trainer"] for p in pods)

        # 2. Checkpoints land on the shared volume; progress shows in `kubectl get dj`.
        # Rank 0 patches progress at most every 5 s and at each checkpoint, so on a quiet machine
        # status.step can sit on the checkpoint's step: wait for a checkpoint while training still runs.
        def checkpointed_while_running() -> bool:
            status = watch.status()
            return (
                (status.get("lastCheckpoint") or {}).get("step", 0) >= 10
                and status.get("phase") == "Running"
                and (status.get("step") or 0) < (status.get("totalSteps") or 0)
            )

        wait(checkpointed_while_running, "a checkpoint while training runs", 900, interval=0.5)
        assert _checkpoint_steps(ckpt_root), "no checkpoint on the volume"
        row = cluster.kubectl("get", "dj", JOB, "-n", NAMESPACE, "--no-headers").stdout
        assert "Running" in row and "%" in row, row

        # 3. A power cut on the node that runs worker 1.
        before = watch.status()
        ckpt_at_kill = before["lastCheckpoint"]["step"]
        victim_pod = next(p for p in _worker_pods(core) if p.metadata.name.endswith("-worker-1"))
        victim = cluster.node(victim_pod.spec.node_name)
        victim.kill()
        killed_at = time.time()

        # 4. The operator restarts the gang; training resumes from the checkpoint, not from 0.
        # (Until the new rank 0 reports, status.step still shows the step before the kill.)
        step_at_kill = before["step"]
        wait(lambda: (watch.status().get("restarts") or 0) >= 1, "the gang restart", 300)

        # 5. Success, then the INT8 student serves behind its Service.
        wait(lambda: watch.status().get("phase") == "Succeeded", "the job to succeed", 1800)
        final = watch.status()
        assert final["phase"] == "Succeeded", final
        # Where the new gang resumed: rank 0's result.json on the volume. The resumed run takes
        # seconds and its pods go once the job succeeds, so their logs may be gone by now.
        result = json.loads((ckpt_root / NAMESPACE / JOB / "result.json").read_text())
        assert result["attempt"] >= 1 and result["resumedFrom"] >= ckpt_at_kill, (result, ckpt_at_kill)
        # The status history, complete by now (the watch records every change, once a second):
        # after the restart no step below the checkpoint, and training got past the step of the kill.
        after = watch.log.steps_after_restart(1)
        assert after and min(after) >= ckpt_at_kill, (
            f"step went back: {after[:10]} after a checkpoint at {ckpt_at_kill}"
        )
        reported = [r["step"] for r in watch.log.rows if r["restarts"] == 0 and r["step"] is not None]
        high = max([step_at_kill, *reported])
        past = [r["t"] for r in watch.log.rows if r["restarts"] >= 1 and (r["step"] or 0) > high]
        assert past, f"training never passed step {high} after the restart: {after[:10]}"
        recovered_in = past[0] - killed_at
        apps = client.AppsV1Api(cluster.api_client())
        dep = apps.read_namespaced_deployment(f"{JOB}-serving", NAMESPACE)
        assert (dep.status.available_replicas or 0) >= 1
        assert final.get("endpoint", "").startswith(f"http://{JOB}-serving.{NAMESPACE}.svc")
        answer = _ask(cluster, images["operator"], final["endpoint"])
        text = answer["choices"][0]["text"]
        assert isinstance(text, str) and text.strip(), answer
        (RESULTS / "serving-answer.json").write_text(json.dumps(answer, indent=1) + "\n")

        # 6. Deleting the job leaves nothing behind.
        events = cluster.kubectl("get", "events", "-n", NAMESPACE, "--field-selector",
                                 f"involvedObject.name={JOB}", "--sort-by=.lastTimestamp").stdout  # fmt: skip
        (RESULTS / "events.txt").write_text(events)
        cluster.kubectl("delete", "dj", JOB, "-n", NAMESPACE, "--wait=true", timeout=300)

        def nothing_left() -> bool:
            kinds = "pods,services,configmaps,deployments,serviceaccounts,roles,rolebindings,poddisruptionbudgets"
            left = cluster.kubectl("get", kinds, "-n", NAMESPACE, "-o", "name", "-l", f"kdistill.io/job={JOB}").stdout
            serving = cluster.kubectl("get", "deployments,services", "-n", NAMESPACE, "-o", "name",
                                      "-l", f"kdistill.io/serving={JOB}-serving").stdout  # fmt: skip
            return not left.strip() and not serving.strip()

        wait(nothing_left, "the job's objects to go", 300)
        print(f"node lost -> training past the checkpoint again in {recovered_in:.0f}s")
        passed = True
    except Exception as exc:
        raise explained(exc, cluster, NAMESPACE, f"kdistill.io/job={JOB}", operator) from exc
    finally:
        watch.stop()
        if passed:
            # After stop(): the watch's file is complete. The README quotes lines of this file.
            write_transcript(watch.transcript.read_text(), events, NAMESPACE, JOB)
        if not cluster.nodes[0].running() or not all(n.running() for n in cluster.nodes):
            for n in cluster.nodes:
                if not n.running():
                    n.start()


def _ask(cluster: E2ECluster, image: str, endpoint: str) -> dict[str, Any]:
    """POST /v1/completions through the Service's DNS name, from a pod in the cluster."""
    code = (
        "import json, sys, urllib.request\n"
        f"req = urllib.request.Request('{endpoint}/v1/completions', data=json.dumps("
        f"{{'model': '{JOB}', 'prompt': 'def ', 'max_tokens': 8}}).encode(),"
        " headers={'Content-Type': 'application/json'})\n"
        "print(urllib.request.urlopen(req, timeout=60).read().decode())\n"
    )
    pod = _python_pod("ask", image, cluster.nodes[0].name, code)
    pod["spec"].pop("nodeName")
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input_text=json.dumps(pod))
    core = cluster.core()
    wait(lambda: core.read_namespaced_pod("ask", NAMESPACE).status.phase in ("Succeeded", "Failed"), "request", 180)
    out = cluster.kubectl("logs", "-n", NAMESPACE, "ask").stdout
    cluster.kubectl("delete", "pod", "ask", "-n", NAMESPACE, "--wait=false")
    return dict(json.loads(out))
