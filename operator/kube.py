"""A small synchronous REST client over the kubernetes package's ApiClient, returning plain dicts.

Plain dicts (not the generated models) keep memory and CPU low with many jobs, and one code
path serves every kind. Every call counts its errors in the operator metrics.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

from kubernetes import client

from . import metrics

# (apiVersion, kind) -> (path prefix, plural, namespaced)
RESOURCES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Pod"): ("/api/v1", "pods", True),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
    ("v1", "Service"): ("/api/v1", "services", True),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims", True),
    ("v1", "Event"): ("/api/v1", "events", True),
    ("v1", "Node"): ("/api/v1", "nodes", False),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments", True),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("/apis/autoscaling/v2", "horizontalpodautoscalers", True),
    ("kdistill.io/v1alpha1", "DistillationJob"): ("/apis/kdistill.io/v1alpha1", "distillationjobs", True),
    ("kdistill.io/v1alpha1", "DistillationSchedule"): ("/apis/kdistill.io/v1alpha1", "distillationschedules", True),
    ("coordination.k8s.io/v1", "Lease"): ("/apis/coordination.k8s.io/v1", "leases", True),
    ("kueue.x-k8s.io/v1beta2", "Workload"): ("/apis/kueue.x-k8s.io/v1beta2", "workloads", True),
    ("kueue.x-k8s.io/v1beta2", "ResourceFlavor"): ("/apis/kueue.x-k8s.io/v1beta2", "resourceflavors", False),
    ("kueue.x-k8s.io/v1beta2", "WorkloadPriorityClass"): (
        "/apis/kueue.x-k8s.io/v1beta2",
        "workloadpriorityclasses",
        False,
    ),
}
JOB = ("kdistill.io/v1alpha1", "DistillationJob")


class ApiError(Exception):
    def __init__(self, status: int, body: str, what: str) -> None:
        self.status = status
        self.body = body
        try:
            self.reason = json.loads(body).get("reason", "")
            message = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            self.reason, message = "", body
        super().__init__(f"{what}: HTTP {status}: {message}")


def path_for(
    api_version: str, kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None
) -> str:
    prefix, plural, namespaced = RESOURCES[(api_version, kind)]
    path = prefix
    if namespaced and namespace:
        path += f"/namespaces/{quote(namespace)}"
    path += f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    if sub:
        path += f"/{sub}"
    return path


class Kube:
    def __init__(self, api: client.ApiClient, timeout: float = 30.0, field_manager: str = "kdistill-operator"):
        self.api = api
        self.timeout = timeout
        self.field_manager = field_manager

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        content_type: str | None = None,
        verb: str | None = None,
    ) -> dict[str, Any]:
        if query:
            path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        self.api.update_params_for_auth(headers, None, ["BearerToken"], path, method, body)
        url = self.api.configuration.host + path
        metrics.API_REQUESTS.labels(verb=verb or method.lower()).inc()
        try:
            resp = self.api.rest_client.request(method, url, headers=headers, body=body, _request_timeout=self.timeout)
            data = resp.read() if hasattr(resp, "read") else resp.data
            status = resp.status
        except client.ApiException as exc:
            status, data = exc.status or 0, (exc.body or str(exc))
        except Exception:
            metrics.API_ERRORS.labels(verb=verb or method.lower(), code="connection").inc()
            raise
        text = data.decode() if isinstance(data, bytes) else str(data or "")
        if status >= 400:
            if status not in (404, 409):
                metrics.API_ERRORS.labels(verb=verb or method.lower(), code=str(status)).inc()
            raise ApiError(status, text, f"{method} {path}")
        return json.loads(text) if text else {}

    # -- typed helpers ---------------------------------------------------------------------

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path_for(api_version, kind, namespace, name), verb="get")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        selector: str | None = None,
    ) -> list[dict[str, Any]]:
        out = self.request(
            "GET", path_for(api_version, kind, namespace), query={"labelSelector": selector}, verb="list"
        )
        return list(out.get("items") or [])

    def create(self, obj: dict[str, Any]) -> bool:
        """Create; False if it already exists (creation is idempotent by name)."""
        meta = obj["metadata"]
        try:
            self.request("POST", path_for(obj["apiVersion"], obj["kind"], meta.get("namespace")), obj, verb="create")
            return True
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise

    def apply(self, obj: dict[str, Any], manager: str | None = None) -> dict[str, Any]:
        """Server-side apply: a no-op when nothing differs, so a second reconcile writes nothing."""
        meta = obj["metadata"]
        return self.request(
            "PATCH",
            path_for(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]),
            obj,
            query={"fieldManager": manager or self.field_manager, "force": "true"},
            content_type="application/apply-patch+yaml",
            verb="apply",
        )

    def delete(
        self, api_version: str, kind: str, namespace: str | None, name: str, grace_seconds: int | None = None
    ) -> bool:
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self.request("DELETE", path_for(api_version, kind, namespace, name), body, verb="delete")
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    def patch_status(
        self,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        resource_version: str | None = None,
        *,
        resource: tuple[str, str] = JOB,
    ) -> dict[str, Any]:
        """JSON merge patch of the status of a job (or another `resource`, as (apiVersion, kind));
        with resource_version, 409 if anything moved since."""
        body: dict[str, Any] = {"status": patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self.request(
            "PATCH",
            path_for(*resource, namespace, name, "status"),
            body,
            content_type="application/merge-patch+json",
            verb="patch_status",
        )
