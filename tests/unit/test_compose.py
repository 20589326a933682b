"""docker-compose.yaml, its .env.example and the Prometheus and Grafana files it mounts,
checked without a Docker engine: the compose specification's JSON schema (through
check-jsonschema's bundled copy) and assertions on the services' wiring.
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
COMPOSE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARDS = ROOT / "charts" / "adfraud-serving" / "files" / "dashboards"

LONG_RUNNING = (
    "postgres",
    "minio",
    "mlflow",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "serving",
    "prometheus",
    "grafana",
)
ONE_SHOT = ("postgres-init", "minio-init", "airflow-init")
AIRFLOW_COMPONENTS = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, f"{name} is not installed: pip install -r requirements-dev.txt"
    return found


def check_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


# ---- schema ------------------------------------------------------------------------------

def test_matches_the_compose_specification():
    result = check_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_catches_a_bad_file(tmp_path, compose):
    """The validator is live: an unknown depends_on condition fails."""
    bad = json.loads(json.dumps(compose))
    bad["services"]["grafana"]["depends_on"]["prometheus"]["condition"] = "service_ready"
    path = tmp_path / "docker-compose.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert check_schema(path).returncode != 0


# ---- services ----------------------------------------------------------------------------

def test_the_stack_is_complete(services):
    assert set(services) == set(LONG_RUNNING) | set(ONE_SHOT)


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_healthchecks(services, name):
    check = services[name]["healthcheck"]
    assert check["test"][0] in {"CMD", "CMD-SHELL"}
    assert check["interval"] and check["retries"] >= 3
    assert services[name]["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", ONE_SHOT)
def test_init_services_run_once(services, name):
    assert services[name]["restart"] == "no"
    assert "healthcheck" not in services[name]


def depends(services, name: str) -> dict[str, str]:
    return {k: v["condition"] for k, v in services[name].get("depends_on", {}).items()}


@pytest.mark.parametrize("name", AIRFLOW_COMPONENTS)
def test_airflow_waits_for_its_dependencies(services, name):
    conditions = depends(services, name)
    assert conditions["postgres"] == "service_healthy"
    assert conditions["airflow-init"] == "service_completed_successfully"
    assert conditions["mlflow"] == "service_healthy"


def test_start_order(services):
    assert depends(services, "postgres-init") == {"postgres": "service_healthy"}
    assert depends(services, "minio-init") == {"minio": "service_healthy"}
    assert depends(services, "mlflow") == {"postgres-init": "service_completed_successfully",
                                           "minio-init": "service_completed_successfully"}
    assert depends(services, "airflow-init") == {"postgres": "service_healthy"}
    assert depends(services, "airflow-scheduler")["airflow-apiserver"] == "service_healthy"
    assert depends(services, "grafana") == {"prometheus": "service_healthy"}
    # No service waits on itself or on a missing service.
    for name in services:
        assert set(depends(services, name)) <= set(services) - {name}, name


@pytest.mark.parametrize("name", ("airflow-init", *AIRFLOW_COMPONENTS))
def test_airflow_runs_the_local_runtime(services, name):
    service = services[name]
    assert service["build"] == {"context": ".", "dockerfile": "images/airflow/Dockerfile", "target": "local",
                                "args": {"ADFRAUD_CODE_REVISION": "${ADFRAUD_CODE_REVISION:-local}"}}
    env = service["environment"]
    assert env["ADFRAUD_RUNTIME"] == "local"
    assert env["ADFRAUD_HOME"] == "/data"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
    assert "adfraud-data:/data" in service["volumes"]


def test_airflow_commands(services):
    assert [services[n]["command"] for n in AIRFLOW_COMPONENTS] == [
        "api-server", "scheduler", "dag-processor", "triggerer"]
    init = services["airflow-init"]
    assert init["user"] == "0:0" and "airflow db migrate" in init["command"][0]
    assert all(services[n]["user"] == "50000:0" for n in AIRFLOW_COMPONENTS)


def test_mlflow_uses_postgres_and_s3(services):
    mlflow = services["mlflow"]
    flags = dict(arg.split("=", 1) for arg in mlflow["command"] if arg.startswith("--") and "=" in arg)
    assert flags["--backend-store-uri"].startswith("postgresql+psycopg2://")
    assert flags["--backend-store-uri"].endswith("@postgres:5432/mlflow")
    assert flags["--artifacts-destination"].startswith("s3://")
    assert "--serve-artifacts" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "psql -c \"CREATE DATABASE mlflow\"" in services["postgres-init"]["command"][0]


def test_minio_bucket_is_created(services):
    command = services["minio-init"]["command"][0]
    assert "mc mb --ignore-existing" in command
    assert "${ADFRAUD_BUCKET}" in command.replace("$$", "$")


def test_serving_service(services):
    serving = services["serving"]
    command = serving["command"]
    assert command[:5] == ["python", "-m", "jobs.serve", "--config", "/data/serving/current.json"]
    assert command[command.index("--port") + 1] == "8080"
    # The server binds loopback unless told otherwise: nothing could reach it.
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert serving["build"]["dockerfile"] == "images/serving/Dockerfile"
    assert serving["build"]["target"] == "cpu"
    assert serving["user"] == "10001:10001"
    assert serving["read_only"] is True
    assert serving["volumes"] == ["adfraud-data:/data:ro"]
    assert serving["environment"]["ADFRAUD_SERVING_CONFIG"] == "/data/serving/current.json"
    assert "127.0.0.1:8000:8080" in serving["ports"]


def test_build_targets_exist(services):
    for name, service in services.items():
        build = service.get("build")
        if not build:
            continue
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        assert dockerfile.is_file(), name
        if "target" in build:
            assert re.search(rf"^FROM \S+ AS {build['target']}$", dockerfile.read_text(), re.M), name


def test_images_are_pinned(services):
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"


def test_ports_are_local_only(services):
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port}"


def test_named_volumes_are_declared_and_used(compose, services):
    declared = set(compose["volumes"])
    used = set()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                used.add(source)
            else:
                assert (ROOT / source).exists(), source
    assert used == declared


# ---- environment -------------------------------------------------------------------------

def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_every_variable_is_in_env_example():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    assert used, "compose reads its settings from .env"
    assert used - set(env_example()) == set()


def test_required_variables_fail_loudly():
    """Secrets have no default in compose: a missing .env stops `docker compose up`."""
    text = COMPOSE.read_text()
    for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AIRFLOW_FERNET_KEY", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(rf"\$\{{{name}:\?", text), name
        assert not re.search(rf"\$\{{{name}:-", text), name


def test_env_example_holds_no_real_secret():
    for key, value in env_example().items():
        if re.search(r"PASSWORD|SECRET|FERNET", key):
            assert value.startswith("change-me"), key


# ---- Prometheus and Grafana ----------------------------------------------------------------

def test_prometheus_scrapes_serving():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    serving = jobs["adfraud-serving"]
    assert serving["metrics_path"] == "/metrics"
    assert serving["static_configs"][0]["targets"] == ["serving:8080"]


def test_prometheus_config_is_mounted(services):
    prometheus = services["prometheus"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_grafana_provisioning(services):
    datasources = yaml.safe_load((GRAFANA / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert [(d["type"], d["url"]) for d in datasources] == [("prometheus", "http://prometheus:9090")]
    (provider,) = yaml.safe_load((GRAFANA / "dashboards" / "adfraud.yaml").read_text())["providers"]
    binds = [v for v in services["grafana"]["volumes"] if v.startswith(".")]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in binds)
    assert mounts["./charts/adfraud-serving/files/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


def test_dashboard_filters_on_the_scrape_job():
    """The dashboard's job variable finds the compose Prometheus's job name."""
    dashboard = json.loads((DASHBOARDS / "adfraud-serving.json").read_text())
    job = next(v for v in dashboard["templating"]["list"] if v["name"] == "job")
    assert "adfraud_serving_requests_total" in job["definition"]
    assert all('job=~"$job"' in t["expr"] for p in dashboard["panels"] for t in p["targets"])
