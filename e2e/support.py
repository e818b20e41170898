"""Helpers for the e2e tests: timings, the job's status history, volumes."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "e2e" / "results"
# Committed: what a user sees in a passing run; the README quotes lines of it (tests/unit/test_docs.py).
TRANSCRIPT = REPO / "docs" / "e2e-transcript.txt"
# Committed: the wall-clock seconds of each step of the last passing run.
TIMINGS_RESULT = REPO / "benchmarks" / "results" / "e2e.json"


README = REPO / "README.md"
README_MARKER = "<!-- e2e-transcript:"
PHASES = {"Pending", "Queued", "Running", "Restarting", "Deploying", "Succeeded", "Failed", "Suspended"}


def write_transcript(watch: str, events: str, namespace: str, job: str) -> None:
    """docs/e2e-transcript.txt from a passing run (`kubectl get dj -w`, then the job's Events),
    and the README's excerpt of it."""
    TRANSCRIPT.write_text(
        f"$ kubectl get dj -n {namespace} -w\n{watch.rstrip()}\n\n"
        f"$ kubectl get events -n {namespace} --field-selector involvedObject.name={job} --sort-by=.lastTimestamp\n"
        f"{events.rstrip()}\n"
    )
    README.write_text(with_readme_excerpt(README.read_text(), TRANSCRIPT.read_text()))


def readme_excerpt(transcript: str) -> list[str]:
    """The lines of the transcript the README shows: the watch's header, every row where the
    phase or the stage changes and the row just before a restart; then the Events' header, its
    warnings, the quality gate and the last event. Lines are quoted as they are (kubectl -w
    aligns each row on its own)."""
    watch_part, _, events_part = transcript.partition("\n\n")
    rows = [line for line in watch_part.splitlines()[1:] if line.strip()]
    keys = [_phase_and_stage(row) for row in rows]
    picked = {0}
    for i in range(1, len(rows)):
        if keys[i][0] is not None and keys[i] != keys[i - 1]:
            picked.add(i)
            if keys[i][0] == "Restarting":
                picked.add(i - 1)
    out = [rows[i] for i in sorted(picked)]
    events = [line for line in events_part.splitlines()[1:] if line.strip()]
    if events:
        chosen = [e for e in events[1:] if (" Warning " in e and "GangRestart" in e) or "QualityGate" in e]
        if events[-1] not in chosen and len(events) > 1:
            chosen.append(events[-1])
        out += ["", events[0], *chosen]
    return out


def _phase_and_stage(row: str) -> tuple[str | None, str | None]:
    """PHASE and STAGE of a `kubectl get dj` row (empty columns leave no word)."""
    words = row.split()
    phase = words[1] if len(words) > 1 and words[1] in PHASES else None
    stage = words[2] if phase and len(words) > 3 and not words[2].endswith("%") and not words[2].isdigit() else None
    return phase, stage


def with_readme_excerpt(readme: str, transcript: str) -> str:
    """The README with the code block after its e2e-transcript marker replaced by the excerpt."""
    start = readme.index(README_MARKER)
    fence = readme.index("```\n", start)
    end = readme.index("```\n", fence + 4)
    return readme[: fence + 4] + "\n".join(readme_excerpt(transcript)) + "\n" + readme[end:]


def image_tag() -> str:
    match = re.search(r'^__version__ = "([^"]+)"', (REPO / "kdistill" / "__init__.py").read_text(), re.MULTILINE)
    assert match is not None, "kdistill/__init__.py has no __version__"
    return match.group(1)


@dataclass
class Timer:
    """Wall-clock seconds per step, printed and written to e2e/results/timings.json."""

    steps: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.steps[name] = round(time.monotonic() - t0, 1)

    def report(self, passed: bool) -> None:
        """Prints the steps and writes e2e/results/timings.json; a passing run also writes
        benchmarks/results/e2e.json, the figures docs/benchmarks/e2e.md cites."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "timings.json").write_text(json.dumps(self.steps, indent=2) + "\n")
        for name, secs in self.steps.items():
            print(f"{name:<24} {secs:>8.1f}s")
        if passed:
            result = {
                "command": "make e2e",
                "cpus": os.cpu_count(),
                "load_average_at_end": list(os.getloadavg()),
                "images_built_by_the_test": not os.environ.get("KDISTILL_E2E_SKIP_BUILD"),
                "step_seconds": self.steps,
            }
            TIMINGS_RESULT.write_text(json.dumps(result, indent=2) + "\n")


@dataclass
class StatusLog:
    """Every distinct (phase, stage, step, restarts, lastCheckpoint) the job showed, in order."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def record(self, status: dict[str, Any]) -> None:
        row = {
            "phase": status.get("phase"), "stage": status.get("stage"), "step": status.get("step"),
            "restarts": status.get("restarts", 0), "checkpoint": (status.get("lastCheckpoint") or {}).get("step"),
            "progress": status.get("progress"),
        }  # fmt: skip
        if not self.rows or {k: v for k, v in self.rows[-1].items() if k != "t"} != row:
            self.rows.append({"t": round(time.time(), 1), **row})

    def steps_after_restart(self, restarts: int) -> list[int]:
        return [r["step"] for r in self.rows if r["restarts"] >= restarts and r["step"] is not None]

    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}


def volumes_manifest(shared: Path, namespace: str) -> tuple[str, dict[str, Path]]:
    """hostPath PVs on the folder every node mounts, bound to the claims the job names.

    Returns the YAML and, per claim, its host folder. The `manual` StorageClass has no
    provisioner: each claim binds the PV named after it, which stands in for RWX storage.
    """
    folders = {"models": shared / "pvc" / "models", "data": shared / "pvc" / "data", "e2e-ckpt": shared / "ckpt"}
    docs: list[dict[str, Any]] = [{
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "manual"},
        "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate",
    }]  # fmt: skip
    for claim, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        mode = "ReadWriteMany" if claim == "e2e-ckpt" else "ReadOnlyMany"
        pv = f"{namespace}-{claim}"
        docs.append({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
            "spec": {"capacity": {"storage": "5Gi"}, "accessModes": [mode], "storageClassName": "manual",
                     "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(folder), "type": "Directory"},
                     "claimRef": {"namespace": namespace, "name": claim}},
        })  # fmt: skip
        docs.append({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace},
            "spec": {"accessModes": [mode], "storageClassName": "manual", "volumeName": pv,
                     "resources": {"requests": {"storage": "5Gi"}}},
        })  # fmt: skip
    # hostPath volumes get no fsGroup ownership change, and the pods run as a non-root UID
    # the operator picks: sources readable by all, the checkpoint folder writable like /tmp.
    for path in folders["models"].parent.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    folders["e2e-ckpt"].chmod(0o1777)
    return "---\n".join(json.dumps(d) + "\n" for d in docs), folders
