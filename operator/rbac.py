"""The exact RBAC the operator and the trainer need (no wildcards): the one source of the chart's rules.

`kdistill rbac` writes each RuleFile below to charts/kdistill/files/rbac/<name>.yaml, which the
chart's templates/rbac.yaml reads; `make manifests` renders the chart into manifests/kdistill.yaml.
  cluster mode:    a ClusterRole with NAMESPACED + CLUSTER, bound cluster-wide;
  namespaced mode: a Role with NAMESPACED in each watched namespace, and a ClusterRole with
                   CLUSTER + NAMESPACED_MODE;
  both:            a Role with LEADER in the release namespace;
  kueue.enabled:   KUEUE joins NAMESPACED, KUEUE_CLUSTER joins CLUSTER.
WORKER_RULES are what each job's trainer ServiceAccount gets: the operator creates that Role per
job, with resourceNames set to the job's name (builders.trainer_rbac).

Every rule is needed by some step of a job's life: tests/integration/test_rbac.py removes each in
turn, under the chart's ServiceAccount, and sees a request refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PolicyRule = dict[str, Any]

# The chart replaces this with the Lease's name (values: operator.leaderElection.leaseName).
LEASE_NAME_PLACEHOLDER = "LEASE_NAME"


@dataclass(frozen=True)
class RuleFile:
    name: str  # charts/kdistill/files/rbac/<name>.yaml
    comment: str  # the file's header: why these rules exist
    rules: list[PolicyRule]


def _rule(group: str, resources: list[str], verbs: list[str], names: list[str] | None = None) -> PolicyRule:
    rule: PolicyRule = {"apiGroups": [group], "resources": resources}
    if names:
        rule["resourceNames"] = names
    rule["verbs"] = verbs
    return rule


NAMESPACED = RuleFile(
    "namespaced",
    "What the operator does in each namespace it watches. Each rule is needed by some step of\n"
    "a job's life: tests/integration/test_rbac.py removes each in turn and sees that step fail.",
    [
        _rule("kdistill.io", ["distillationjobs"], ["get", "list", "watch"]),
        # ttlSecondsAfterFinished: the operator deletes a finished job once its TTL has passed.
        _rule("kdistill.io", ["distillationjobs"], ["delete"]),
        _rule("kdistill.io", ["distillationjobs/status"], ["get", "patch"]),
        # DistillationSchedules: the operator creates each run's job and writes the schedule's
        # status (lastScheduleTime, the promotion history); it never changes a schedule's spec.
        _rule("kdistill.io", ["distillationjobs"], ["create"]),
        _rule("kdistill.io", ["distillationschedules"], ["get", "list", "watch"]),
        _rule("kdistill.io", ["distillationschedules/status"], ["patch"]),
        # Worker pods: created once per gang attempt, deleted (force on lost nodes); never updated.
        _rule("", ["pods"], ["get", "list", "watch", "create", "delete"]),
        # Server-side apply is PATCH, and creates through PATCH need create too. Deleted: the
        # rendezvous Service and ConfigMap after a served job's TTL, the teacher's Service when
        # the job stops training.
        _rule("", ["services", "configmaps"], ["get", "list", "create", "patch", "delete"]),
        _rule("", ["persistentvolumeclaims"], ["get", "create"]),
        _rule("", ["serviceaccounts"], ["get", "create", "patch"]),
        # The per-job trainer Role/RoleBinding (the operator holds the permissions it grants).
        _rule("rbac.authorization.k8s.io", ["roles", "rolebindings"], ["get", "create", "patch"]),
        # Serving, and the served teacher (teacher.serve: deleted when the job stops training).
        _rule("apps", ["deployments"], ["get", "list", "watch", "create", "patch", "delete"]),
        _rule("policy", ["poddisruptionbudgets"], ["get", "create", "patch", "delete"]),
        _rule("autoscaling", ["horizontalpodautoscalers"], ["get", "create", "patch", "delete"]),
        _rule("", ["events"], ["create"]),
    ],
)

CLUSTER = RuleFile(
    "cluster",
    "Cluster-scoped reads the operator needs in both modes: it watches nodes to restart the\n"
    "gangs of nodes that go NotReady or disappear, and kopf watches CRDs to notice its own\n"
    "resources (the DistillationJob and DistillationSchedule CRDs) appear, change or go.",
    [
        _rule("", ["nodes"], ["get", "list", "watch"]),
        _rule("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"]),
    ],
)

NAMESPACED_MODE = RuleFile(
    "namespaced-mode",
    "Namespaced mode only: kopf observes namespaces when it is given a list of them.",
    [_rule("", ["namespaces"], ["list", "watch"])],
)

LEADER = RuleFile(
    "leader",
    "The leader Lease, in the release namespace only. `create` cannot be limited by name\n"
    "(the object does not exist yet); every other verb is limited to the one Lease.",
    [
        _rule("coordination.k8s.io", ["leases"], ["create"]),
        _rule("coordination.k8s.io", ["leases"], ["get", "update"], [LEASE_NAME_PLACEHOLDER]),
    ],
)

KUEUE = RuleFile(
    "kueue",
    "Only with the chart's kueue.enabled (the operator's --kueue): each job labelled\n"
    "kueue.x-k8s.io/queue-name gets a Kueue Workload that the operator creates, watches, deletes\n"
    "while the job is suspended, and whose status it patches (the reservation cleared after an\n"
    "eviction once the gang is gone; Finished once training is over).",
    [
        _rule("kueue.x-k8s.io", ["workloads"], ["get", "list", "watch", "create", "delete"]),
        _rule("kueue.x-k8s.io", ["workloads/status"], ["patch"]),
    ],
)

KUEUE_CLUSTER = RuleFile(
    "kueue-cluster",
    "Only with the chart's kueue.enabled: the admitted flavors' node labels and tolerations go on\n"
    "the gang's pods, and a job's kueue.x-k8s.io/priority-class sets its Workload's priority.",
    [_rule("kueue.x-k8s.io", ["resourceflavors", "workloadpriorityclasses"], ["get"])],
)

RULE_FILES: tuple[RuleFile, ...] = (NAMESPACED, CLUSTER, NAMESPACED_MODE, LEADER, KUEUE, KUEUE_CLUSTER)

# Per job; the operator adds resourceNames: [<job>] (builders.trainer_rbac).
WORKER_RULES: list[PolicyRule] = [
    _rule("kdistill.io", ["distillationjobs/status"], ["get", "patch"]),
]


def worker_rules(job_name: str) -> list[PolicyRule]:
    """WORKER_RULES limited to one job."""
    return [{**rule, "resourceNames": [job_name]} for rule in WORKER_RULES]
