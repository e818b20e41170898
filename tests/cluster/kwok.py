"""Fake GPU nodes and pod lifecycles, played by kwok.

Annotation contract
===================
kwok plays the kubelet for every pod bound to a fake node. A pod that is scheduled
goes Pending -> Running (podIP, Ready, containers running). What happens next is
chosen by annotations on the pod, set at creation or patched in later (kwok
re-reads them on every change):

``kwok.kdistill.io/outcome``
    ``succeed``: the pod ends ``Succeeded``; ``fail``: it ends ``Failed``. With no
    outcome the pod stays ``Running`` until it is deleted. (Pods owned by a
    ``batch/v1`` Job with no outcome succeed, as with kwok's defaults.)
``kwok.kdistill.io/exit-code``
    Exit code of every container, as a decimal string (default ``0`` on succeed,
    ``1`` on fail).
``kwok.kdistill.io/message``
    The containers' termination message, usually the JSON a trainer writes to
    ``/dev/termination-log``, e.g. ``{"reason": "NCCLTimeout", "retryable": true,
    "message": "..."}`` or, on success, rank 0's metrics summary.
``kwok.kdistill.io/reason``
    ``state.terminated.reason`` (default ``Completed`` / ``Error``).
``kwok.kdistill.io/delay``
    How long the pod runs before the outcome applies, a Go duration such as
    ``"5s"`` (default ``500ms``).

Every container gets ``state.terminated`` with that exit code, reason and message,
``ready: false``; the pod's Ready condition turns False. A deleted pod on a healthy
fake node disappears at once (as if the kubelet confirmed it); on a node whose
heartbeats were stopped it stays Terminating, as on a real lost node.

Nodes are managed by kwok while they carry the label ``kwok.x-k8s.io/node=fake``.
:func:`stop_heartbeats` removes it: kwok stops renewing the node's Lease, the
node-lifecycle controller marks the node ``Ready=Unknown`` after its grace period and
taints it ``node.kubernetes.io/unreachable:NoExecute``, and the taint-eviction
controller then deletes its pods. :func:`resume_heartbeats` brings it back.

Pod IPs
=======
kwok gives each pod an address from its node's ``spec.podCIDR``, or from kwok's default
range (``--cidr``, 10.0.0.1/24) when the node has none. Nothing listens there: the pods are
fake. :func:`set_pod_cidr` with :func:`loopback_pod_cidr` gives a node a range inside
127.0.0.0/8, so that its pods' IPs are loopback addresses of this machine and a real process
(a ``kdistill serve`` bound to the pod's IP) can play the pod's server, reached at the pod's IP
as the operator reaches it. It is opt-in, per node: the API server refuses loopback addresses
in EndpointSlices ("may not be in the loopback range"), so Services that select such pods get
no endpoints; the default range keeps EndpointSlices working for the tests that read them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from .procs import Process

ANNOTATION_PREFIX = "kwok.kdistill.io/"
OUTCOME = ANNOTATION_PREFIX + "outcome"
EXIT_CODE = ANNOTATION_PREFIX + "exit-code"
MESSAGE = ANNOTATION_PREFIX + "message"
REASON = ANNOTATION_PREFIX + "reason"
DELAY = ANNOTATION_PREFIX + "delay"

MANAGED_LABEL = "kwok.x-k8s.io/node"
MANAGED_VALUE = "fake"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
# Kept short so the node-lifecycle controller notices a silent node within seconds.
LEASE_DURATION_SECONDS = 4

_TERMINATED_TEMPLATE = """\
{{ $now := Now }}
{{ $annotations := or .metadata.annotations dict }}
{{ $failed := eq ( index $annotations "@OUTCOME@" | toString ) "fail" }}
{{ $code := or ( index $annotations "@EXIT_CODE@" ) ( ternary "1" "0" $failed ) }}
{{ $reason := or ( index $annotations "@REASON@" ) ( ternary "Error" "Completed" $failed ) }}
{{ $message := or ( index $annotations "@MESSAGE@" ) "" }}
{{ $started := or .status.startTime $now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  reason: PodCompleted
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  reason: PodCompleted
  type: ContainersReady
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  started: false
  restartCount: 0
  state:
    terminated:
      exitCode: {{ $code }}
      reason: {{ $reason | Quote }}
      message: {{ $message | Quote }}
      startedAt: {{ $started | Quote }}
      finishedAt: {{ $now | Quote }}
{{ end }}
phase: {{ ternary "Failed" "Succeeded" $failed }}
"""
for _placeholder, _key in (
    ("@OUTCOME@", OUTCOME),
    ("@EXIT_CODE@", EXIT_CODE),
    ("@REASON@", REASON),
    ("@MESSAGE@", MESSAGE),
):
    _TERMINATED_TEMPLATE = _TERMINATED_TEMPLATE.replace(_placeholder, _key)

_READY_TEMPLATE = """\
{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: ContainersReady
{{ range .spec.readinessGates }}
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: {{ .conditionType | Quote }}
{{ end }}
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  started: true
  restartCount: 0
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
initContainerStatuses:
{{ range .spec.initContainers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  state:
    terminated:
      exitCode: 0
      finishedAt: {{ $now | Quote }}
      reason: Completed
      startedAt: {{ $now | Quote }}
{{ end }}
hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) \
( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
phase: Running
startTime: {{ $now | Quote }}
"""


def _stage(name: str, expressions: list[dict[str, Any]], nxt: dict[str, Any], delayed: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
        "selector": {"matchExpressions": expressions},
        "next": nxt,
    }
    if delayed:
        spec["delay"] = {
            "durationMilliseconds": 500,
            "durationFrom": {"expressionFrom": f'.metadata.annotations["{DELAY}"]'},
        }
    return {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage", "metadata": {"name": name}, "spec": spec}


def pod_stages() -> list[dict[str, Any]]:
    """The pod Stages implementing the annotation contract (they replace kwok's defaults)."""
    alive = {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"}
    running = {"key": ".status.phase", "operator": "In", "values": ["Running"]}
    outcome = f'.metadata.annotations["{OUTCOME}"]'
    terminate = {"statusTemplate": _TERMINATED_TEMPLATE}
    return [
        _stage("pod-ready", [alive, {"key": ".status.podIP", "operator": "DoesNotExist"}],
               {"statusTemplate": _READY_TEMPLATE}),
        _stage("kdistill-pod-succeed", [alive, running, {"key": outcome, "operator": "In", "values": ["succeed"]}],
               terminate, delayed=True),
        _stage("kdistill-pod-fail", [alive, running, {"key": outcome, "operator": "In", "values": ["fail"]}],
               terminate, delayed=True),
        _stage("kdistill-job-pod-complete",
               [alive, running, {"key": outcome, "operator": "DoesNotExist"},
                {"key": ".metadata.ownerReferences.[].kind", "operator": "In", "values": ["Job"]}],
               terminate, delayed=True),
        # The kubelet's part once a pod is deleted: drop finalizers, then remove it.
        _stage("pod-delete", [{"key": ".metadata.deletionTimestamp", "operator": "Exists"}],
               {"finalizers": {"empty": True}, "delete": True}),
    ]  # fmt: skip


def write_config(path: Path) -> Path:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
            "kind": "KwokConfiguration",
            "options": {
                "manageAllNodes": False,
                "manageNodesWithLabelSelector": f"{MANAGED_LABEL}={MANAGED_VALUE}",
                "nodeLeaseDurationSeconds": LEASE_DURATION_SECONDS,
            },
        },
        *pod_stages(),
    ]
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def start_kwok(binary: Path, kubeconfig: Path, workdir: Path) -> Process:
    config = write_config(workdir / "kwok.yaml")
    return Process(
        "kwok",
        [str(binary), f"--kubeconfig={kubeconfig}", f"--config={config}",
         f"--manage-nodes-with-label-selector={MANAGED_LABEL}={MANAGED_VALUE}",
         f"--node-lease-duration-seconds={LEASE_DURATION_SECONDS}", "--v=INFO"],
        workdir / "logs" / "kwok.log",
    )  # fmt: skip


@dataclass(frozen=True)
class NodeSpec:
    """A fake node: GPU nodes carry nvidia.com/gpu capacity, GPU labels and the GPU taint."""

    name: str
    gpus: int = 0
    cpu: str = "32"
    memory: str = "256Gi"
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    zone: str = "zone-a"
    # The GPU taint relies on the ExtendedResourceToleration admission plugin (on in the local
    # control plane, as on GKE); clusters without it would leave GPU pods Pending.
    gpu_taint: bool = True
    # spec.podCIDR: where kwok takes this node's pod IPs from ("" = kwok's default range).
    pod_cidr: str = ""


def node_body(spec: NodeSpec) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "topology.kubernetes.io/zone": spec.zone,
        "type": "kwok",
        MANAGED_LABEL: MANAGED_VALUE,
    }
    capacity = {"cpu": spec.cpu, "memory": spec.memory, "pods": "110", "ephemeral-storage": "500Gi"}
    taints: list[dict[str, str]] = []
    if spec.gpus:
        # The labels NVIDIA's GPU feature discovery puts on real GPU nodes.
        labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": spec.gpu_product,
            "nvidia.com/gpu.count": str(spec.gpus),
            "node.kubernetes.io/instance-type": f"fake-gpu-{spec.gpus}x",
        }
        capacity[GPU_RESOURCE] = str(spec.gpus)
        if spec.gpu_taint:
            taints.append(dict(GPU_TAINT))
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": spec.name,
            "labels": labels,
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", MANAGED_LABEL: MANAGED_VALUE},
        },
        "spec": {"taints": taints, **_pod_cidr_spec(spec.pod_cidr)},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def _pod_cidr_spec(cidr: str) -> dict[str, Any]:
    return {"podCIDR": cidr, "podCIDRs": [cidr]} if cidr else {}


def loopback_pod_cidr(index: int) -> str:
    """A /24 inside 127.0.0.0/8 (127.1.<index>.0/24), one per node: pod IPs this machine answers on."""
    if not 0 <= index <= 255:
        raise ValueError(f"index must be in 0..255, got {index}")
    return f"127.1.{index}.0/24"


def set_pod_cidr(core: client.CoreV1Api, name: str, cidr: str) -> None:
    """Gives an existing node its pod range (once: the API server refuses to change a set
    podCIDR). kwok uses it for the pods that get their IP afterwards."""
    core.patch_node(name, {"spec": _pod_cidr_spec(cidr)})


def create_nodes(core: client.CoreV1Api, specs: list[NodeSpec]) -> None:
    for spec in specs:
        body = node_body(spec)
        core.create_node(body)
        # Status is not taken from a create on every version; set it explicitly.
        core.patch_node_status(spec.name, {"status": body["status"]})


def node_ready(core: client.CoreV1Api, name: str) -> str:
    """The node's Ready condition status: "True", "False", "Unknown" or "" if none yet."""
    node = core.read_node(name)
    for cond in node.status.conditions or []:
        if cond.type == "Ready":
            return str(cond.status)
    return ""


def wait_nodes_ready(core: client.CoreV1Api, names: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending and time.monotonic() < deadline:
        pending = [n for n in pending if node_ready(core, n) != "True"]
        if pending:
            time.sleep(0.3)
    if pending:
        raise TimeoutError(f"fake nodes not Ready after {timeout:.0f}s: {pending}")


def stop_heartbeats(core: client.CoreV1Api, name: str) -> None:
    """The node's kubelet goes silent: kwok stops renewing its Lease and status."""
    core.patch_node(name, {"metadata": {"labels": {MANAGED_LABEL: "stopped"}}})


def resume_heartbeats(core: client.CoreV1Api, name: str) -> None:
    core.patch_node(name, {"metadata": {"labels": {MANAGED_LABEL: MANAGED_VALUE}}})


def set_pod_outcome(
    core: client.CoreV1Api,
    namespace: str,
    name: str,
    *,
    succeed: bool,
    exit_code: int | None = None,
    message: str | dict[str, Any] | None = None,
    reason: str | None = None,
    delay: str | None = None,
) -> None:
    """Patches the contract annotations onto a pod; kwok then terminates it accordingly."""
    core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": outcome_annotations(
        succeed=succeed, exit_code=exit_code, message=message, reason=reason, delay=delay)}})  # fmt: skip


def outcome_annotations(
    *,
    succeed: bool,
    exit_code: int | None = None,
    message: str | dict[str, Any] | None = None,
    reason: str | None = None,
    delay: str | None = None,
) -> dict[str, str]:
    """The annotations for a pod that should end this way (for pod templates, too)."""
    if exit_code is not None:
        if not isinstance(exit_code, int) or not 0 <= exit_code <= 255:
            raise ValueError(f"exit_code must be an int in 0..255, got {exit_code!r}")
        if succeed and exit_code != 0:
            raise ValueError(f"a succeeding pod exits 0, got exit_code={exit_code}")
    annotations = {OUTCOME: "succeed" if succeed else "fail"}
    if exit_code is not None:
        annotations[EXIT_CODE] = str(exit_code)
    if message is not None:
        annotations[MESSAGE] = message if isinstance(message, str) else json.dumps(message)
    if reason is not None:
        annotations[REASON] = reason
    if delay is not None:
        annotations[DELAY] = delay
    return annotations
