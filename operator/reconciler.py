"""One reconcile pass of one job: observe through the API, decide (state.py), act.

Synchronous and self-contained, so the work queue can run passes in a bounded thread pool
and a test can call it directly. Every fact comes fresh from the API server (GET the job,
LIST its pods), never from a watch cache, so a restarted operator acts on the same truth.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from kdistill.api import JobValidationError, parse_job

from . import builders, kueue, metrics, names
from .departures import STATUS_FIELD, PodTracker, departed_from_status
from .events import post_event
from .kube import JOB, ApiError, Kube
from .logs import ObjectLog
from .observe import DeploymentView, NodeView, PodView, TeacherView, parse_time
from .settings import Settings
from .state import Decision, Event, Observed, decide, fmt_time, goodput

log = logging.getLogger("kdistill.operator")

Key = tuple[str, str]  # (namespace, name)


class Reconciler:
    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube = kube
        self.settings = settings
        self.phases: dict[Key, str] = {}
        # Filled by the node watch (handlers.node_event): name -> view, None once deleted.
        # A node not in it yet (e.g. right after start) is read from the API instead.
        self.node_cache: dict[str, NodeView | None] = {}
        # Set once prime_nodes has listed the nodes; until then each new gang LISTs them itself.
        self.nodes_synced = threading.Event()
        # Filled by the pod watch (handlers.pod_event): the final state of deleted worker pods.
        self.pod_tracker = PodTracker()

    def forget(self, key: Key) -> None:
        self.phases.pop(key, None)
        with contextlib.suppress(KeyError):
            metrics.GOODPUT.remove(*key)
        metrics.set_phases(self.phase_counts())

    def phase_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for phase in self.phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        return counts

    def reconcile(self, key: Key, now: datetime | None = None) -> float | None:
        """One pass; returns seconds until the job wants another look (None: only on events)."""
        started = time.monotonic()
        try:
            return self._reconcile(key, now or datetime.now(UTC))
        finally:
            metrics.RECONCILE.observe(time.monotonic() - started)

    def _reconcile(self, key: Key, now: datetime) -> float | None:
        namespace, name = key
        jlog = ObjectLog(log, {"job": f"{namespace}/{name}"})
        body = self.kube.get(*JOB, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.forget(key)
            return None  # ownerReferences let the garbage collector remove the children
        status = dict(body.get("status") or {})
        try:
            # Status is not validated here: a trainer writing an odd field must not fail the job.
            job = parse_job({k: v for k, v in body.items() if k != "status"}, f"{namespace}/{name}")
            builders.check_buildable(job)
        except (JobValidationError, builders.BuildError) as exc:
            if status.get("phase") != "Failed":
                jlog.error("job cannot run: %s", exc)
                self._fail_invalid(body, str(exc))
            return None
        job.metadata.namespace = namespace
        pods = [PodView.from_dict(p) for p in self.kube.list("v1", "Pod", namespace, names.worker_selector(name))]
        nodes: dict[str, NodeView | None] = {}
        for node in {p.node for p in pods if p.node}:
            if node in self.node_cache:
                nodes[node] = self.node_cache[node]
                continue
            got = self.kube.get("v1", "Node", None, node)
            nodes[node] = NodeView.from_dict(got) if got is not None else None
        deployment = None
        # The Deployment matters once training is over: read it then, not on every Running pass.
        finishing = status.get("phase") == "Running" and any(p.phase == "Succeeded" for p in pods)
        if job.spec.serving.enabled and (finishing or status.get("phase") in ("Deploying", "Succeeded")):
            dep = self.kube.get("apps/v1", "Deployment", namespace, names.serving(name, job.spec.serving.name))
            deployment = DeploymentView.from_dict(dep) if dep is not None else None
        teacher = self._observe_teacher(job) if job.spec.teacher.serve.enabled else None
        queue = kueue.queue_name(body["metadata"].get("labels"))
        workload = None
        if queue and self.settings.kueue:
            workload = self.kube.get(*kueue.WORKLOAD, namespace, names.workload(name))
        expected = {i: names.worker_pod(name, i) for i in range(job.spec.parallelism.nodes)}
        missing = [p for p in expected.values() if p not in {v.name for v in pods}]
        # What this process's watch saw, else what a watch (maybe a previous operator's) recorded.
        departed = self.pod_tracker.departed(namespace, missing)
        recorded = departed_from_status(status, {i: p for i, p in expected.items() if p in missing})
        departed = {**recorded, **departed}
        obs = Observed(
            job=job,
            generation=int(body["metadata"].get("generation") or 0),
            status=status,
            pods=pods,
            nodes=nodes,
            deployment=deployment,
            now=now,
            notready_seconds=self.settings.notready_seconds,
            max_backoff_seconds=self.settings.max_backoff_seconds,
            departed=departed,
            unconfirmed=self.pod_tracker.unconfirmed(namespace, missing),
            teacher=teacher,
            queue=queue,
            kueue_enabled=self.settings.kueue,
            workload=kueue.WorkloadView.from_dict(workload) if workload is not None else None,
        )
        decision = decide(obs)
        try:
            self._act(body, job, status, decision, {p.name for p in pods}, teacher, jlog, workload)
        except ApiError as exc:
            if exc.status == 409 and decision.status:
                jlog.info("status moved under us; looking again")
                return 0.2
            raise
        self.phases[key] = decision.phase or status.get("phase") or "Pending"
        metrics.set_phases(self.phase_counts())
        self._observe_goodput(key, status, now)
        return decision.requeue_after

    def record_departure(self, namespace: str, job: str, index: int, record: dict[str, Any]) -> bool:
        """Write a disrupted worker's final state into its job's status (departures.py); True if written.
        A job that is gone needs no record."""
        try:
            self.kube.patch_status(namespace, job, {STATUS_FIELD: {str(index): record}})
        except ApiError as exc:
            if exc.status == 404:
                return True
            ObjectLog(log, {"job": f"{namespace}/{job}"}).warning(
                "cannot record the departure of worker %d: %s", index, exc
            )
            return False
        ObjectLog(log, {"job": f"{namespace}/{job}"}).info(
            "recorded the departure of worker %d (attempt %s): %s", index, record["attempt"], record["reason"]
        )
        return True

    def _observe_goodput(self, key: Key, status: dict[str, Any], now: datetime) -> None:
        """The per-job goodput gauge, to the second (status.goodput is rounded to two decimals)."""
        end = parse_time(status.get("completionTime")) or now
        value = goodput(status.get("productiveSeconds"), parse_time(status.get("startTime")), end)
        if value is not None:
            metrics.GOODPUT.labels(*key).set(value)

    # -- acting ----------------------------------------------------------------------------

    def _act(
        self,
        body: dict[str, Any],
        job: Any,
        old: dict[str, Any],
        d: Decision,
        existing_pods: set[str],
        teacher: TeacherView | None,
        jlog: ObjectLog,
        workload: dict[str, Any] | None = None,
    ) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if d.status:
            # Counting a restart or changing phase must be based on what we saw: a stale view
            # (another pass, a restarted operator) gets 409 instead of counting twice.
            guarded = {"phase", "restarts", "evictions", "resumes", "attempt"} & d.status.keys()
            rv = body["metadata"].get("resourceVersion") if guarded else None
            self.kube.patch_status(namespace, name, d.status, rv)
            self._count(old, d, jlog)
        # Events right after the status they describe is committed, before the slower deletions
        # and creations: an operator killed mid-pass then still leaves its restart Event behind.
        for event in d.events:
            self._event(body, event, jlog)
        for pod in d.force_delete_pods:
            jlog.warning("force-deleting pod %s on a lost node", pod)
            self.kube.delete("v1", "Pod", namespace, pod, grace_seconds=0)
        for pod in d.delete_pods:
            self.kube.delete("v1", "Pod", namespace, pod)
        self._kueue(body, job, d, workload, jlog)
        if d.ensure_teacher:
            self._ensure_teacher(body, job, teacher, jlog)
        if d.delete_teacher:
            # The Service first: if this pass stops halfway, the Deployment left behind is seen and
            # both deletions are tried again; a Service left alone would not be.
            self.kube.delete("v1", "Service", namespace, names.teacher(name))
            self.kube.delete("apps/v1", "Deployment", namespace, names.teacher(name))
            jlog.info("deleted the teacher Deployment and Service %s", names.teacher(name))
        if d.create_attempt is not None:
            self._create_gang(body, job, d.create_attempt, existing_pods, jlog, workload)
        if d.deploy:
            self._deploy(body, job, jlog)
        if d.delete_training_objects:
            self.kube.delete("v1", "ConfigMap", namespace, names.config_map(name))
            self.kube.delete("v1", "Service", namespace, names.workers_service(name))
        if d.delete_job:
            jlog.info("ttlSecondsAfterFinished expired: deleting the job")
            self.kube.delete(*JOB, namespace, name)

    def _count(self, old: dict[str, Any], d: Decision, jlog: ObjectLog) -> None:
        for field, kind in (("restarts", "failure"), ("evictions", "eviction")):
            if field in d.status and int(d.status[field]) > int(old.get(field) or 0):
                metrics.RESTARTS.labels(kind=kind).inc()
        if d.phase == "Failed" and old.get("phase") != "Failed":
            reason = next(
                (c.get("reason", "") for c in d.status.get("conditions", []) if c.get("type") == "Failed"), ""
            )
            metrics.FAILURES.labels(reason=reason or "Unknown").inc()
        if "phase" in d.status:
            jlog.info("phase %s -> %s", old.get("phase"), d.status["phase"])

    def _kueue(self, body: dict[str, Any], job: Any, d: Decision, wl: dict[str, Any] | None, jlog: ObjectLog) -> None:
        """The job's Workload: created while it is missing, its reservation cleared after an eviction
        once the gang is gone, Finished once training is over, deleted while the job is suspended."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        wl_name = names.workload(name)
        now = fmt_time(datetime.now(UTC))
        if d.delete_workload:
            self.kube.delete(*kueue.WORKLOAD, namespace, wl_name)
            jlog.info("deleted Workload %s: the job is suspended", wl_name)
        if wl is not None and d.release_workload:
            gen = int(wl["metadata"].get("generation") or 0)
            patch = kueue.release_patch(wl, now, gen)["status"]
            self.kube.patch_status(namespace, wl_name, patch, wl["metadata"].get("resourceVersion"),
                                   resource=kueue.WORKLOAD)  # fmt: skip
            jlog.info("the evicted gang is gone: cleared the reservation of Workload %s (Kueue requeues it)", wl_name)
        if wl is not None and d.finish_workload:
            gen = int(wl["metadata"].get("generation") or 0)
            reason = "Succeeded" if d.phase in ("Succeeded", "Deploying") else "Failed"
            patch = kueue.finish_patch(wl, now, gen, reason, f"the job is {d.phase}: training is over")["status"]
            self.kube.patch_status(namespace, wl_name, patch, wl["metadata"].get("resourceVersion"),
                                   resource=kueue.WORKLOAD)  # fmt: skip
            jlog.info("Workload %s finished: its quota is released", wl_name)
        if d.ensure_workload and wl is None:
            priority = None
            pc = kueue.priority_class_name(body["metadata"].get("labels"))
            if pc:
                found = self.kube.get(*kueue.PRIORITY_CLASS, None, pc)
                if found is None:
                    message = f"WorkloadPriorityClass {pc} (label {kueue.LABEL_PRIORITY_CLASS}) does not exist"
                    jlog.warning("not queueing: %s", message)
                    self._event(body, Event("Warning", "PriorityClassNotFound", message), jlog)
                    return
                priority = (pc, int(found.get("value") or 0))
            pod = builders.worker_pods(job, 0, self.settings)[0]
            obj = kueue.workload(name, namespace, kueue.queue_name(body["metadata"].get("labels")), pod,
                                 job.spec.parallelism.nodes, priority)  # fmt: skip
            if self.kube.create(builders.adopt([obj], body)[0]):
                jlog.info("created Workload %s in queue %s", wl_name, obj["spec"]["queueName"])

    def _placement(self, wl: dict[str, Any] | None) -> kueue.Placement | None:
        """The node labels and tolerations of the flavors Kueue admitted the gang to."""
        if wl is None:
            return None
        view = kueue.WorkloadView.from_dict(wl)
        flavors = [f for name in view.flavors if (f := self.kube.get(*kueue.RESOURCE_FLAVOR, None, name))]
        return kueue.Placement.from_flavors(flavors)

    def _create_gang(
        self,
        body: dict[str, Any],
        job: Any,
        attempt: int,
        existing: set[str],
        jlog: ObjectLog,
        workload: dict[str, Any] | None = None,
    ) -> None:
        if not existing:
            # A whole new gang (first start, restart, resume): make sure its config, rendezvous
            # Service, PVC and RBAC exist first. Re-applying is a no-op when they do.
            for obj in builders.adopt(builders.training_objects(job), body):
                if obj["kind"] == "PersistentVolumeClaim":
                    self.kube.create(obj)  # a PVC's spec is mostly immutable: create once, never re-apply
                else:
                    self.kube.apply(obj)
        unready = self._unready_nodes()
        placement = self._placement(workload)
        pods = builders.worker_pods(job, attempt, self.settings, unready)
        if placement is not None:
            pods = [placement.apply(p) for p in pods]
        created = 0
        for pod in builders.adopt(pods, body):
            if pod["metadata"]["name"] not in existing and self.kube.create(pod):
                created += 1
        if created:
            jlog.info("created %d worker pod(s) of gang attempt %d", created, attempt)

    def _observe_teacher(self, job: Any) -> TeacherView | None:
        """The teacher Deployment; while it has no ready replica, its pods too, to say why."""
        dep = self.kube.get("apps/v1", "Deployment", job.namespace, names.teacher(job.metadata.name))
        if dep is None:
            return None
        view = TeacherView.from_dict(dep)
        if view.ready:
            return view
        pods = self.kube.list("v1", "Pod", job.namespace, names.teacher_selector(job.metadata.name))
        return TeacherView.from_dict(dep, pods)

    def _ensure_teacher(self, body: dict[str, Any], job: Any, seen: TeacherView | None, jlog: ObjectLog) -> None:
        """Create the teacher's Service and Deployment, or re-apply them when what the operator builds
        changed (the spec-hash annotation); a pass that finds them current writes nothing. The
        Service goes first, so an existing Deployment means its Service was applied too."""
        deployment = builders.teacher_deployment(job, self.settings)
        if seen is not None and seen.spec_hash == deployment["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH]:
            return
        for obj in builders.adopt([builders.teacher_service(job), deployment], body):
            self.kube.apply(obj)
        jlog.info("applied the teacher Service and Deployment %s", names.teacher(job.metadata.name))

    def prime_nodes(self) -> None:
        """One LIST of the nodes at start; the node watch keeps the cache current from then on."""
        for node in self.kube.list("v1", "Node", None):
            view = NodeView.from_dict(node)
            self.node_cache.setdefault(view.name, view)  # a view the watch already gave is as new
        self.nodes_synced.set()

    def _unready_nodes(self) -> list[str]:
        """Nodes the new gang must avoid: from the watched cache once primed (a LIST of every node
        per new gang was the costliest call at scale), else from a fresh LIST."""
        if self.nodes_synced.is_set():
            return sorted(n for n, v in list(self.node_cache.items()) if v is not None and v.ready != "True")
        return [
            n["metadata"]["name"] for n in self.kube.list("v1", "Node", None) if NodeView.from_dict(n).ready != "True"
        ]

    def _deploy(self, body: dict[str, Any], job: Any, jlog: ObjectLog) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        serving = names.serving(name, job.spec.serving.name)
        current = self.kube.get("apps/v1", "Deployment", namespace, serving)
        previous = None
        if current is not None:
            ann = current["metadata"].get("annotations") or {}
            previous = ann.get(names.ANNOTATION_MODEL_PATH)
            if previous == names.model_path(namespace, name):
                previous = ann.get(names.ANNOTATION_PREVIOUS_MODEL_PATH)
        manager = f"{names.MANAGER}/{name}"
        objs = [builders.serving_deployment(job, self.settings, previous), builders.serving_service(job)]
        for obj in builders.co_own(objs, body):
            self.kube.apply(obj, manager)
        for kind, api_version, optional in (
            ("PodDisruptionBudget", "policy/v1", builders.serving_pdb(job)),
            ("HorizontalPodAutoscaler", "autoscaling/v2", builders.serving_hpa(job)),
        ):
            if optional is not None:
                self.kube.apply(builders.co_own([optional], body)[0], manager)
            elif self._owned_by(api_version, kind, namespace, serving, body):
                self.kube.delete(api_version, kind, namespace, serving)
        if current is None or previous != (current["metadata"].get("annotations") or {}).get(
            names.ANNOTATION_PREVIOUS_MODEL_PATH
        ):
            jlog.info("serving %s now runs %s", serving, names.model_path(namespace, name))

    def _owned_by(self, api_version: str, kind: str, namespace: str, name: str, owner: dict[str, Any]) -> bool:
        obj = self.kube.get(api_version, kind, namespace, name)
        if obj is None:
            return False
        uid = owner["metadata"]["uid"]
        return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])

    def _fail_invalid(self, body: dict[str, Any], message: str) -> None:
        meta = body["metadata"]
        now = fmt_time(datetime.now(UTC))
        cond = {
            "type": "Failed",
            "status": "True",
            "reason": "InvalidSpec",
            "message": message[:1000],
            "lastTransitionTime": now,
            "observedGeneration": meta.get("generation"),
        }
        self.kube.patch_status(
            meta["namespace"],
            meta["name"],
            {
                "phase": "Failed",
                "conditions": [cond],
                "completionTime": now,
                "observedGeneration": meta.get("generation"),
            },
        )
        self._event(body, Event("Warning", "InvalidSpec", message[:1000]), None)

    def _event(self, body: dict[str, Any], event: Event, jlog: ObjectLog | None) -> None:
        post_event(self.kube, body, event.type, event.reason, event.message, self.settings.identity, jlog or log)
