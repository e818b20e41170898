"""The canary's manifests, built from the serving Deployment builder. No cluster: label selection is
checked with Kubernetes' own matching rules (equality, !=) on the labels the manifests carry."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kdistill.operator import builders, canary_builders, names
from kdistill.operator.canary_logic import canary_replicas
from tests.operator.test_builders import SETTINGS, job

Manifest = dict[str, Any]


def matches(selector: str, labels: dict[str, str]) -> bool:
    """A label selector string (``k=v`` and ``k!=v`` terms) against a pod's labels, as the API
    server reads it (``k!=v`` also matches a pod without ``k``)."""
    for term in selector.split(","):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        else:
            key, value = term.split("=", 1)
            if labels.get(key) != value:
                return False
    return True


def match_labels(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def as_read(dep: Manifest) -> Manifest:
    """A Deployment as the API server returns it: with a resourceVersion, status and more."""
    out = copy.deepcopy(dep)
    out["metadata"].update({"resourceVersion": "42", "uid": "d-1", "generation": 3})
    out["status"] = {"replicas": 3, "readyReplicas": 3}
    return out


def champion_and_challenger(**serving: Any) -> tuple[Any, Any, Manifest]:
    """Two jobs of one schedule sharing a serving name, and the champion's Deployment as read."""
    shared = {"name": "intents-serving", "replicas": 4, **serving}
    champion = job(serving=shared)
    challenger = job(serving=shared)
    challenger = challenger.model_copy(
        update={"metadata": challenger.metadata.model_copy(update={"name": "intents-29410000"})}
    )
    stable = as_read(builders.serving_deployment(champion, SETTINGS))
    return champion, challenger, stable


def server(dep: Manifest) -> Manifest:
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == names.SERVER_CONTAINER]
    return c


def arg(dep: Manifest, flag: str) -> str:
    command = server(dep)["command"]
    return str(command[command.index(flag) + 1])


def test_canary_runs_the_challenger_beside_the_champion_under_one_service() -> None:
    champion, challenger, stable = champion_and_challenger()
    split = canary_replicas(stable["spec"]["replicas"], 10)
    canary = canary_builders.canary_deployment(challenger, SETTINGS, stable, split.canary)
    service = builders.serving_service(champion)

    assert canary["metadata"]["name"] == "intents-serving-canary"
    assert canary["metadata"]["namespace"] == "ml"
    assert canary["spec"]["replicas"] == 1 and split == (4, 1)
    # the challenger's model, under the champion's model name
    assert server(canary)["command"][2] == names.model_path("ml", "intents-29410000")
    assert arg(canary, "--model-name") == arg(stable, "--model-name") == "intent"
    ann = canary["metadata"]["annotations"]
    assert ann[names.ANNOTATION_MODEL_PATH] == names.model_path("ml", "intents-29410000")
    assert ann[canary_builders.ANNOTATION_CANARY_OF] == "intents-serving"
    assert names.ANNOTATION_PREVIOUS_MODEL_PATH not in ann

    canary_pod = canary["spec"]["template"]["metadata"]["labels"]
    stable_pod = stable["spec"]["template"]["metadata"]["labels"]
    assert canary_pod[canary_builders.LABEL_TRACK] == "canary"
    assert canary_builders.LABEL_TRACK not in stable_pod  # the champion's pods are not rolled for a label
    # the Service spreads over both sets of pods
    assert match_labels(service["spec"]["selector"], canary_pod)
    assert match_labels(service["spec"]["selector"], stable_pod)
    # each Deployment's pods are told apart
    assert match_labels(canary["spec"]["selector"]["matchLabels"], canary_pod)
    assert not match_labels(canary["spec"]["selector"]["matchLabels"], stable_pod)  # never adopts champions
    assert matches(canary_builders.stable_selector(stable), stable_pod)
    assert not matches(canary_builders.stable_selector(stable), canary_pod)
    assert matches(canary_builders.canary_selector(stable), canary_pod)
    assert not matches(canary_builders.canary_selector(stable), stable_pod)
    # a Service's port reaches the canary's container
    assert server(canary)["ports"] == server(stable)["ports"]
    assert service["spec"]["ports"][0]["targetPort"] == server(canary)["ports"][0]["containerPort"]


def test_canary_pods_leave_the_service_before_they_stop_listening() -> None:
    _, challenger, stable = champion_and_challenger()
    canary = canary_builders.canary_deployment(challenger, SETTINGS, stable, 2)
    pod = canary["spec"]["template"]["spec"]
    assert server(canary)["lifecycle"] == {"preStop": {"sleep": {"seconds": canary_builders.PRE_STOP_SECONDS}}}
    assert pod["terminationGracePeriodSeconds"] > canary_builders.PRE_STOP_SECONDS + 30  # + the server's drain
    assert server(canary)["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert canary["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_canary_keeps_its_replicas_under_an_hpa_and_refuses_none() -> None:
    _, challenger, stable = champion_and_challenger(autoscaling={"minReplicas": 2, "maxReplicas": 6})
    assert "replicas" not in builders.serving_deployment(challenger, SETTINGS)["spec"]
    assert canary_builders.canary_deployment(challenger, SETTINGS, stable, 3)["spec"]["replicas"] == 3
    with pytest.raises(ValueError, match="at least one replica"):
        canary_builders.canary_deployment(challenger, SETTINGS, stable, 0)


def test_canary_refuses_another_namespace_or_port() -> None:
    _, challenger, stable = champion_and_challenger()
    elsewhere = copy.deepcopy(stable)
    elsewhere["metadata"]["namespace"] = "other"
    with pytest.raises(ValueError, match="namespace"):
        canary_builders.canary_deployment(challenger, SETTINGS, elsewhere, 1)
    _, other_port, _ = champion_and_challenger(port=9000)
    with pytest.raises(ValueError, match="targetPort"):
        canary_builders.canary_deployment(other_port, SETTINGS, stable, 1)


def test_promote_gives_the_stable_deployment_the_challengers_model() -> None:
    _, challenger, stable = champion_and_challenger()
    change = canary_builders.promote(challenger, SETTINGS, stable)
    (promoted,) = change.apply
    meta = promoted["metadata"]
    assert (meta["name"], meta["namespace"]) == ("intents-serving", "ml")
    assert meta["labels"][canary_builders.LABEL_TRACK] == "stable"
    assert promoted["spec"]["selector"] == stable["spec"]["selector"]  # immutable on the API server
    assert promoted["spec"]["template"]["metadata"]["labels"] == stable["spec"]["template"]["metadata"]["labels"]
    assert server(promoted)["command"][2] == names.model_path("ml", "intents-29410000")
    assert arg(promoted, "--model-name") == "intent"  # clients keep the name they use
    ann = meta["annotations"]
    assert ann[names.ANNOTATION_MODEL_PATH] == names.model_path("ml", "intents-29410000")
    assert ann[names.ANNOTATION_PREVIOUS_MODEL_PATH] == names.model_path("ml", "intent")
    assert ann[names.ANNOTATION_SOURCE_JOB] == "intents-29410000"
    # the pod template changes, so the Deployment makes a new revision and keeps the old one
    assert promoted["spec"]["template"] != stable["spec"]["template"]
    assert "revisionHistoryLimit" not in promoted["spec"]  # Kubernetes' default: 10 revisions
    # wait for the stable rollout, then delete the canary
    assert change.wait_rollout == canary_builders.ObjectRef("apps/v1", "Deployment", "ml", "intents-serving")
    assert change.delete == [canary_builders.ObjectRef("apps/v1", "Deployment", "ml", "intents-serving-canary")]
    assert "status" not in promoted and "resourceVersion" not in meta


def test_rollback_only_deletes_the_canary() -> None:
    _, _, stable = champion_and_challenger()
    before = copy.deepcopy(stable)
    change = canary_builders.rollback(stable)
    assert change.apply == [] and change.wait_rollout is None
    assert change.delete == [canary_builders.ObjectRef("apps/v1", "Deployment", "ml", "intents-serving-canary")]
    assert stable == before


def test_served_model_name() -> None:
    _, _, stable = champion_and_challenger()
    assert canary_builders.served_model_name(stable) == "intent"
    command = server(stable)["command"]
    i = command.index("--model-name")
    del command[i : i + 2]
    assert canary_builders.served_model_name(stable) is None
