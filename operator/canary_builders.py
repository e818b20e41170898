"""The canary's Kubernetes objects, built from the serving Deployment builder (operator/builders.py).

The champion runs in the stable serving Deployment; the challenger runs beside it in
``<stable>-canary``, whose pods carry the stable pods' labels (the Service's selector) plus
``kdistill.io/track: canary``. The one Service then spreads connections over both sets of pods,
in proportion to their numbers (``canary_logic.canary_replicas``).

- The stable Deployment's selector is immutable and matches the canary's pods too. The Deployment
  controller only counts the ReplicaSets it owns, so the two do not fight, but the champion's
  pods are told apart by ``kdistill.io/track!=canary`` (``stable_selector``): the stable pods keep
  their labels, so that starting a canary never rolls them. The stable Deployment itself is
  labelled ``kdistill.io/track: stable``.
- The canary serves under the champion's model name (``--model-name``), so that clients that name
  the model get answers from both; the promoted stable Deployment keeps that name too.
- Promote (``promote``): the stable Deployment takes the challenger's model (a rolling update,
  ``maxUnavailable: 0``), and once its rollout is complete the canary is deleted. The stable
  Deployment's pod template changes, so its previous revision stays for ``kubectl rollout undo``.
- Roll back (``rollback``): the canary is deleted; the champion is not touched.
- Canary pods wait ``PRE_STOP_SECONDS`` in a preStop hook before the server gets SIGTERM, so that
  the Service stops sending them connections before they stop listening.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from kdistill.api import DistillationJob

from . import builders, names
from .settings import Settings

Manifest = dict[str, Any]

LABEL_TRACK = f"{names.GROUP}/track"
TRACK_CANARY = "canary"
TRACK_STABLE = "stable"
# On the canary Deployment: the stable Deployment it runs beside.
ANNOTATION_CANARY_OF = f"{names.GROUP}/canary-of"
CANARY_SUFFIX = "-canary"
# Long enough for the endpoint change to reach every node's kube-proxy before the server stops
# taking connections.
PRE_STOP_SECONDS = builders.SERVING_PRE_STOP_SECONDS
# The server's own graceful drain (kdistill serve --graceful-timeout, 30 s) after the preStop wait.
TERMINATION_GRACE_SECONDS = builders.SERVING_TERMINATION_GRACE_SECONDS


def canary_name(stable_name: str) -> str:
    return f"{stable_name}{CANARY_SUFFIX}"


def _pod_labels(stable: Manifest) -> dict[str, str]:
    """The stable Deployment's selector labels: what the Service selects."""
    labels = stable.get("spec", {}).get("selector", {}).get("matchLabels")
    if not labels:
        raise ValueError(f"deployment {stable['metadata']['name']!r} has no spec.selector.matchLabels")
    return dict(labels)


def _selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def stable_selector(stable: Manifest) -> str:
    """The label selector of the champion's pods (the stable Deployment's, without the canary's)."""
    return f"{_selector_string(_pod_labels(stable))},{LABEL_TRACK}!={TRACK_CANARY}"


def canary_selector(stable: Manifest) -> str:
    """The label selector of the canary's pods."""
    return f"{_selector_string(_pod_labels(stable))},{LABEL_TRACK}={TRACK_CANARY}"


def _server(deployment: Manifest) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    for c in containers:
        if c.get("name") == names.SERVER_CONTAINER:
            return dict(c)
    raise ValueError(f"deployment {deployment['metadata']['name']!r} has no {names.SERVER_CONTAINER!r} container")


def served_model_name(deployment: Manifest) -> str | None:
    """The ``--model-name`` the Deployment's server runs with, if any."""
    command = list(_server(deployment).get("command") or [])
    for i, arg in enumerate(command[:-1]):
        if arg == "--model-name":
            return str(command[i + 1])
    return None


def container_port(deployment: Manifest) -> int | None:
    """The server container's http port."""
    for port in _server(deployment).get("ports") or []:
        if port.get("name") == "http":
            return int(port["containerPort"])
    return None


def set_model_name(deployment: Manifest, model_name: str | None) -> None:
    """The server's ``--model-name`` set to ``model_name`` (left as it is when None)."""
    if model_name is None:
        return
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c.get("name") != names.SERVER_CONTAINER:
            continue
        command = list(c["command"])
        if "--model-name" in command:
            command[command.index("--model-name") + 1] = model_name
        else:
            command += ["--model-name", model_name]
        c["command"] = command


def _check_beside(challenger: DistillationJob, stable: Manifest, built: Manifest) -> None:
    namespace = stable["metadata"].get("namespace")
    if namespace != challenger.namespace:
        raise ValueError(
            f"the challenger {challenger.metadata.name!r} is in namespace {challenger.namespace!r}, "
            f"the stable deployment in {namespace!r}: one Service cannot spread over both"
        )
    ours, theirs = container_port(built), container_port(stable)
    if ours != theirs:
        raise ValueError(
            f"the challenger serves on port {ours}, the stable deployment on {theirs}: "
            "the Service's targetPort would not reach the canary (serving.port must match)"
        )


def canary_deployment(challenger: DistillationJob, settings: Settings, stable: Manifest, replicas: int) -> Manifest:
    """``<stable>-canary``: the challenger's server, with the stable pods' labels plus the canary
    track, ``replicas`` pods (``canary_logic.canary_replicas``) and the champion's model name.

    ``stable`` is the stable Deployment as read from the API server."""
    if replicas < 1:
        raise ValueError(f"a canary needs at least one replica, got {replicas}")
    dep = builders.serving_deployment(challenger, settings)
    _check_beside(challenger, stable, dep)
    stable_name = stable["metadata"]["name"]
    labels = {**_pod_labels(stable), LABEL_TRACK: TRACK_CANARY}
    annotations = {k: v for k, v in dep["metadata"]["annotations"].items() if k != names.ANNOTATION_PREVIOUS_MODEL_PATH}
    dep["metadata"] = {
        "name": canary_name(stable_name),
        "namespace": stable["metadata"]["namespace"],
        "labels": {**labels, names.LABEL_MANAGED_BY: names.MANAGER},
        "annotations": {**annotations, ANNOTATION_CANARY_OF: stable_name},
    }
    spec = dep["spec"]
    spec["replicas"] = replicas  # never under the challenger's HPA: the split decides
    spec["selector"] = {"matchLabels": dict(labels)}
    template = spec["template"]
    template["metadata"]["labels"] = dict(labels)
    pod = template["spec"]
    pod["terminationGracePeriodSeconds"] = TERMINATION_GRACE_SECONDS
    for c in pod["containers"]:
        if c.get("name") == names.SERVER_CONTAINER:
            c["lifecycle"] = {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}}
    set_model_name(dep, served_model_name(stable))
    return dep


def promoted_deployment(challenger: DistillationJob, settings: Settings, stable: Manifest) -> Manifest:
    """The stable Deployment serving the challenger's model: same name, selector, pod labels and
    model name as ``stable``; the model it served before goes to the previous-model-path annotation."""
    previous = (stable["metadata"].get("annotations") or {}).get(names.ANNOTATION_MODEL_PATH)
    dep = builders.serving_deployment(challenger, settings, previous_model_path=previous)
    _check_beside(challenger, stable, dep)
    meta = stable["metadata"]
    stable_labels = {k: v for k, v in (meta.get("labels") or {}).items()}
    dep["metadata"] = {
        "name": meta["name"],
        "namespace": meta["namespace"],
        "labels": {**stable_labels, names.LABEL_MANAGED_BY: names.MANAGER, LABEL_TRACK: TRACK_STABLE},
        "annotations": dep["metadata"]["annotations"],
    }
    spec = dep["spec"]
    spec["selector"] = copy.deepcopy(stable["spec"]["selector"])  # immutable
    spec["template"]["metadata"]["labels"] = dict(stable["spec"]["template"]["metadata"]["labels"])
    set_model_name(dep, served_model_name(stable))
    return dep


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True)
class CanaryChange:
    """What the controller does, in order: apply ``apply``; if ``wait_rollout`` names a
    Deployment, wait until its rollout is complete; then delete ``delete``."""

    apply: list[Manifest] = field(default_factory=list)
    wait_rollout: ObjectRef | None = None
    delete: list[ObjectRef] = field(default_factory=list)


def _canary_ref(stable: Manifest) -> ObjectRef:
    meta = stable["metadata"]
    return ObjectRef("apps/v1", "Deployment", meta["namespace"], canary_name(meta["name"]))


def promote(challenger: DistillationJob, settings: Settings, stable: Manifest) -> CanaryChange:
    """The stable Deployment takes the challenger's model; the canary goes once it has rolled out,
    so the challenger's model serves throughout."""
    promoted = promoted_deployment(challenger, settings, stable)
    meta = promoted["metadata"]
    return CanaryChange(
        apply=[promoted],
        wait_rollout=ObjectRef("apps/v1", "Deployment", meta["namespace"], meta["name"]),
        delete=[_canary_ref(stable)],
    )


def rollback(stable: Manifest) -> CanaryChange:
    """The canary is deleted; the champion's Deployment is left as it is."""
    return CanaryChange(delete=[_canary_ref(stable)])
