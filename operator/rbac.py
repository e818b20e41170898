"""The exact RBAC the operator and the trainer need (no wildcards). The Helm chart renders these.

OPERATOR_RULES go in a ClusterRole (or one Role per watched namespace, plus the cluster-scoped
nodes/CRD/namespaces rules in a ClusterRole). LEADER_RULES go in a Role in the operator's own
namespace. WORKER_RULES are what each job's trainer ServiceAccount gets (the operator creates
that Role per job, with resourceNames set to the job's name).
"""

from __future__ import annotations

from typing import Any

PolicyRule = dict[str, Any]

OPERATOR_RULES: list[PolicyRule] = [
    # Jobs: watched; deleted by ttlSecondsAfterFinished. No finalizers, so no patch/update.
    {"apiGroups": ["kdistill.io"], "resources": ["distillationjobs"], "verbs": ["get", "list", "watch", "delete"]},
    {"apiGroups": ["kdistill.io"], "resources": ["distillationjobs/status"], "verbs": ["get", "patch"]},
    # Worker pods: created once per generation, deleted (force on lost nodes); never updated.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete"]},
    # Server-side apply is PATCH, and creates through PATCH need create too.
    {
        "apiGroups": [""],
        "resources": ["configmaps", "services", "serviceaccounts"],
        "verbs": ["get", "create", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    # Lost-node detection.
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    # The per-job trainer Role/RoleBinding (the operator holds the permissions it grants).
    {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["roles", "rolebindings"],
        "verbs": ["get", "create", "patch"],
    },
    # Serving.
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": ["get", "create", "patch", "delete"]},
    {
        "apiGroups": ["autoscaling"],
        "resources": ["horizontalpodautoscalers"],
        "verbs": ["get", "create", "patch", "delete"],
    },
    # kopf: discovering resources and namespaces.
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
]

LEADER_RULES: list[PolicyRule] = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
]

# Per job; the operator adds resourceNames: [<job>] (see builders.trainer_rbac).
WORKER_RULES: list[PolicyRule] = [
    {"apiGroups": ["kdistill.io"], "resources": ["distillationjobs/status"], "verbs": ["get", "patch"]},
]
