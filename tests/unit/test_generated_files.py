"""Generated artefacts are current, and the CRD has what kubectl and the API server need."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdistill.api.crd import build_crd
from kdistill.api.reference import render_reference
from kdistill.cli.generated import RBAC_DIR, expected, render

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "kdistill.io_distillationjobs.yaml"
GENERATED = expected(ROOT)


def test_committed_crd_is_current() -> None:
    assert CRD_FILE.read_text() == render(build_crd()), "crds/ is stale: run `make crds`"


def test_api_reference_is_current() -> None:
    assert (ROOT / "docs" / "api.md").read_text() == render_reference(), "docs/api.md is stale: run `make crds`"


@pytest.mark.parametrize("path", sorted(GENERATED), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_generated_file_is_current(path: Path) -> None:
    assert path.read_text() == GENERATED[path](), f"{path.relative_to(ROOT)} is stale: run `make crds`"


def test_every_rbac_file_the_chart_holds_is_generated() -> None:
    """No hand-written rule file beside the generated ones."""
    on_disk = set((ROOT / RBAC_DIR).glob("*.yaml"))
    assert on_disk == {p for p in GENERATED if p.parent == ROOT / RBAC_DIR}


def test_the_version_has_one_source() -> None:
    """pyproject reads kdistill.__version__; the chart's version and appVersion are stamped from it."""
    import tomllib

    from kdistill import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kdistill.__version__"}
    chart = yaml.safe_load((ROOT / "charts" / "kdistill" / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == __version__
    from typer.testing import CliRunner

    from kdistill.cli.main import app

    assert CliRunner().invoke(app, ["version"]).stdout.strip() == __version__


def _walk(schema: dict, path: str = "") -> list[tuple[str, dict]]:
    out = [(path, schema)]
    for key, prop in schema.get("properties", {}).items():
        out += _walk(prop, f"{path}.{key}")
    if "items" in schema:
        out += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _walk(schema["additionalProperties"], f"{path}{{}}")
    return out


def test_crd_is_structural_and_complete() -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["dj"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Stage",
        "Progress",
        "Restarts",
        "Retention",
        "Endpoint",
        "Queue",
        "Age",
    ]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"untyped node {path}"
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf"):
            assert forbidden not in node, f"{path} uses {forbidden}: not structural"
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["task", "teacher", "student", "data"]
    assert spec["properties"]["task"]["enum"] == ["causal-lm", "sequence-classification"]
    alpha = spec["properties"]["distillation"]["properties"]["alpha"]
    assert (alpha["minimum"], alpha["maximum"], alpha["default"]) == (0.0, 1.0, 0.7)
    topk = spec["properties"]["parallelism"]["properties"]["gradientCompression"]["properties"]["topK"]
    assert topk["exclusiveMaximum"] is True and topk["maximum"] == 1.0


def test_training_fields_immutable_and_lifecycle_fields_mutable() -> None:
    spec = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    props = spec["properties"]["spec"]["properties"]

    def immutable(key: str) -> bool:
        return any(r["rule"] == "self == oldSelf" for r in props[key].get("x-kubernetes-validations", []))

    for key in ("task", "teacher", "student", "data", "distillation", "quantization", "parallelism", "checkpoint"):
        assert immutable(key), key
    for key in ("serving", "suspend", "failurePolicy", "ttlSecondsAfterFinished", "template"):
        assert not immutable(key), key


def test_every_model_rule_is_in_the_crd() -> None:
    from kdistill.api import spec as spec_module
    from kdistill.api.base import ApiModel

    crd_text = CRD_FILE.read_text()
    crd_rules = {
        r["rule"]
        for _, n in _walk(yaml.safe_load(crd_text)["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
        for r in n.get("x-kubernetes-validations", [])
    }
    models = [v for v in vars(spec_module).values() if isinstance(v, type) and issubclass(v, ApiModel)]
    for model in models:
        for rule in model.cel_rules:
            assert rule.rule in crd_rules, f"{model.__name__}: {rule.rule}"


SCHEDULE_CRD_FILE = ROOT / "crds" / "kdistill.io_distillationschedules.yaml"


def test_schedule_crd_is_structural_and_complete() -> None:
    crd = yaml.safe_load(SCHEDULE_CRD_FILE.read_text())
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "DistillationSchedule",
        "distillationschedules",
        ["dsch"],
    )
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Schedule",
        "Suspend",
        "Last run",
        "Promoted",
        "Age",
    ]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"untyped node {path}"
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf"):
            assert forbidden not in node, f"{path} uses {forbidden}: not structural"
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["schedule", "data", "jobTemplate"]
    fraction = spec["properties"]["data"]["properties"]["replay"]["properties"]["fraction"]
    assert (fraction["minimum"], fraction["maximum"], fraction["exclusiveMaximum"]) == (0.0, 1.0, True)


def test_schedule_template_is_the_job_spec_without_its_data_files() -> None:
    """jobTemplate.spec embeds the job's schema: every job rule but the eval-for-serving one,
    data.train not required, data.train/eval refused, and nothing immutable."""
    job_spec = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    job_spec = job_spec["properties"]["spec"]
    schema = yaml.safe_load(SCHEDULE_CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    template = schema["properties"]["spec"]["properties"]["jobTemplate"]["properties"]["spec"]
    assert set(template["properties"]) == set(job_spec["properties"])
    assert "data" not in template["required"] and template["properties"]["data"]["default"] == {}
    assert "required" not in template["properties"]["data"]
    job_rules = {r["rule"] for r in job_spec["x-kubernetes-validations"]}
    template_rules = {r["rule"] for r in template["x-kubernetes-validations"]}
    assert job_rules - template_rules == {"!self.serving.enabled || has(self.data.eval)"}
    for key in ("train", "eval"):
        assert template["properties"]["data"]["properties"][key]["x-kubernetes-validations"][0]["rule"] == (
            "size(self) == 0"
        )
    rules = [r["rule"] for _, n in _walk(template) for r in n.get("x-kubernetes-validations", [])]
    assert "self == oldSelf" not in rules


def test_every_schedule_model_rule_is_in_its_crd() -> None:
    from kdistill.api import schedule as schedule_module
    from kdistill.api.base import ApiModel

    crd_rules = {
        r["rule"]
        for _, n in _walk(
            yaml.safe_load(SCHEDULE_CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        )
        for r in n.get("x-kubernetes-validations", [])
    }
    models = [
        v
        for v in vars(schedule_module).values()
        if isinstance(v, type) and issubclass(v, ApiModel) and v.__module__ == schedule_module.__name__
    ]
    for model in models:
        for rule in model.cel_rules:
            assert rule.rule in crd_rules, f"{model.__name__}: {rule.rule}"
    assert any(r.startswith("self.matches(r'^(@yearly") for r in crd_rules), "the cron pattern rule"
