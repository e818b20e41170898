"""The operator's small runtime parts: work queue semantics, lease takeover rule, log format, RBAC."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kdistill.operator import builders, rbac
from kdistill.operator.departures import PodTracker
from kdistill.operator.leader import may_take, micro_time
from kdistill.operator.login import connection_info
from kdistill.operator.logs import JsonFormatter, ObjectLog
from kdistill.operator.workqueue import WorkQueue

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def test_queue_deduplicates_and_never_runs_a_key_twice_at_once() -> None:
    async def run() -> None:
        q = WorkQueue()
        q.add("a")
        q.add("a")
        q.add("b")
        assert len(q) == 2
        key = await q.get()
        assert key == "a"
        q.add("a")  # while "a" is being reconciled: remembered, not queued
        assert len(q) == 1
        q.done("a")  # now it is queued again, once
        assert len(q) == 2
        assert {await q.get(), await q.get()} == {"a", "b"}

    asyncio.run(run())


def test_delayed_adds_keep_the_earliest_wake_up() -> None:
    async def run() -> None:
        q = WorkQueue()
        q.add_after("a", 5.0)
        q.add_after("a", 0.05)
        q.add_after("a", 10.0)
        got = await asyncio.wait_for(q.get(), 1.0)
        assert got == "a"
        q.done("a")
        q.add_after("b", 0.05)
        q.forget("b")
        await asyncio.sleep(0.1)
        assert len(q) == 0

    asyncio.run(run())


def test_lease_may_be_taken_only_when_free_expired_or_ours() -> None:
    held = {"holderIdentity": "other", "leaseDurationSeconds": 15, "renewTime": micro_time(NOW)}
    assert not may_take(held, "me", NOW + timedelta(seconds=14))
    assert may_take(held, "me", NOW + timedelta(seconds=15))
    assert may_take(held, "other", NOW)
    assert may_take({**held, "holderIdentity": ""}, "me", NOW)
    assert may_take({}, "me", NOW)


def test_log_lines_are_json_and_name_the_job(capsys: object) -> None:
    record = logging.LogRecord("kdistill.operator", logging.INFO, __file__, 1, "phase %s", ("Running",), None)
    record.job = "ml/intent"
    out = json.loads(JsonFormatter().format(record))
    assert out["job"] == "ml/intent" and out["message"] == "phase Running" and out["level"] == "info"
    adapter = ObjectLog(logging.getLogger("x"), {"job": "ml/j"})
    _, kwargs = adapter.process("m", {})
    assert kwargs["extra"]["job"] == "ml/j"
    record.job = None
    record.schedule = "ml/nightly"
    out = json.loads(JsonFormatter().format(record))
    assert out["schedule"] == "ml/nightly" and "job" not in out
    kopf_record = logging.LogRecord("kopf.objects", logging.WARNING, __file__, 1, "retrying", (), None)
    kopf_record.k8s_ref = {"kind": "DistillationSchedule", "namespace": "ml", "name": "nightly"}
    assert json.loads(JsonFormatter().format(kopf_record))["schedule"] == "ml/nightly"


def test_rbac_has_no_wildcards_and_covers_the_trainer_role() -> None:
    for rule in [r for f in rbac.RULE_FILES for r in f.rules] + rbac.WORKER_RULES:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
    # the operator may only grant what it holds itself (RBAC escalation check)
    granted = builders.trainer_rbac(__import__("tests.operator.test_builders", fromlist=["job"]).job())[1]["rules"]
    held = {
        (g, r, v)
        for rule in rbac.NAMESPACED.rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    for rule in granted:
        for verb in rule["verbs"]:
            assert ("kdistill.io", "distillationjobs/status", verb) in held
    assert granted == rbac.worker_rules("intent")
    assert granted[0]["resourceNames"] == ["intent"]
    # ttlSecondsAfterFinished: the operator deletes finished jobs.
    assert ("kdistill.io", "distillationjobs", "delete") in held


def _pod_body(name: str, gen: int, **status: object) -> dict[str, object]:
    return {
        "metadata": {
            "name": name,
            "labels": {"kdistill.io/replica-index": "0", "kdistill.io/restart-generation": str(gen)},
        },
        "status": {"phase": "Running", **status},
    }


def test_pod_tracker_keeps_the_final_state_and_bounds_the_wait_for_the_watch() -> None:
    clock = [100.0]
    t = PodTracker(clock=lambda: clock[0], keep_seconds=60, confirm_seconds=5)
    t.seen("ml", _pod_body("j-worker-0", 0), deleted=False)
    # the LIST ran ahead of the watch: wait, but not forever
    assert t.unconfirmed("ml", ["j-worker-0", "j-worker-1"]) == {"j-worker-0"}
    clock[0] += 5
    assert t.unconfirmed("ml", ["j-worker-0"]) == frozenset()
    evicted = _pod_body(
        "j-worker-0", 0, conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]
    )
    t.seen("ml", evicted, deleted=True)
    last = t.departed("ml", ["j-worker-0", "j-worker-1"])
    assert list(last) == ["j-worker-0"] and last["j-worker-0"].evicted and last["j-worker-0"].attempt == 0
    assert t.unconfirmed("ml", ["j-worker-0"]) == frozenset() and t.departed("other", ["j-worker-0"]) == {}
    t.seen("ml", _pod_body("j-worker-0", 1), deleted=False)  # the next gang attempt took the name
    assert t.departed("ml", ["j-worker-0"]) == {}
    t.seen("ml", _pod_body("j-worker-0", 1), deleted=True)
    clock[0] += 61
    t.seen("ml", _pod_body("j-worker-9", 1), deleted=False)  # any event prunes old records
    assert t.departed("ml", ["j-worker-0"]) == {}


def test_kopf_login_uses_the_kubeconfig_our_client_loaded(tmp_path: Path) -> None:
    # tokenFile and a CA path relative to the file: kubeconfig forms kopf's own reader misses.
    from kubernetes import config

    (tmp_path / "ca.crt").write_text("not checked here")
    (tmp_path / "token").write_text("s3cret\n")
    kc = tmp_path / "kubeconfig.yaml"
    kc.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [
                    {"name": "k", "cluster": {"server": "https://10.0.0.1:6443", "certificate-authority": "ca.crt"}}
                ],
                "users": [{"name": "u", "user": {"tokenFile": "token"}}],
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
            }
        )
    )
    api = config.new_client_from_config(config_file=str(kc))
    info = connection_info(api.configuration)
    assert info.server == "https://10.0.0.1:6443"
    assert (info.scheme, info.token) == ("Bearer", "s3cret")
    assert Path(str(info.ca_path)).read_text() == "not checked here" and not info.insecure


def test_a_pass_that_fails_is_retried_with_backoff_and_a_deleted_key_is_forgotten(caplog: object) -> None:
    from kdistill.operator.handlers import _drain

    calls: list[tuple[str, float]] = []
    forgotten: list[tuple[str, str]] = []
    failures: dict[tuple[str, str], int] = {}
    known = {("ns", "flaky"), ("ns", "later")}

    async def run() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()

        def reconcile(key: tuple[str, str]) -> float | None:
            calls.append((key[1], loop.time() - start))
            if key[1] == "flaky" and sum(1 for name, _ in calls if name == "flaky") <= 2:
                raise RuntimeError("api server hiccup")
            if key[1] == "later" and sum(1 for name, _ in calls if name == "later") == 1:
                return 0.2  # asks to be looked at again
            return None

        q: WorkQueue[tuple[str, str]] = WorkQueue()
        for name in ("flaky", "later", "gone"):
            q.add(("ns", name))
        task = asyncio.create_task(
            _drain(q, known, reconcile, forgotten.append, failures, pool=None, what="reconcile", log_field="job")
        )
        while len(calls) < 5 and loop.time() - start < 10:
            await asyncio.sleep(0.05)
        task.cancel()

    with caplog.at_level(logging.ERROR):  # type: ignore[attr-defined]
        asyncio.run(run())
    flaky = [t for name, t in calls if name == "flaky"]
    later = [t for name, t in calls if name == "later"]
    # Failed twice: retried after 0.5 s, then after 1 s; the success clears the failure count.
    assert len(flaky) == 3 and flaky[1] - flaky[0] >= 0.45 and 0.95 <= flaky[2] - flaky[1] < 3
    assert failures == {}
    assert len(later) == 2 and later[1] - later[0] >= 0.15
    assert forgotten == [("ns", "gone")]
    lines = [r for r in caplog.records if "reconcile failed" in r.getMessage()]  # type: ignore[attr-defined]
    assert [r.job for r in lines] == ["ns/flaky", "ns/flaky"]
