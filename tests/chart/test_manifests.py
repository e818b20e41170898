"""manifests/: the plain install YAML stays what the chart renders, and the examples are valid."""

from __future__ import annotations

import os
import subprocess

import yaml

from kdistill.api import load_job

from .helm import REPO, helm_binary, read_yaml

MANIFESTS = REPO / "manifests"


def test_rendered_manifests_are_current() -> None:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "render-manifests.sh"), "--check"], capture_output=True,
                          text=True, env={**os.environ, "HELM": str(helm_binary())}, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_manifests_install_the_operator_into_its_own_restricted_namespace() -> None:
    docs = [d for d in yaml.safe_load_all((MANIFESTS / "kdistill.yaml").read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "Namespace"
    assert docs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
            "Service"} <= set(kinds)  # fmt: skip
    namespaced = [d for d in docs if d["kind"] in ("ServiceAccount", "Deployment", "Service")]
    assert all(d["metadata"]["namespace"] == "kdistill-system" for d in namespaced)
    # No custom resource of a CRD defined in the same file: `kubectl apply -f` would fail on a fresh cluster.
    defined = {d["spec"]["names"]["kind"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert not defined & set(kinds)


def test_example_jobs_are_valid_and_cpu_quickstart_needs_no_gpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    jobs = {}
    for path in sorted((MANIFESTS / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "DistillationJob":
                single = tmp_path / f"{doc['metadata']['name']}.yaml"
                single.write_text(yaml.safe_dump(doc))
                jobs[doc["metadata"]["name"]] = load_job(single)
    assert {"quickstart-cpu", "llm-student"} <= set(jobs)
    cpu = jobs["quickstart-cpu"].spec
    assert cpu.parallelism.gpus_per_node == 0
    assert cpu.serving.enabled and cpu.data.eval


def test_cpu_quickstart_reads_what_the_data_job_writes() -> None:
    docs = list(yaml.safe_load_all((MANIFESTS / "examples" / "quickstart-data.yaml").read_text()))
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    out_root = container["command"][container["command"].index("--pvc") + 1]
    assert out_root == f"/mnt/pvc/{pvc['metadata']['name']}"
    spec = read_yaml(MANIFESTS / "examples" / "cpu-quickstart.yaml")["spec"]
    claim = pvc["metadata"]["name"]
    # teacher_pretrain writes models/quickstart-teacher and data/pydoc-{train,eval}.jsonl under --pvc.
    assert spec["teacher"]["model"] == f"pvc://{claim}/models/quickstart-teacher"
    assert spec["data"]["train"] == f"pvc://{claim}/data/pydoc-train.jsonl"
    assert spec["data"]["eval"] == f"pvc://{claim}/data/pydoc-eval.jsonl"
    assert spec["checkpoint"]["volume"] == {"claimName": claim}


def test_gpu_example_is_the_one_in_examples() -> None:
    gpu = read_yaml(MANIFESTS / "examples" / "gpu-2node.yaml")
    assert gpu == read_yaml(REPO / "examples" / "causal-lm-2node-gpu.yaml")
