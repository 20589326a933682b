"""The GitHub Actions workflows: the workflow JSON schema (check-jsonschema's bundled copy)
and what each workflow must do: lint and test on every change, slow tests nightly, images
from main, and on a version tag images, chart and deployment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
NAMES = ("ci.yaml", "release.yaml")


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, f"{name} is not installed: pip install -r requirements-dev.txt"
    return found


def check_schema(*paths: Path) -> subprocess.CompletedProcess:
    command = [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def load(name: str) -> dict[str, Any]:
    # PyYAML reads the bare key `on` as True; the workflow schema and GitHub read "on".
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    if True in data:
        data["on"] = data.pop(True)
    return data


@pytest.fixture(scope="module")
def ci() -> dict[str, Any]:
    return load("ci.yaml")


@pytest.fixture(scope="module")
def release() -> dict[str, Any]:
    return load("release.yaml")


def runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def uses(job: dict) -> list[str]:
    return [step["uses"] for step in job["steps"] if "uses" in step]


# ---- schema ------------------------------------------------------------------------------

def test_match_the_workflow_schema():
    result = check_schema(*(WORKFLOWS / name for name in NAMES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_catches_a_bad_workflow(tmp_path, ci):
    """The validator is live: a job without runs-on fails."""
    bad = json.loads(json.dumps(ci))
    del bad["jobs"]["lint"]["runs-on"]
    path = tmp_path / "ci.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert check_schema(path).returncode != 0


@pytest.mark.parametrize("name", NAMES)
def test_actions_are_pinned(name):
    for job in load(name)["jobs"].values():
        for action in uses(job):
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@(v\d+(\.\d+)*|[0-9a-f]{40})", action), action


@pytest.mark.parametrize("name", NAMES)
def test_no_static_cloud_keys(name):
    text = (WORKFLOWS / name).read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
    assert not re.search(r"secrets\.(AWS|KUBE)", text)


@pytest.mark.parametrize("name", NAMES)
def test_default_permissions_are_read_only(name):
    assert load(name)["permissions"] == {"contents": "read"}


# ---- ci ----------------------------------------------------------------------------------

def test_ci_triggers(ci):
    on = ci["on"]
    assert on["push"]["branches"] == ["main"]
    assert "pull_request" in on
    assert on["schedule"][0]["cron"]


def test_ci_lints_and_tests(ci):
    jobs = ci["jobs"]
    assert "ruff check ." in runs(jobs["lint"])
    assert "hadolint images/*/Dockerfile" in runs(jobs["dockerfiles"])
    assert 'pytest -m "not slow"' in runs(jobs["tests"])
    assert "-c constraints.txt" in runs(jobs["tests"])
    assert "pytest -m slow" in runs(jobs["slow-tests"])
    assert "schedule" in jobs["slow-tests"]["if"]
    assert "if" not in jobs["tests"], "the fast subset runs on every change"


def test_ci_runs_the_deployment_checks(ci):
    command = runs(ci["jobs"]["deploy-config"])
    for test in ("test_charts.py", "test_compose.py", "test_workflows.py", "test_images.py"):
        assert f"tests/unit/{test}" in command
        assert (ROOT / "tests" / "unit" / test).is_file()
    assert "-r requirements-dev.txt" in command


def image_matrix(job: dict) -> list[dict[str, str]]:
    return job["strategy"]["matrix"]["include"]


def check_image_matrix(job: dict) -> None:
    matrix = image_matrix(job)
    dockerfiles = {str(p.relative_to(ROOT)) for p in (ROOT / "images").glob("*/Dockerfile")}
    assert {entry["dockerfile"] for entry in matrix} == dockerfiles
    for entry in matrix:
        role = Path(entry["dockerfile"]).parent.name
        assert entry["image"] == f"adfraud-{role}"
        if entry["target"]:
            text = (ROOT / entry["dockerfile"]).read_text()
            assert re.search(rf"^FROM \S+ AS {entry['target']}$", text, re.M), entry
    assert {e["suffix"] for e in matrix if e["image"] == "adfraud-serving"} == {"", "-tensorrt"}
    build = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action@"))
    assert build["with"]["context"] == "."
    assert build["with"]["push"] is True
    assert "ADFRAUD_CODE_REVISION=${{ github.sha }}" in build["with"]["build-args"]


def test_ci_builds_images_on_main_only(ci):
    job = ci["jobs"]["images"]
    assert job["if"] == "github.event_name == 'push' && github.ref == 'refs/heads/main'"
    assert set(job["needs"]) == {"lint", "dockerfiles", "deploy-config", "tests"}
    assert job["permissions"]["packages"] == "write"
    check_image_matrix(job)


# ---- release -----------------------------------------------------------------------------

def test_release_runs_on_version_tags(release):
    assert release["on"] == {"push": {"tags": ["v*.*.*"]}}


def test_release_pushes_images_with_the_version(release):
    job = release["jobs"]["images"]
    check_image_matrix(job)
    build = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action@"))
    assert "${{ needs.version.outputs.version }}${{ matrix.suffix }}" in build["with"]["tags"]


def test_release_packages_and_pushes_the_chart(release):
    command = runs(release["jobs"]["chart"])
    assert "helm lint --strict charts/adfraud-serving" in command
    assert 'helm package charts/adfraud-serving --version "${VERSION}"' in command
    assert 'helm push "dist/adfraud-serving-${VERSION}.tgz" "${CHART_REGISTRY}"' in command
    assert release["env"]["CHART_REGISTRY"].startswith("oci://")


def test_release_deploys_with_helm(release):
    job = release["jobs"]["deploy"]
    assert job["needs"] == ["version", "chart"]
    assert job["environment"] == "production"
    assert job["permissions"]["id-token"] == "write", "cloud access through OIDC, not stored keys"
    assert any(a.startswith("aws-actions/configure-aws-credentials@") for a in uses(job))
    command = runs(job)
    assert 'helm upgrade --install adfraud-serving "${CHART_REGISTRY}/adfraud-serving"' in command
    assert "-f charts/adfraud-serving/values-production.yaml" in command
    assert "helm upgrade --install airflow apache-airflow/airflow" in command
    assert "-f charts/values/airflow-values.yaml" in command
    assert "--atomic" in command
    for path in ("charts/adfraud-serving/values-production.yaml", "charts/values/airflow-values.yaml"):
        assert (ROOT / path).is_file()


def test_release_pins_airflow_values_by_name(release):
    """The yq edits address keys and env entries that exist in airflow-values.yaml."""
    command = runs(release["jobs"]["deploy"])
    values = yaml.safe_load((ROOT / "charts" / "values" / "airflow-values.yaml").read_text())
    assert values["images"]["airflow"]["tag"] and values["dags"]["gitSync"]["rev"]
    for name in re.findall(r'select\(\.name == "([A-Z_]+)"\)', command):
        assert name in {e["name"] for e in values["env"]}, name
    assert "--set env" not in command, "--set on a list replaces the whole list"
