"""A real Kueue controller against the rung-3 control plane.

`make cluster-bins` builds Kueue from its Go module (hack/kueue) into
~/.cache/kdistill/kueue-<version>/bin/kueue and copies the module's CRDs and webhook
configurations into .../config. `start_kueue` installs those CRDs, runs the controller with
its internal certificate management off and its webhook server on a free loopback port with a
certificate signed by the cluster's CA, and points Kueue's own webhooks (those on
kueue.x-k8s.io objects) at it. Kueue reads its metrics certificate from the fixed path
/etc/kueue/metrics/certs when it manages no certificates itself: the process runs in its own
mount namespace where a read-only overlay adds that folder to /etc, and the host's /etc is
left untouched.

`Kueue.queues` then makes a ResourceFlavor for the GPU nodes, a ClusterQueue with
`nvidia.com/gpu` quota and a LocalQueue in a namespace.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import ssl
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from .binaries import MissingBinariesError, cache_root, module_version
from .cluster import Cluster
from .controlplane import free_port
from .pki import serving_cert
from .procs import Process, wait_for

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
KUEUE_NAMESPACE = "kueue-system"
# What the harness names its webhook configurations (cluster-scoped; deleted again on stop).
WEBHOOK_NAMES = {"MutatingWebhookConfiguration": "kdistill-kueue-mutating",
                 "ValidatingWebhookConfiguration": "kdistill-kueue-validating"}  # fmt: skip
GPU_FLAVOR = "gpu"
# The label kwok's GPU nodes carry (as NVIDIA's GPU feature discovery puts it on real ones).
GPU_NODE_LABEL = {"nvidia.com/gpu.present": "true"}
CRDS = ("workloads", "clusterqueues", "localqueues", "resourceflavors", "workloadpriorityclasses", "cohorts")


def kueue_dir() -> Path:
    """The cached Kueue (binary and config); a clear error naming `make cluster-bins` if missing."""
    version = module_version("kueue", "sigs.k8s.io/kueue")
    folder = cache_root() / f"kueue-{version}"
    needed = [folder / "bin" / "kueue", folder / "config" / "webhook" / "manifests.yaml"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise MissingBinariesError(
            "Kueue is not built; build it with `make cluster-bins` (bash scripts/cluster-bins.sh). Missing: "
            + ", ".join(missing)
        )
    return folder


def _webhooks(manifests: Path, url: str, ca: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, reduced to its own kinds and pointed at `url`."""
    out = []
    bundle = base64.b64encode(ca).decode()
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc:
            continue
        hooks = []
        for hook in doc.get("webhooks") or []:
            if any(GROUP not in rule.get("apiGroups", []) for rule in hook.get("rules") or []):
                continue  # the job integrations' webhooks (pods, batch Jobs, ...): not run here
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": bundle}
            hooks.append(hook)
        doc["metadata"] = {"name": WEBHOOK_NAMES[doc["kind"]]}
        doc["webhooks"] = hooks
        out.append(doc)
    return out


def _get(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@dataclass
class Kueue:
    cluster: Cluster
    process: Process
    workdir: Path
    _made: list[tuple[str, str | None, str]] = field(default_factory=list)  # (plural, namespace, name)

    def api(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.cluster.api_client())

    def create(self, plural: str, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", **body}
        api = self.api()
        if namespace is None:
            out = api.create_cluster_custom_object(GROUP, VERSION, plural, body)
        else:
            out = api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
        self._made.append((plural, namespace, body["metadata"]["name"]))
        return dict(out)

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        api = self.api()
        if namespace is None:
            return dict(api.get_cluster_custom_object(GROUP, VERSION, plural, name))
        return dict(api.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name))

    def queues(self, namespace: str, gpus: int, *, queue: str = "gpus", cpu: str = "1000", memory: str = "4Ti") -> str:
        """A ClusterQueue (for `namespace` only) with `gpus` of nvidia.com/gpu quota on the GPU flavor,
        preempting lower priorities within itself, and a LocalQueue `queue` in the namespace pointing at it."""
        with contextlib.suppress(client.ApiException):  # one flavor for every test of the session
            self.create("resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": GPU_FLAVOR},
                                            "spec": {"nodeLabels": dict(GPU_NODE_LABEL)}})  # fmt: skip
        cq = f"cq-{namespace}"
        self.create(
            "clusterqueues",
            {
                "kind": "ClusterQueue",
                "metadata": {"name": cq},
                "spec": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "preemption": {"withinClusterQueue": "LowerPriority"},
                    "resourceGroups": [
                        {
                            "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                            "flavors": [
                                {
                                    "name": GPU_FLAVOR,
                                    "resources": [
                                        {"name": "cpu", "nominalQuota": cpu},
                                        {"name": "memory", "nominalQuota": memory},
                                        {"name": "nvidia.com/gpu", "nominalQuota": gpus},
                                    ],
                                }
                            ],
                        }
                    ],
                },
            },
        )
        self.create("localqueues", {"kind": "LocalQueue", "metadata": {"name": queue, "namespace": namespace},
                                    "spec": {"clusterQueue": cq}}, namespace)  # fmt: skip

        def active() -> bool:
            conds = (self.get("clusterqueues", cq).get("status") or {}).get("conditions") or []
            return any(c["type"] == "Active" and c["status"] == "True" for c in conds)

        wait_for(active, f"ClusterQueue {cq} Active", 60, procs=[self.process])
        return queue

    def priority_class(self, name: str, value: int) -> None:
        self.create("workloadpriorityclasses", {"kind": "WorkloadPriorityClass", "metadata": {"name": name},
                                                "value": value})  # fmt: skip

    def cleanup(self) -> None:
        """Deletes what `create` made (newest first), so the next module's queues start empty."""
        api = self.api()
        for plural, namespace, name in reversed(self._made):
            with contextlib.suppress(client.ApiException):
                if namespace is None:
                    api.delete_cluster_custom_object(GROUP, VERSION, plural, name)
                else:
                    api.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        self._made.clear()

    def stop(self) -> None:
        self.cleanup()
        for kind, name in WEBHOOK_NAMES.items():
            self.cluster.kubectl("delete", kind, name, "--ignore-not-found", check=False)
        self.process.stop()


def _mount_namespace_argv(etc_overlay: Path) -> list[str]:
    """Runs the command in its own mount namespace with `etc_overlay` laid over /etc (read-only)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError("Kueue's tests need util-linux's unshare (a private /etc/kueue for its metrics certs)")
    flags = ["--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        flags = ["--user", "--map-root-user", *flags]
    script = 'mount -t overlay overlay -o "lowerdir=$0:/etc" /etc && exec "$@"'
    return [unshare, *flags, "sh", "-c", script, str(etc_overlay)]


def start_kueue(cluster: Cluster, workdir: Path) -> Kueue:
    """Installs Kueue's CRDs and webhooks and runs its controller; stop() undoes it."""
    folder = kueue_dir()
    if cluster._control_plane is None or cluster._control_plane.pki is None:
        raise RuntimeError("the Kueue harness needs the local control plane (its CA signs the webhook certificate)")
    pki = cluster._control_plane.pki
    workdir.mkdir(parents=True, exist_ok=True)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(folder / "config" / "crd"), timeout=120)
    ext = client.ApiextensionsV1Api(cluster.api_client())

    def established() -> bool:
        for plural in CRDS:
            crd = ext.read_custom_resource_definition(f"{plural}.{GROUP}")
            if not any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
                return False
        return True

    wait_for(established, "Kueue's CRDs Established", 90)
    with contextlib.suppress(client.ApiException):
        cluster.core().create_namespace({"metadata": {"name": KUEUE_NAMESPACE}})

    certs = workdir / "certs"
    cert, key = serving_cert(pki, certs)
    metrics_certs = workdir / "etc" / "kueue" / "metrics" / "certs"
    metrics_certs.mkdir(parents=True, exist_ok=True)
    shutil.copy(cert, metrics_certs / "tls.crt")
    shutil.copy(key, metrics_certs / "tls.key")
    webhook_port, health_port, metrics_port = free_port(), free_port(), free_port()
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(certs)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {
            "frameworks": ["batch/job"],
            # DistillationJobs own their Workloads (the operator's suspend/admission path).
            "externalFrameworks": ["DistillationJob.v1alpha1.kdistill.io"],
        },
        # The on-demand visibility API server would need an APIService and a port of its own.
        "featureGates": {"VisibilityOnDemand": False},
    }
    config_path = workdir / "kueue-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    argv = [*_mount_namespace_argv(workdir / "etc"), str(folder / "bin" / "kueue"), f"--config={config_path}",
            "--zap-log-level=2"]  # fmt: skip
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig))
    process = Process("kueue", argv, workdir / "kueue.log", env=env)
    kueue = Kueue(cluster, process, workdir)
    try:
        wait_for(lambda: _get(f"http://127.0.0.1:{health_port}/readyz"), "kueue /readyz", 120, procs=[process])
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))

        def serving() -> bool:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{webhook_port}/", timeout=3, context=ctx):
                    return True
            except urllib.error.HTTPError:
                return True  # TLS works; the root path has no handler
            except OSError:
                return False

        wait_for(serving, "kueue's webhook server", 60, procs=[process])
        hooks = _webhooks(folder / "config" / "webhook" / "manifests.yaml", f"https://127.0.0.1:{webhook_port}",
                          pki.ca_cert.read_bytes())  # fmt: skip
        path = workdir / "webhooks.yaml"
        path.write_text(yaml.safe_dump_all(hooks))
        cluster.kubectl("apply", "-f", str(path))
        probe = {"kind": "ResourceFlavor", "apiVersion": f"{GROUP}/{VERSION}", "metadata": {"name": "probe"}}

        def admits() -> bool:
            # A dry-run create goes through the webhooks: it succeeds once they answer.
            kueue.api().create_cluster_custom_object(GROUP, VERSION, "resourceflavors", probe, dry_run="All")
            return True

        wait_for(admits, "kueue's webhooks answering the API server", 60, procs=[process])
    except BaseException:
        kueue.stop()
        raise
    return kueue
