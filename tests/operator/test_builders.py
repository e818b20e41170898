"""Pure builders: a job in, manifests out. No cluster."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdistill.api import load_job, parse_job
from kdistill.operator import builders, names
from kdistill.operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SETTINGS = Settings(trainer_image="reg/trainer:1", server_image="reg/server:1")


def job_dict(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "intent", "namespace": "ml", "uid": "u-1"},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": "pvc://models/teacher"},
            "student": {"fromTeacher": {"numLayers": 2}},
            "data": {"train": "pvc://data/train.jsonl", "eval": "pvc://data/eval.jsonl"},
            "parallelism": {"nodes": 2, "gpusPerNode": 4, "student": {"data": 8}},
            "checkpoint": {"volume": {"claimName": "ckpt"}},
        },
    }
    body["spec"].update(spec)
    return body


def job(**spec: Any):  # type: ignore[no-untyped-def]
    return parse_job(job_dict(**spec))


def test_worker_pod_command_env_resources_and_placement() -> None:
    j = job(
        template={
            "image": "custom:2",
            "resources": {"limits": {"memory": "64Gi"}},
            "nodeSelector": {"pool": "a100"},
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {}},
            "priorityClassName": "high",
            "schedulerName": "volcano",
            "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
            "shmSize": "8Gi",
        }
    )
    pod = builders.worker_pod(j, 1, 3, SETTINGS)
    c = pod["spec"]["containers"][0]
    assert c["image"] == "custom:2"
    assert c["command"] == [
        "torchrun",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "4",
        "--node-rank",
        "1",
        "--master-addr",
        "intent-worker-0.intent-workers.ml.svc",
        "--master-port",
        "29500",
        "--max-restarts=0",
        "-m",
        "kdistill.trainer",
        "--config",
        "/etc/kdistill/job.yaml",
        "--output",
        "/mnt/checkpoints/ml/intent",
    ]
    assert c["resources"] == {"limits": {"memory": "64Gi", "nvidia.com/gpu": "4"}, "requests": {"nvidia.com/gpu": "4"}}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KDISTILL_JOB_NAME"] == "intent" and env["KDISTILL_JOB_NAMESPACE"] == "ml"
    assert env["KDISTILL_PVC_ROOT"] == "/mnt/pvc" and env["PET_NODE_RANK"] == "1" and env["NCCL_DEBUG"] == "INFO"
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"pool": "a100"} and spec["priorityClassName"] == "high"
    assert spec["schedulerName"] == "volcano" and spec["tolerations"][0]["key"] == "dedicated"
    assert spec["hostname"] == "intent-worker-1" and spec["subdomain"] == "intent-workers"
    assert spec["restartPolicy"] == "Never" and spec["serviceAccountName"] == "intent-trainer"
    labels = pod["metadata"]["labels"]
    assert labels[names.LABEL_ATTEMPT] == "3" and labels[names.LABEL_INDEX] == "1"
    # The trainer's fence carries the same attempt as the label.
    assert env["KDISTILL_ATTEMPT"] == "3"
    assert labels[names.LABEL_JOB] == "intent"
    dshm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


def test_worker_pod_mounts_claims_read_only_and_checkpoints_rw() -> None:
    pod = builders.worker_pod(job(), 0, 0, SETTINGS)
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert vols["pvc-models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert vols["pvc-data"]["persistentVolumeClaim"] == {"claimName": "data", "readOnly": True}
    assert mounts["/mnt/pvc/models"]["readOnly"] and mounts["/mnt/pvc/data"]["readOnly"]
    assert vols["checkpoints"]["persistentVolumeClaim"] == {"claimName": "ckpt", "readOnly": False}
    assert not mounts["/mnt/checkpoints"].get("readOnly")
    assert mounts["/tmp"]["name"] == "tmp" and mounts["/etc/kdistill"]["readOnly"]


def test_a_source_claim_that_is_also_the_checkpoint_claim_is_one_volume() -> None:
    # Two pod volumes for one claim leave the kubelet waiting on the mount forever (found in e2e).
    pod = builders.worker_pod(job(checkpoint={"volume": {"claimName": "data"}}), 0, 0, SETTINGS)
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert sorted(claims) == ["data", "models"]
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/pvc/data"] == {"name": "checkpoints", "mountPath": "/mnt/pvc/data", "readOnly": True}
    assert mounts["/mnt/checkpoints"]["name"] == "checkpoints" and not mounts["/mnt/checkpoints"].get("readOnly")
    names_used = {m["name"] for m in mounts.values()}
    assert names_used <= {v["name"] for v in pod["spec"]["volumes"]}


def test_worker_security_context_is_locked_down() -> None:
    pod = builders.worker_pod(job(), 0, 0, SETTINGS)
    sc = pod["spec"]["containers"][0]["securityContext"]
    assert sc == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["containers"][0]["terminationMessagePath"] == "/dev/termination-log"


def test_pods_run_as_the_images_user_with_user_and_home_set() -> None:
    # The uid the operator runs pods as is the one every image declares (and has a passwd entry for).
    for dockerfile in ("trainer.Dockerfile", "operator.Dockerfile"):
        text = (REPO / "docker" / dockerfile).read_text()
        uid = names.RUNTIME_UID
        assert f"USER {uid}:{uid}" in text and f"useradd --uid {uid} --gid {uid}" in text, dockerfile
        assert f"USER={names.RUNTIME_USER}" in text, dockerfile
    j = job()
    for spec in (
        builders.worker_pod(j, 0, 0, SETTINGS)["spec"],
        builders.serving_deployment(j, SETTINGS)["spec"]["template"]["spec"],
    ):
        assert spec["securityContext"]["runAsUser"] == spec["securityContext"]["fsGroup"] == names.RUNTIME_UID
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        # getpass.getuser() (torch) reads USER/LOGNAME first: no passwd entry needed in a custom image
        assert env["USER"] == env["LOGNAME"] == "kdistill"
        assert env["HOME"] == "/tmp" and env["XDG_CACHE_HOME"] == "/tmp/.cache"


def test_image_pull_policy_reaches_worker_and_serving_containers(monkeypatch: pytest.MonkeyPatch) -> None:
    j = job()
    worker = builders.worker_pod(j, 0, 0, SETTINGS)["spec"]["containers"][0]
    assert "imagePullPolicy" not in worker  # unset: Kubernetes' own default for the tag
    monkeypatch.setenv("KDISTILL_IMAGE_PULL_POLICY", "Never")  # as the chart sets it from image.pullPolicy
    settings = Settings(trainer_image="reg/trainer:1", server_image="reg/server:1")
    assert settings.image_pull_policy == "Never"
    assert builders.worker_pod(j, 1, 0, settings)["spec"]["containers"][0]["imagePullPolicy"] == "Never"
    dep = builders.serving_deployment(j, settings)
    assert dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "Never"
    with pytest.raises(ValueError, match="'sometimes' is not one of Always, IfNotPresent, Never"):
        Settings(image_pull_policy="sometimes")


def test_cpu_job_has_no_gpu_request_and_one_process() -> None:
    j = job(parallelism={"nodes": 1, "gpusPerNode": 0}, serving={"enabled": False})
    c = builders.worker_pod(j, 0, 0, SETTINGS)["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert c["command"][c["command"].index("--nproc-per-node") + 1] == "1"
    assert c["image"] == "reg/trainer:1"


def test_config_map_holds_the_resolved_job_that_the_trainer_can_load(tmp_path: Any) -> None:
    cm = builders.config_map(job())
    text = cm["data"]["job.yaml"]
    path = tmp_path / "job.yaml"
    path.write_text(text)
    loaded = load_job(path)
    assert loaded.spec.distillation.temperature.start == 5.0  # defaults filled in
    assert yaml.safe_load(text)["metadata"] == {"name": "intent", "namespace": "ml"}


def test_headless_service_publishes_not_ready_addresses() -> None:
    svc = builders.workers_service(job())
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["metadata"]["name"] == "intent-workers"
    assert svc["spec"]["selector"] == {names.LABEL_JOB: "intent", names.LABEL_ROLE: "worker"}


def test_checkpoint_pvc_only_when_a_size_is_given() -> None:
    assert builders.checkpoint_pvc(job()) is None
    pvc = builders.checkpoint_pvc(job(checkpoint={"volume": {"size": "50Gi", "storageClassName": "nfs"}}))
    assert pvc is not None
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "50Gi"}},
        "storageClassName": "nfs",
    }
    assert pvc["metadata"]["name"] == "intent-checkpoints"
    pod = builders.worker_pod(job(checkpoint={"volume": {"size": "50Gi"}}), 0, 0, SETTINGS)
    vol = next(v for v in pod["spec"]["volumes"] if v["name"] == "checkpoints")
    assert vol["persistentVolumeClaim"]["claimName"] == "intent-checkpoints"


def test_trainer_role_allows_only_its_own_status() -> None:
    sa, role, binding = builders.trainer_rbac(job())
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == "intent-trainer"
    assert role["rules"] == [
        {
            "apiGroups": ["kdistill.io"],
            "resources": ["distillationjobs/status"],
            "resourceNames": ["intent"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "intent-trainer", "namespace": "ml"}]
    own = builders.trainer_rbac(job(template={"serviceAccountName": "mine"}))
    assert [o["kind"] for o in own] == ["Role", "RoleBinding"]
    assert own[1]["subjects"][0]["name"] == "mine"


def test_serving_deployment_service_pdb_hpa() -> None:
    j = job(
        serving={
            "replicas": 3,
            "port": 9000,
            "resources": {"limits": {"cpu": "2"}},
            "batching": {"maxBatchSize": 16, "maxWaitMs": 5},
        }
    )
    dep = builders.serving_deployment(j, SETTINGS)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert dep["metadata"]["name"] == "intent-serving" and dep["spec"]["replicas"] == 3
    assert c["command"][:3] == ["kdistill", "serve", "/mnt/checkpoints/ml/intent/student-int8"]
    assert c["command"][c["command"].index("--max-batch-size") + 1] == "16"
    assert c["command"][c["command"].index("--max-wait-ms") + 1] == "5"
    assert c["command"][c["command"].index("--port") + 1] == "9000"
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 9000}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 9000}
    assert c["resources"] == {"limits": {"cpu": "2"}} and c["image"] == "reg/server:1"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    vol = dep["spec"]["template"]["spec"]["volumes"][0]
    assert vol["persistentVolumeClaim"] == {"claimName": "ckpt", "readOnly": True}
    assert builders.serving_service(j)["spec"]["ports"][0]["port"] == 9000
    assert builders.serving_pdb(j) is not None
    assert builders.serving_pdb(job()) is None  # one replica: no PDB
    assert builders.serving_hpa(j) is None
    auto = job(serving={"autoscaling": {"minReplicas": 2, "maxReplicas": 5}})
    hpa = builders.serving_hpa(auto)
    assert hpa is not None and hpa["spec"]["maxReplicas"] == 5 and hpa["spec"]["minReplicas"] == 2
    assert "replicas" not in builders.serving_deployment(auto, SETTINGS)["spec"]  # the HPA owns it
    assert names.serving_url("intent", j.spec.serving.name, j.namespace, j.spec.serving.port) == (
        "http://intent-serving.ml.svc:9000"
    )


def test_shared_serving_name_keeps_previous_model_for_rollback() -> None:
    j = job(serving={"name": "intent-prod"})
    dep = builders.serving_deployment(j, SETTINGS, previous_model_path="/mnt/checkpoints/ml/old/student-int8")
    ann = dep["metadata"]["annotations"]
    assert dep["metadata"]["name"] == "intent-prod"
    assert ann[names.ANNOTATION_PREVIOUS_MODEL_PATH] == "/mnt/checkpoints/ml/old/student-int8"
    assert ann[names.ANNOTATION_MODEL_PATH] == "/mnt/checkpoints/ml/intent/student-int8"
    same = builders.serving_deployment(j, SETTINGS, previous_model_path="/mnt/checkpoints/ml/intent/student-int8")
    assert names.ANNOTATION_PREVIOUS_MODEL_PATH not in same["metadata"]["annotations"]


def test_owner_references() -> None:
    body = job_dict()
    objs = builders.adopt(builders.training_objects(job()) + builders.worker_pods(job(), 0, SETTINGS), body)
    for obj in objs:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == "u-1" and ref["controller"] is True and ref["kind"] == "DistillationJob"
    (dep,) = builders.co_own([builders.serving_deployment(job(), SETTINGS)], body)
    assert dep["metadata"]["ownerReferences"][0]["controller"] is False


def test_builders_are_pure() -> None:
    j = job()
    before = copy.deepcopy(j.model_dump())
    assert builders.worker_pods(j, 1, SETTINGS) == builders.worker_pods(j, 1, SETTINGS)
    builders.serving_deployment(j, SETTINGS)
    assert j.model_dump() == before


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"checkpoint": {}}, "serving.enabled"),
        ({"checkpoint": {}, "serving": {"enabled": False}}, "parallelism.nodes > 1"),
    ],
)
def test_specs_a_cluster_cannot_run_are_refused(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(builders.BuildError, match=message.replace(".", r"\.")):
        builders.check_buildable(job(**spec))
    builders.check_buildable(job())


def test_operator_never_imports_torch() -> None:
    code = (
        "import sys, kdistill.operator.handlers, kdistill.operator.main, kdistill.cli.operator;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_new_gangs_avoid_unready_nodes_in_every_required_term() -> None:
    j = job(
        template={
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]},
                            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}]},
                        ]
                    }
                }
            }
        }
    )
    pod = builders.worker_pod(j, 0, 1, SETTINGS, ["n2", "n1"])
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert len(terms) == 2
    for term in terms:
        assert term["matchFields"] == [{"key": "metadata.name", "operator": "NotIn", "values": ["n1", "n2"]}]
        assert term["matchExpressions"][0]["key"] == "pool"
    plain = builders.worker_pod(job(), 0, 1, SETTINGS, ["n1"])["spec"]["affinity"]
    assert plain["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n1"]}]}
    ]
    assert "affinity" not in builders.worker_pod(job(), 0, 1, SETTINGS)["spec"]


# -- the served teacher ------------------------------------------------------------------------

SERVED = {"model": "pvc://models/teacher/v3", "serve": {"enabled": True, "replicas": 2, "gpusPerReplica": 2,
          "resources": {"limits": {"memory": "80Gi"}},
          "batching": {"maxBatchSize": 32, "maxBatchTokens": 4096, "maxWaitMs": 5}}}  # fmt: skip
PLACEMENT = {
    "image": "custom:2",
    "nodeSelector": {"pool": "a100"},
    "tolerations": [{"key": "dedicated", "operator": "Exists"}],
    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    "imagePullSecrets": [{"name": "reg"}],
    "priorityClassName": "high",
}


def test_teacher_deployment_serves_the_model_on_gpus_placed_like_the_workers() -> None:
    j = job(teacher=SERVED, template=PLACEMENT)
    dep = builders.teacher_deployment(j, SETTINGS)
    assert dep["metadata"]["name"] == "intent-teacher" and dep["metadata"]["namespace"] == "ml"
    assert dep["metadata"]["labels"][names.LABEL_ROLE] == names.ROLE_TEACHER
    assert dep["metadata"]["annotations"][names.ANNOTATION_SOURCE_JOB] == "intent"
    spec = dep["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"] == names.teacher_labels("intent")
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "custom:2"  # the trainer image (the template's, like the workers)
    cmd = c["command"]
    assert cmd[:3] == ["kdistill", "serve", "/mnt/pvc/models/teacher/v3"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert flags == {"--host": "0.0.0.0", "--port": "8080", "--model-name": "intent-teacher",
                     "--max-batch-size": "32", "--max-batch-tokens": "4096", "--max-wait-ms": "5",
                     "--max-logprobs-binary": "128", "--max-tokens-limit": "512"}  # fmt: skip
    assert c["resources"]["limits"] == {"memory": "80Gi", "nvidia.com/gpu": "2"}
    assert c["resources"]["requests"] == {"nvidia.com/gpu": "2"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets", "priorityClassName"):
        assert pod[key] == PLACEMENT[key], key
    worker = builders.worker_pod(j, 0, 0, SETTINGS)["spec"]
    assert worker["tolerations"] == pod["tolerations"] and worker["nodeSelector"] == pod["nodeSelector"]
    # The teacher's claim is mounted read-only where the workers mount it.
    assert {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert {"name": "pvc-models", "mountPath": "/mnt/pvc/models", "readOnly": True} in c["volumeMounts"]
    worker_mount = next(m for m in worker["containers"][0]["volumeMounts"] if m["mountPath"] == "/mnt/pvc/models")
    assert worker_mount["readOnly"]
    # Non-root, read-only root filesystem, no API token: like the serving pods.
    assert c["securityContext"] == builders.container_security_context()
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_teacher_on_cpu_asks_for_no_gpu_and_trust_remote_code_reaches_the_server() -> None:
    served = {"model": "/models/teacher", "trustRemoteCode": True, "serve": {"enabled": True, "gpusPerReplica": 0}}
    dep = builders.teacher_deployment(job(teacher=served), SETTINGS)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert c["command"][2] == "/models/teacher" and c["command"][-1] == "--trust-remote-code"
    assert c["image"] == "reg/trainer:1"
    assert dep["spec"]["template"]["spec"]["volumes"] == [{"name": "tmp", "emptyDir": {}}]


def test_teacher_service_selects_the_teacher_pods_on_the_url_the_workers_get() -> None:
    j = job(teacher=SERVED)
    svc = builders.teacher_service(j)
    assert svc["metadata"]["name"] == "intent-teacher"
    assert svc["spec"]["selector"] == names.teacher_labels("intent")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": 8080}]
    assert "clusterIP" not in svc["spec"]  # a ClusterIP Service: it balances over the replicas
    for pod in builders.worker_pods(j, 0, SETTINGS):
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["KDISTILL_TEACHER_URL"] == "http://intent-teacher.ml.svc:8080"
    # The workers' selector and the teacher's never overlap.
    assert names.teacher_labels("intent")[names.LABEL_ROLE] != names.ROLE_WORKER


def test_an_endpoint_teacher_gives_the_workers_its_url_and_a_local_teacher_none() -> None:
    j = job(teacher={"endpoint": "http://other-teacher:8080"}, student={"model": "pvc://models/student"})
    env = {e["name"]: e.get("value") for e in builders.worker_pod(j, 0, 0, SETTINGS)["spec"]["containers"][0]["env"]}
    assert env["KDISTILL_TEACHER_URL"] == "http://other-teacher:8080"
    env = {e["name"] for e in builders.worker_pod(job(), 0, 0, SETTINGS)["spec"]["containers"][0]["env"]}
    assert "KDISTILL_TEACHER_URL" not in env


def test_teacher_spec_hash_follows_the_spec() -> None:
    a = builders.teacher_deployment(job(teacher=SERVED), SETTINGS)
    b = builders.teacher_deployment(job(teacher=SERVED), SETTINGS)
    assert (
        a["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH]
        == b["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH]
    )
    other = Settings(trainer_image="reg/trainer:2", server_image="reg/server:1")
    c = builders.teacher_deployment(job(teacher=SERVED), other)
    assert (
        c["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH]
        != a["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH]
    )


def test_a_served_hf_teacher_is_refused_in_a_cluster() -> None:
    with pytest.raises(builders.BuildError, match=r"teacher\.model must be pvc://"):
        builders.check_buildable(job(teacher={"model": "hf://org/teacher", "serve": {"enabled": True}}))
    builders.check_buildable(job(teacher={"model": "hf://org/teacher"}))
    builders.check_buildable(job(teacher=SERVED))
