"""Pure builders: a DistillationJob in, the Kubernetes manifests it owns out (plain dicts).

Nothing here talks to the API server. Handlers apply what these return; tests check them
without a cluster. Owner references are added by :func:`adopt` (``kopf.adopt``), which the
handlers call with the live job body.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from typing import Any

import kopf
import yaml

from kdistill.api import DistillationJob, metadata, parse_source_uri, pvc_claims
from kdistill.api.failures import TERMINATION_LOG
from kdistill.api.teacher_serve import teacher_serve_options

from . import names, rbac
from .settings import Settings

Manifest = dict[str, Any]
GPU_RESOURCE = "nvidia.com/gpu"
NON_ROOT_UID = names.RUNTIME_UID


class BuildError(ValueError):
    """The job cannot be turned into objects in a cluster (e.g. serving without a shared volume)."""


def _meta(job: DistillationJob, name: str, role: str, extra_labels: dict[str, str] | None = None) -> Manifest:
    labels = {
        names.LABEL_JOB: job.metadata.name,
        names.LABEL_ROLE: role,
        names.LABEL_MANAGED_BY: names.MANAGER,
    }
    labels.update(extra_labels or {})
    return {"name": name, "namespace": job.namespace, "labels": labels}


def check_buildable(job: DistillationJob) -> None:
    """Raise BuildError for specs the API accepts but a cluster cannot run as written."""
    volume = job.spec.checkpoint.volume
    if volume is None and job.spec.serving.enabled:
        raise BuildError(
            "checkpoint.volume is required in a cluster when serving.enabled: the server reads the INT8 student from it"
        )
    if volume is None and job.spec.parallelism.nodes > 1:
        raise BuildError("checkpoint.volume (ReadWriteMany) is required in a cluster when parallelism.nodes > 1")
    teacher = job.spec.teacher
    if teacher.serve.enabled and teacher.model is not None and parse_source_uri(teacher.model).kind == "hf":
        raise BuildError(
            "teacher.model must be pvc://CLAIM/PATH (or a path inside the trainer image) in a cluster when "
            "teacher.serve.enabled: the teacher's server reads a model directory and downloads nothing"
        )


def job_config(job: DistillationJob) -> str:
    """The resolved job (every default filled in) the trainer reads with --config."""
    wire = job.to_wire()
    wire["metadata"] = {"name": job.metadata.name, "namespace": job.namespace}
    wire.pop("status", None)
    return yaml.safe_dump(wire, sort_keys=True)


def config_map(job: DistillationJob) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, names.config_map(job.metadata.name), names.ROLE_WORKER),
        "data": {names.CONFIG_FILE: job_config(job)},
    }


def workers_service(job: DistillationJob) -> Manifest:
    """Headless, and publishing not-ready addresses: workers resolve each other before they are Ready."""
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, names.workers_service(name), names.ROLE_WORKER),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {names.LABEL_JOB: name, names.LABEL_ROLE: names.ROLE_WORKER},
            "ports": [{"name": "rendezvous", "port": names.RDZV_PORT, "targetPort": names.RDZV_PORT}],
        },
    }


def checkpoint_claim_name(job: DistillationJob) -> str | None:
    volume = job.spec.checkpoint.volume
    if volume is None:
        return None
    return volume.claim_name or names.checkpoint_claim(job.metadata.name)


def checkpoint_pvc(job: DistillationJob) -> Manifest | None:
    """The PVC the operator creates when checkpoint.volume gives a size (not a claimName)."""
    volume = job.spec.checkpoint.volume
    if volume is None or volume.size is None:
        return None
    mode = "ReadWriteMany" if job.spec.parallelism.nodes > 1 else "ReadWriteOnce"
    spec: Manifest = {"accessModes": [mode], "resources": {"requests": {"storage": volume.size}}}
    if volume.storage_class_name is not None:
        spec["storageClassName"] = volume.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(job, names.checkpoint_claim(job.metadata.name), names.ROLE_WORKER),
        "spec": spec,
    }


def trainer_service_account_name(job: DistillationJob) -> str:
    return job.spec.template.service_account_name or names.trainer_account(job.metadata.name)


def trainer_rbac(job: DistillationJob) -> list[Manifest]:
    """A Role allowing only get/patch on this one job's status, bound to the pods' ServiceAccount."""
    name = job.metadata.name
    account = trainer_service_account_name(job)
    objs: list[Manifest] = []
    if not job.spec.template.service_account_name:
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": _meta(job, account, names.ROLE_WORKER),
            }
        )
    objs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(job, names.trainer_account(name), names.ROLE_WORKER),
            "rules": rbac.worker_rules(name),
        }
    )
    objs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(job, names.trainer_account(name), names.ROLE_WORKER),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.trainer_account(name)},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": job.namespace}],
        }
    )
    return objs


def training_objects(job: DistillationJob) -> list[Manifest]:
    """Everything the gang needs before its pods: config, rendezvous Service, PVC, RBAC."""
    objs = [config_map(job), workers_service(job)]
    pvc = checkpoint_pvc(job)
    if pvc is not None:
        objs.append(pvc)
    return objs + trainer_rbac(job)


def _source_claims(job: DistillationJob) -> list[str]:
    spec = job.spec
    run = spec.data.run_data  # a scheduled run also reads its partitions and the champion
    extra = [run.partitions, run.champion] if run is not None else []
    return pvc_claims([spec.teacher.model, spec.student.model, spec.data.train, spec.data.eval, *extra])


def _merge_gpu(resources: Manifest, gpus: int) -> Manifest:
    out = copy.deepcopy(resources)
    if gpus > 0:
        # Extended resources must have requests equal to limits.
        out.setdefault("limits", {})[GPU_RESOURCE] = str(gpus)
        out.setdefault("requests", {})[GPU_RESOURCE] = str(gpus)
    return out


def runtime_env() -> list[Manifest]:
    return [{"name": k, "value": v} for k, v in names.RUNTIME_ENV]


def with_pull_policy(container: Manifest, settings: Settings) -> Manifest:
    """The pull policy the operator was installed with (the chart's image.pullPolicy), if any."""
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    return container


def container_security_context() -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_UID,
        "runAsGroup": NON_ROOT_UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_UID,
        "runAsGroup": NON_ROOT_UID,
        "fsGroup": NON_ROOT_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def torchrun_command(job: DistillationJob, index: int) -> list[str]:
    name, ns = job.metadata.name, job.namespace
    par = job.spec.parallelism
    return [
        "torchrun",
        "--nnodes",
        str(par.nodes),
        "--nproc-per-node",
        str(par.procs_per_node),
        "--node-rank",
        str(index),
        "--master-addr",
        names.master_address(name, ns),
        "--master-port",
        str(names.RDZV_PORT),
        "--max-restarts=0",
        "-m",
        "kdistill.trainer",
        "--config",
        f"{names.CONFIG_DIR}/{names.CONFIG_FILE}",
        "--output",
        names.output_dir(ns, name),
    ]


def _worker_env(job: DistillationJob, index: int, attempt: int) -> list[Manifest]:
    name, ns = job.metadata.name, job.namespace
    par = job.spec.parallelism
    env: list[Manifest] = [
        {"name": metadata.JOB_NAME_ENV, "value": name},
        {"name": metadata.JOB_NAMESPACE_ENV, "value": ns},
        {"name": metadata.PVC_ROOT_ENV, "value": names.PVC_ROOT},
        # The gang attempt (the pod's LABEL_ATTEMPT): the trainer's fence against older attempts.
        {"name": metadata.ATTEMPT_ENV, "value": str(attempt)},
        # torchrun's env conventions, for tools that read them rather than the flags.
        {"name": "MASTER_ADDR", "value": names.master_address(name, ns)},
        {"name": "MASTER_PORT", "value": str(names.RDZV_PORT)},
        {"name": "PET_NNODES", "value": str(par.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(par.procs_per_node)},
        {"name": "PET_NODE_RANK", "value": str(index)},
        # The root filesystem is read-only: caches go to the writable /tmp.
        *runtime_env(),
    ]
    url = teacher_url(job)
    if url:
        env.append({"name": metadata.TEACHER_URL_ENV, "value": url})
    if job.spec.teacher.token_secret:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": job.spec.teacher.token_secret, "key": "HF_TOKEN"}},
            }
        )
    return env + copy.deepcopy(job.spec.template.env)


def _checkpoint_volume(job: DistillationJob, read_only: bool) -> Manifest:
    claim = checkpoint_claim_name(job)
    if claim is None:
        return {"name": "checkpoints", "emptyDir": {}}
    return {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}


def avoid_nodes(affinity: Manifest, nodes: Iterable[str]) -> Manifest:
    """The template's affinity, plus: never schedule on these nodes (NotReady ones at creation).

    Required node-selector terms are ORed, so the exclusion goes into every term."""
    avoid = sorted(set(nodes))
    out = copy.deepcopy(affinity)
    if not avoid:
        return out
    required = out.setdefault("nodeAffinity", {}).setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    for term in terms:
        term.setdefault("matchFields", []).append({"key": "metadata.name", "operator": "NotIn", "values": avoid})
    required["nodeSelectorTerms"] = terms
    return out


def worker_pod(
    job: DistillationJob, index: int, attempt: int, settings: Settings, unready_nodes: Iterable[str] = ()
) -> Manifest:
    """Worker `index` of gang attempt `attempt` (a label, so stale pods are told apart).

    `unready_nodes` are kept out of reach: after a node is lost, the scheduler could otherwise
    place the new gang on it before the node controller taints it."""
    name = job.metadata.name
    tpl = job.spec.template
    gpus = job.spec.parallelism.gpus_per_node
    claims = _source_claims(job)
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": names.config_map(name)}},
        _checkpoint_volume(job, read_only=False),
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": tpl.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": names.CONFIG_DIR, "readOnly": True},
        {"name": "checkpoints", "mountPath": names.CHECKPOINT_MOUNT},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    checkpoint_claim = checkpoint_claim_name(job)
    for claim in claims:
        # One claim, one pod volume: a second volume for the checkpoint claim leaves the kubelet
        # waiting forever on the mount, so the sources read the checkpoint volume through a read-only mount.
        volume_name = "checkpoints" if claim == checkpoint_claim else f"pvc-{claim}"
        if volume_name != "checkpoints":
            volumes.append({"name": volume_name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": volume_name, "mountPath": f"{names.PVC_ROOT}/{claim}", "readOnly": True})
    volumes += copy.deepcopy(tpl.volumes)
    mounts += copy.deepcopy(tpl.volume_mounts)

    container: Manifest = {
        "name": names.TRAINER_CONTAINER,
        "image": tpl.image or settings.trainer_image,
        "command": torchrun_command(job, index),
        "env": _worker_env(job, index, attempt),
        "resources": _merge_gpu(tpl.resources, gpus),
        "ports": [{"name": "rendezvous", "containerPort": names.RDZV_PORT}],
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    spec: Manifest = {
        "restartPolicy": "Never",
        "hostname": names.worker_pod(name, index),
        "subdomain": names.workers_service(name),
        "serviceAccountName": trainer_service_account_name(job),
        "automountServiceAccountToken": True,
        "securityContext": pod_security_context(),
        "containers": [with_pull_policy(container, settings)],
        "volumes": volumes,
    }
    optional = {
        "nodeSelector": dict(tpl.node_selector),
        "tolerations": copy.deepcopy(tpl.tolerations),
        "affinity": avoid_nodes(tpl.affinity, unready_nodes),
        "imagePullSecrets": copy.deepcopy(tpl.image_pull_secrets),
        "priorityClassName": tpl.priority_class_name,
        "schedulerName": tpl.scheduler_name,
    }
    spec.update({k: v for k, v in optional.items() if v})
    meta = _meta(
        job,
        names.worker_pod(name, index),
        names.ROLE_WORKER,
        {
            names.LABEL_INDEX: str(index),
            names.LABEL_ATTEMPT: str(attempt),
        },
    )
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def worker_pods(
    job: DistillationJob, attempt: int, settings: Settings, unready_nodes: Iterable[str] = ()
) -> list[Manifest]:
    nodes = list(unready_nodes)
    return [worker_pod(job, i, attempt, settings, nodes) for i in range(job.spec.parallelism.nodes)]


# -- the served teacher ----------------------------------------------------------------------


def teacher_url(job: DistillationJob) -> str:
    """KDISTILL_TEACHER_URL for the workers: the served teacher's Service, or teacher.endpoint
    (e.g. another job's teacher Service, shared by several students); "" for an in-process teacher."""
    teacher = job.spec.teacher
    if teacher.serve.enabled:
        return names.teacher_url(job.metadata.name, job.namespace)
    return teacher.endpoint


def teacher_model_path(job: DistillationJob) -> str:
    """Where the teacher's pods see teacher.model: pvc://CLAIM/PATH under the claim's mount, as in the workers."""
    model = job.spec.teacher.model
    if model is None:
        raise BuildError("teacher.serve.enabled serves teacher.model, which is not set")
    uri = parse_source_uri(model)
    if uri.kind == "pvc":
        return f"{names.PVC_ROOT}/{uri.claim}/{uri.path}"
    if uri.kind == "path":
        return uri.path
    raise BuildError("teacher.model must be pvc://CLAIM/PATH or a path when teacher.serve.enabled")


def teacher_command(job: DistillationJob) -> list[str]:
    return [
        "kdistill",
        "serve",
        teacher_model_path(job),
        "--host",
        "0.0.0.0",
        "--port",
        str(names.TEACHER_PORT),
        "--model-name",
        names.teacher(job.metadata.name),
        *teacher_serve_options(job.spec),
    ]


def spec_hash(spec: Manifest) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def teacher_deployment(job: DistillationJob, settings: Settings) -> Manifest:
    """`<job>-teacher`: the trainer image running `kdistill serve` on teacher.model, placed like the
    workers (GPUs, nodeSelector, tolerations, affinity), non-root with a read-only root filesystem.
    Ready once the model is loaded and warmed up (the server's readiness endpoint)."""
    name = job.metadata.name
    tpl = job.spec.template
    serve = job.spec.teacher.serve
    labels = names.teacher_labels(name)
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": "/tmp"}]
    for claim in pvc_claims([job.spec.teacher.model]):
        volumes.append({"name": f"pvc-{claim}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"pvc-{claim}", "mountPath": f"{names.PVC_ROOT}/{claim}", "readOnly": True})
    container: Manifest = {
        "name": names.TEACHER_CONTAINER,
        "image": tpl.image or settings.trainer_image,
        "command": teacher_command(job),
        "ports": [{"name": "http", "containerPort": names.TEACHER_PORT}],
        "env": runtime_env(),
        "resources": _merge_gpu(serve.resources, serve.gpus_per_replica),
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": names.TEACHER_PORT},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        # Liveness answers as soon as the process listens, while a large teacher still loads.
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": names.TEACHER_PORT},
            "initialDelaySeconds": 30,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }
    pod_spec: Manifest = {
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,
        "containers": [with_pull_policy(container, settings)],
        "volumes": volumes,
    }
    optional = {
        "nodeSelector": dict(tpl.node_selector),
        "tolerations": copy.deepcopy(tpl.tolerations),
        "affinity": copy.deepcopy(tpl.affinity),
        "imagePullSecrets": copy.deepcopy(tpl.image_pull_secrets),
        "priorityClassName": tpl.priority_class_name,
        "schedulerName": tpl.scheduler_name,
    }
    pod_spec.update({k: v for k, v in optional.items() if v})
    spec: Manifest = {
        "replicas": serve.replicas,
        "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    meta = _meta(job, names.teacher(name), names.ROLE_TEACHER)
    # The source-job annotation routes the Deployment's events to this job (handlers.deployment_event).
    meta["annotations"] = {names.ANNOTATION_SOURCE_JOB: name, names.ANNOTATION_SPEC_HASH: spec_hash(spec)}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def teacher_service(job: DistillationJob) -> Manifest:
    """`<job>-teacher`: what KDISTILL_TEACHER_URL names, and what other jobs' teacher.endpoint may name."""
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, names.teacher(name), names.ROLE_TEACHER),
        "spec": {
            "selector": names.teacher_labels(name),
            "ports": [{"name": "http", "port": names.TEACHER_PORT, "targetPort": names.TEACHER_PORT}],
        },
    }


# -- serving ---------------------------------------------------------------------------------


def serving_labels(serving_name: str) -> dict[str, str]:
    return {names.LABEL_SERVING: serving_name, names.LABEL_ROLE: names.ROLE_SERVER}


def serving_command(job: DistillationJob) -> list[str]:
    srv = job.spec.serving
    b = srv.batching
    command = [
        "kdistill",
        "serve",
        names.model_path(job.namespace, job.metadata.name),
        "--host",
        "0.0.0.0",
        "--port",
        str(srv.port),
        "--model-name",
        job.metadata.name,
        "--max-batch-size",
        str(b.max_batch_size),
        "--max-batch-tokens",
        str(b.max_batch_tokens),
        "--max-wait-ms",
        str(b.max_wait_ms),
        "--max-queue",
        str(b.max_queue),
    ]
    if (fb := srv.fallback) is not None:  # cascade serving: the teacher answers what the student is unsure of
        command += [
            "--fallback-url",
            fb.endpoint,
            "--min-confidence",
            repr(fb.min_confidence),
            "--fallback-timeout",
            repr(fb.timeout_seconds),
            "--fallback-on-error",
            fb.on_teacher_error,
            "--fallback-max-in-flight",
            str(fb.max_in_flight),
        ]
        if fb.model:
            command += ["--fallback-model", fb.model]
    return command


# Long enough for the endpoint change to reach every node's kube-proxy before the server stops
# taking connections; then the server's own graceful drain (kdistill serve, 30 s).
SERVING_PRE_STOP_SECONDS = 5
SERVING_TERMINATION_GRACE_SECONDS = SERVING_PRE_STOP_SECONDS + 35


def serving_deployment(job: DistillationJob, settings: Settings, previous_model_path: str | None = None) -> Manifest:
    """The server Deployment. A job sharing `serving.name` with an earlier one rolls into it,
    keeping the model it replaces in an annotation for rollback."""
    srv = job.spec.serving
    name = names.serving(job.metadata.name, srv.name)
    model = names.model_path(job.namespace, job.metadata.name)
    annotations = {names.ANNOTATION_MODEL_PATH: model, names.ANNOTATION_SOURCE_JOB: job.metadata.name}
    if previous_model_path and previous_model_path != model:
        annotations[names.ANNOTATION_PREVIOUS_MODEL_PATH] = previous_model_path
    labels = serving_labels(name)
    probe_port = srv.port
    container: Manifest = {
        "name": names.SERVER_CONTAINER,
        "image": srv.image or settings.server_image,
        "command": serving_command(job),
        "ports": [{"name": "http", "containerPort": srv.port}],
        "env": runtime_env(),
        "resources": copy.deepcopy(srv.resources),
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": probe_port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": probe_port},
            "initialDelaySeconds": 30,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "volumeMounts": [
            {"name": "checkpoints", "mountPath": names.CHECKPOINT_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": container_security_context(),
        # A pod being replaced keeps serving until the Service has stopped sending it
        # connections, so a rollout (or a canary's end) fails no request.
        "lifecycle": {"preStop": {"sleep": {"seconds": SERVING_PRE_STOP_SECONDS}}},
    }
    spec: Manifest = {
        "selector": {"matchLabels": labels},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {
            "metadata": {"labels": labels, "annotations": {names.ANNOTATION_MODEL_PATH: model}},
            "spec": {
                "securityContext": pod_security_context(),
                "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": SERVING_TERMINATION_GRACE_SECONDS,
                "containers": [with_pull_policy(container, settings)],
                "volumes": [_checkpoint_volume(job, read_only=True), {"name": "tmp", "emptyDir": {}}],
            },
        },
    }
    if srv.autoscaling.max_replicas == 0:
        # With an HPA, replicas belong to it; setting them here would fight it.
        spec["replicas"] = srv.replicas
    meta = {
        "name": name,
        "namespace": job.namespace,
        "labels": {**labels, names.LABEL_MANAGED_BY: names.MANAGER},
        "annotations": annotations,
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def serving_service(job: DistillationJob) -> Manifest:
    srv = job.spec.serving
    name = names.serving(job.metadata.name, srv.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": job.namespace,
            "labels": {**serving_labels(name), names.LABEL_MANAGED_BY: names.MANAGER},
        },
        "spec": {
            "selector": serving_labels(name),
            "ports": [{"name": "http", "port": srv.port, "targetPort": srv.port}],
        },
    }


def serving_pdb(job: DistillationJob) -> Manifest | None:
    """Only with more than one replica: a PDB on a single replica would block node drains."""
    srv = job.spec.serving
    if srv.replicas <= 1 and srv.autoscaling.max_replicas <= 1:
        return None
    name = names.serving(job.metadata.name, srv.name)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": name,
            "namespace": job.namespace,
            "labels": {**serving_labels(name), names.LABEL_MANAGED_BY: names.MANAGER},
        },
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": serving_labels(name)}},
    }


def serving_hpa(job: DistillationJob) -> Manifest | None:
    auto = job.spec.serving.autoscaling
    if auto.max_replicas <= 0:
        return None
    name = names.serving(job.metadata.name, job.spec.serving.name)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": name,
            "namespace": job.namespace,
            "labels": {**serving_labels(name), names.LABEL_MANAGED_BY: names.MANAGER},
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": max(auto.min_replicas, 1),
            "maxReplicas": auto.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ],
        },
    }


# -- ownership -------------------------------------------------------------------------------


def adopt(objs: Iterable[Manifest], owner: Manifest) -> list[Manifest]:
    """The job becomes the controller owner: deleting it garbage-collects them."""
    out = list(objs)
    kopf.adopt(out, owner=owner)  # type: ignore[arg-type]
    return out


def co_own(objs: Iterable[Manifest], owner: Manifest) -> list[Manifest]:
    """A non-controller owner reference: a shared serving Deployment lives until its last job goes."""
    out = list(objs)
    kopf.append_owner_reference(out, owner=owner, controller=False)  # type: ignore[arg-type]
    return out
