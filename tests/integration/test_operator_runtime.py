"""How the operator process itself runs, on the real control plane: `--kubeconfig` reaches
every client whatever the environment says, every replica (a standby too) answers /healthz,
and worker pods get the image pull policy and user the operator was installed with."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.cluster import Cluster
from tests.operator import cluster_helpers as h
from tests.operator.cluster_helpers import Jobs, eventually, free_port, job_body

pytestmark = pytest.mark.cluster
lease_namespace, claims = h.lease_namespace, h.claims


def _file_kubeconfig(admin: Path, folder: Path) -> Path:
    """The admin kubeconfig with its CA and token moved to files named relative to it: forms
    kopf's own kubeconfig reader does not understand (it ignores tokenFile and reads paths
    relative to the working directory)."""
    config = yaml.safe_load(admin.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    cluster = config["clusters"][0]["cluster"]
    (folder / "ca.crt").write_bytes(base64.b64decode(cluster.pop("certificate-authority-data")))
    cluster["certificate-authority"] = "ca.crt"
    user = config["users"][0]["user"]
    (folder / "token").write_text(user.pop("token"))
    user["tokenFile"] = "token"
    path = folder / "kubeconfig.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def _healthz(port: int) -> tuple[int, dict[str, object]] | None:
    """(HTTP status, body), or None while nothing listens (between the standby's server and kopf's)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except OSError:
        return None


def test_kubeconfig_flag_health_of_every_replica_and_pod_user(
    cluster: Cluster, claims: str, lease_namespace: str, tmp_path: Path
) -> None:
    kubeconfig = _file_kubeconfig(cluster.kubeconfig, tmp_path / "kc")
    bogus = tmp_path / "bogus.yaml"
    bogus.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    ops = []
    ports = [free_port(), free_port()]
    try:
        for i, port in enumerate(ports):
            op = h.operator_for(
                cluster,
                claims,
                lease_namespace,
                tmp_path / f"operator-{i}.log",
                # the environment points elsewhere: only the flag may count
                env={"KUBECONFIG": str(bogus), "KDISTILL_IMAGE_PULL_POLICY": "Never"},
            )
            op.argv[op.argv.index("--kubeconfig") + 1] = str(kubeconfig)
            op.argv += ["--health-port", str(port)]
            ops.append(op.start())
            if i == 0:
                op.wait_started()
        leader, standby = ops
        eventually(
            lambda: any("waiting for lease" in line.get("message", "") for line in standby.log_lines()),
            "standby waiting",
            60,
        )
        # every replica answers its probes; only the leader runs kopf
        assert eventually(lambda: _healthz(ports[1]), "standby /healthz", 30) == (
            200,
            {"leader": False, "standby": True, "lease": f"{lease_namespace}/op-{claims}"},
        )
        status, probes = eventually(lambda: _healthz(ports[0]), "leader /healthz", 60)
        assert status == 200 and probes["leader"] is True and "queue" in probes

        # the leader reaches the API server through the flag's kubeconfig (kopf's watches included)
        jobs = Jobs(cluster, claims)
        jobs.create(job_body("runtime", nodes=1, gpus=1))
        (pod,) = jobs.wait_running_gang("runtime", 1, attempt=0, timeout=90)
        jobs.wait_phase("runtime", "Running", 60)
        c = pod.spec.containers[0]
        assert c.image_pull_policy == "Never"
        assert pod.spec.security_context.run_as_user == 65532 and c.security_context.run_as_user == 65532
        env = {e.name: e.value for e in c.env}
        assert env["USER"] == "kdistill" and env["HOME"] == "/tmp"
        assert standby.alive()

        # the standby takes over on a clean stop and its port is then kopf's
        assert leader.stop() == 0
        eventually(
            lambda: any("acquired lease" in line.get("message", "") for line in standby.log_lines()),
            "standby took the lease",
            60,
        )
        eventually(
            lambda: (r := _healthz(ports[1])) is not None and r[0] == 200 and r[1].get("leader") is True,
            "the new leader's kopf /healthz",
            90,
        )
    finally:
        for op in ops:
            code = op.stop()
            print(op.log_path.name, op.log_path.read_text()[-2500:])
        # kopf retries (e.g. a 429 while the CRD's storage initialises) are fine; auth failures are not
        denied = [
            line
            for op in ops
            for line in op.log_lines()
            if any(w in str(line.get("message", "")) for w in ("Forbidden", "Unauthorized", "anonymous"))
        ]
        assert not denied, denied[:3]
    assert code == 0
