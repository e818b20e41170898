"""The Helm chart: lint, the CRDs kept identical to crds/, and what renders for the default
values and for variants (namespaced mode, replicas with leader election, monitoring)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from .helm import CHART, REPO, find, helm, one, read_yaml, render, render_error

CRD_FILES = sorted((REPO / "crds").glob("*.yaml"))


def rules_of(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj.get("rules") or []


def test_helm_lint_is_clean() -> None:
    for extra in ([], ["--set", "watch.mode=namespaced", "--set", "operator.replicas=2",
                       "--set", "grafanaDashboard.enabled=true"]):  # fmt: skip
        out = helm("lint", "--strict", str(CHART), *extra).stdout
        assert "0 chart(s) failed" in out
        assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_chart_crd_copies_are_byte_identical_to_the_generated_crds() -> None:
    names = [p.name for p in CRD_FILES]
    assert names == ["kdistill.io_distillationjobs.yaml", "kdistill.io_distillationschedules.yaml"]
    assert sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml")) == names
    for crd_file in CRD_FILES:
        assert (CHART / "files" / "crds" / crd_file.name).read_bytes() == crd_file.read_bytes(), (
            "charts/kdistill/files/crds/ is stale: run `make manifests`"
        )


def test_rendered_crds_equal_the_generated_ones_and_are_kept_on_uninstall() -> None:
    rendered = {c["metadata"]["name"]: c for c in find(render(), "CustomResourceDefinition")}
    assert len(rendered) == len(CRD_FILES)
    for crd_file in CRD_FILES:
        generated = read_yaml(crd_file)
        crd = rendered[generated["metadata"]["name"]]
        assert crd["spec"] == generated["spec"]
        annotations = crd["metadata"]["annotations"]
        assert annotations["helm.sh/resource-policy"] == "keep"
        # The generator's own annotations survive.
        assert all(annotations[k] == v for k, v in generated["metadata"]["annotations"].items())


def test_crds_can_be_left_out_or_not_kept() -> None:
    assert not find(render({"crds.install": False}), "CustomResourceDefinition")
    crds = find(render({"crds.keep": False}), "CustomResourceDefinition")
    assert len(crds) == len(CRD_FILES)
    assert all("helm.sh/resource-policy" not in crd["metadata"]["annotations"] for crd in crds)


def test_default_operator_deployment_is_hardened_and_probed() -> None:
    objs = render()
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "kdistill/operator:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # A writable /tmp, because the root filesystem is read-only.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert f"--health-port={ports['health']}" in container["args"]
    assert f"--metrics-port={ports['metrics']}" in container["args"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KDISTILL_TRAINER_IMAGE"] == env["KDISTILL_SERVER_IMAGE"] == "kdistill/trainer:0.1.0"
    # Cluster mode: no --namespace flag; the Lease lives in the pod's namespace.
    assert not [a for a in container["args"] if a.startswith("--namespace")]
    assert "--leader-election" in container["args"]
    (pod_ns,) = [e for e in container["env"] if e["name"] == "POD_NAMESPACE"]
    assert pod_ns["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert dep["spec"]["replicas"] == 1
    assert not find(objs, "PodDisruptionBudget")


def test_images_tags_and_pull_policy_are_configurable() -> None:
    dep = one(render({"image.operator.tag": "v9", "image.trainer.repository": "reg.example/kd/trainer",
                      "image.pullPolicy": "Always"}), "Deployment")  # fmt: skip
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "kdistill/operator:v9"
    assert container["imagePullPolicy"] == "Always"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KDISTILL_TRAINER_IMAGE"] == "reg.example/kd/trainer:0.1.0"
    assert env["KDISTILL_SERVER_IMAGE"] == env["KDISTILL_TRAINER_IMAGE"]


def _assert_no_wildcards(objs: list[dict[str, Any]]) -> None:
    for obj in objs:
        if obj["kind"] not in ("Role", "ClusterRole"):
            continue
        for rule in rules_of(obj):
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), f"{obj['kind']} {obj['metadata']['name']}: wildcard in {rule}"
            assert "nonResourceURLs" not in rule


def _resources(rules: list[dict[str, Any]]) -> set[str]:
    return {r for rule in rules for r in rule["resources"]}


def test_cluster_mode_rbac_is_one_cluster_role_without_wildcards() -> None:
    objs = render()
    _assert_no_wildcards(objs)
    # The only Role is the leader Lease's, in the release namespace.
    (lease_role,) = find(objs, "Role")
    assert lease_role["metadata"]["namespace"] == "kdistill-system"
    assert _resources(rules_of(lease_role)) == {"leases"}
    role = one(objs, "ClusterRole")
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    assert subject == {"kind": "ServiceAccount", "name": one(objs, "ServiceAccount")["metadata"]["name"],
                       "namespace": "kdistill-system"}  # fmt: skip
    resources = _resources(rules_of(role))
    assert {"distillationjobs", "distillationjobs/status", "pods", "deployments", "nodes"} <= resources
    # Never anything that reads credentials, no leases cluster-wide; cluster mode needs no namespace reads.
    assert not {"secrets", "leases", "namespaces"} & resources


NAMESPACED = {"watch.mode": "namespaced", "watch.namespaces": ["team-a", "team-b"]}


def test_namespaced_mode_has_a_role_per_watched_namespace_and_only_cluster_scoped_reads_cluster_wide() -> None:
    objs = render(NAMESPACED)
    _assert_no_wildcards(objs)
    roles = [r for r in find(objs, "Role") if "leases" not in _resources(rules_of(r))]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = [b for b in find(objs, "RoleBinding") if not b["metadata"]["name"].endswith("-leader")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    cluster_role = one(objs, "ClusterRole")
    assert _resources(rules_of(cluster_role)) == {"nodes", "customresourcedefinitions", "namespaces"}
    assert "distillationjobs" in _resources(rules_of(roles[0]))
    (container,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--namespace=team-a" in container["args"] and "--namespace=team-b" in container["args"]


def test_namespaced_mode_defaults_to_the_release_namespace() -> None:
    objs = render({"watch.mode": "namespaced"}, namespace="ml")
    assert {r["metadata"]["namespace"] for r in find(objs, "Role")} == {"ml"}
    (container,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--namespace=ml" in container["args"]


def test_replicas_need_leader_election_and_then_get_a_pdb_spread_and_a_named_lease() -> None:
    assert "leaderElection" in render_error({"operator.replicas": 2, "operator.leaderElection.enabled": False})
    objs = render({"operator.replicas": 3, "operator.leaderElection.leaseName": "kd-leader"})
    dep = one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert "podAntiAffinity" in pod["affinity"]
    (container,) = pod["containers"]
    assert "--lease-name=kd-leader" in container["args"]
    # Standby replicas answer /healthz themselves, so liveness is the same probe on every replica.
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KDISTILL_IMAGE_PULL_POLICY"] == "IfNotPresent"
    assert one(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    (lease_role,) = find(objs, "Role")
    writes = [r for r in rules_of(lease_role) if set(r["verbs"]) & {"get", "update", "patch", "delete"}]
    # Reading and renewing are limited to the one Lease; only `create` (which cannot be) is not.
    assert writes and all(r["resourceNames"] == ["kd-leader"] for r in writes)
    unnamed = [r for r in rules_of(lease_role) if "resourceNames" not in r]
    assert all(r["verbs"] == ["create"] for r in unnamed)
    single = render({"operator.leaderElection.enabled": False})
    (container,) = one(single, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--no-leader-election" in container["args"]
    assert not find(single, "Role")


def test_metrics_service_and_optional_service_monitor() -> None:
    objs = render()
    svc = one(objs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert svc["spec"]["selector"] == one(objs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not find(objs, "ServiceMonitor")
    monitored = render({"metrics.serviceMonitor.enabled": True, "metrics.serviceMonitor.labels": {"release": "prom"}})
    sm = one(monitored, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert "metrics.service.enabled" in render_error({"metrics.serviceMonitor.enabled": True,
                                                      "metrics.service.enabled": False})  # fmt: skip


def _metric_names_in_code() -> set[str]:
    names: set[str] = set()
    for folder in ("operator", "trainer", "serving"):
        for path in (REPO / folder).rglob("*.py"):
            for kind, name in re.findall(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"(kdistill_\w+)\"",
                                         path.read_text()):  # fmt: skip
                names.add(name)
                if kind == "Counter":
                    # prometheus-client exposes counters with a _total suffix either way.
                    names.add(name.removesuffix("_total") + "_total")
                if kind == "Histogram":
                    names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_grafana_dashboard_is_optional_valid_json_and_names_only_metrics_that_exist() -> None:
    assert not find(render(), "ConfigMap")
    cm = one(render({"grafanaDashboard.enabled": True}), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["kdistill.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bkdistill_\w+", e)}
    known = _metric_names_in_code()
    assert used <= known, f"the dashboard names metrics no component exports: {sorted(used - known)}"
    # Each component has panels: the operator's, the trainer's and the server's metrics.
    assert {"kdistill_jobs", "kdistill_train_loss", "kdistill_request_latency_seconds_bucket"} <= used


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
        ({"watch.mode": "everywhere"}, "mode"),
        ({"watch.mode": "namespaced", "watch.namespaces": ["Bad_Name"]}, "namespaces"),
        ({"operator.replicas": -1}, "replicas"),
        ({"operator.unknownKey": 1}, "unknownKey"),
    ],
)
def test_values_schema_rejects_bad_values_by_name(values: dict[str, Any], needle: str) -> None:
    assert needle in render_error(values)


def test_every_template_renders_parseable_yaml_for_all_variants() -> None:
    variants: list[dict[str, Any]] = [
        {},
        NAMESPACED,
        {
            "operator.replicas": 2,
            "grafanaDashboard.enabled": True,
            "metrics.serviceMonitor.enabled": True,
            "serviceAccount.annotations": {"a": "b"},
            "imagePullSecrets": [{"name": "regcred"}],
            "operator.nodeSelector": {"pool": "cpu"},
        },
        {"rbac.create": False, "serviceAccount.create": False, "serviceAccount.name": "existing"},
    ]
    for values in variants:
        for obj in render(values):
            assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"]
            yaml.safe_dump(obj)
    bare = render(variants[-1])
    assert not find(bare, "ServiceAccount") and not find(bare, "ClusterRole")
    assert one(bare, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
