"""The runtime switch renders every stage as a pod or runs it as a local process."""

from __future__ import annotations

import importlib.util
import json
import sys
from unittest import mock

import kubernetes_validate
import pytest

from tests.conftest import REPO_ROOT

# Kubernetes version whose OpenAPI schema every rendered pod is validated against.
K8S_VERSION = "1.37.0"
DAG_FILE = REPO_ROOT / "dags" / "adfraud_retrain.py"
# The KPO's hook loads a kube config when it builds a pod; no cluster here.
KPO_HOOK = "airflow.providers.cncf.kubernetes.operators.pod.KubernetesPodOperator.hook"

STAGES = ["generate", "ingest", "etl", "tune", "train", "evaluate", "export", "baseline", "register", "promote", "drift",
          "rollout"]
EXPECTED_IMAGE_ROLE = {"tune": "tuner", "train": "trainer-gpu", "export": "trainer-gpu"}
GPU_STAGES = {"train", "export"}


def load_dag(monkeypatch, runtime: str, home: str = "s3://adfraud-data/prod"):
    monkeypatch.setenv("ADFRAUD_RUNTIME", runtime)
    monkeypatch.setenv("ADFRAUD_HOME", home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.adfraud.svc:5000")
    monkeypatch.setenv("ADFRAUD_IMAGE_REGISTRY", "registry.example.com/adfraud")
    monkeypatch.setenv("ADFRAUD_IMAGE_TAG", "1.2.3")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "must-not-leak")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "must-not-leak")
    name = f"adfraud_retrain_{runtime}"
    spec = importlib.util.spec_from_file_location(name, DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.dag


@pytest.fixture
def k8s_dag(monkeypatch):
    return load_dag(monkeypatch, "kubernetes")


def render_pod(task) -> dict:
    from kubernetes.client import ApiClient

    hook = mock.MagicMock(is_in_cluster=False)
    # The XCom sidecar's image and resources come from the hook's connection.
    hook.get_xcom_sidecar_container_image.return_value = "alpine:3.20"
    hook.get_xcom_sidecar_container_resources.return_value = None
    with mock.patch(KPO_HOOK, new_callable=mock.PropertyMock, return_value=hook):
        pod = task.build_pod_request_obj()
    return ApiClient().sanitize_for_serialization(pod)


@pytest.mark.parametrize("stage", STAGES, ids=STAGES)
def test_kubernetes_runtime_renders_each_stage_pod(k8s_dag, stage):
    """Every stage is a KubernetesPodOperator running python -m jobs.<stage> in its image."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    task = k8s_dag.get_task(stage)
    assert isinstance(task, KubernetesPodOperator)
    pod = render_pod(task)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    container = pod["spec"]["containers"][0]
    role = EXPECTED_IMAGE_ROLE.get(stage, "jobs")
    assert container["image"] == f"registry.example.com/adfraud/adfraud-{role}:1.2.3"
    assert container["command"] == ["python", "-m", f"jobs.{stage}"]
    assert container["args"] == task.arguments
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"] == resources["requests"]["memory"]
    if stage in GPU_STAGES:
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
    assert pod["spec"]["serviceAccountName"] == "adfraud-jobs"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["ADFRAUD_XCOM_PATH"] == "/airflow/xcom/return.json"
    assert env["ADFRAUD_HOME"] == "s3://adfraud-data/prod"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.adfraud.svc:5000"
    # No static cloud keys, even when the scheduler has them in its environment.
    assert "must-not-leak" not in json.dumps(pod)
    assert task.do_xcom_push is True
    assert task.reattach_on_restart is True
    assert task.on_finish_action.value == "delete_pod"


def test_local_runtime_runs_the_same_argv(monkeypatch, k8s_dag):
    """The local runtime builds the same stages with the same templated arguments."""
    from adfraud_runtime import LocalStageOperator

    local = load_dag(monkeypatch, "local", home="/data/adfraud")
    for stage in STAGES:
        task = local.get_task(stage)
        assert isinstance(task, LocalStageOperator), stage
        assert task.stage == stage
        pod_args = [a.replace("s3://adfraud-data/prod", "/data/adfraud") for a in k8s_dag.get_task(stage).arguments]
        assert task.arguments == pod_args
        assert "AWS_SECRET_ACCESS_KEY" not in task.env_vars


def test_unknown_runtime_is_a_clear_error(monkeypatch):
    from adfraud_runtime import runtime

    monkeypatch.setenv("ADFRAUD_RUNTIME", "yarn")
    with pytest.raises(ValueError, match="ADFRAUD_RUNTIME='yarn'.*local, kubernetes"):
        runtime()


def test_local_operator_runs_a_stage_and_returns_its_result(stage_home, tmp_path):
    """execute() runs python -m jobs.<stage> and returns the JSON the stage wrote."""
    from adfraud_runtime import LocalStageOperator

    out = tmp_path / "raw"
    op = LocalStageOperator(task_id="generate", stage="generate",
                            arguments=["--output", str(out), "--rows", "3000", "--seed", "3"],
                            env_vars={"ADFRAUD_HOME": str(stage_home)})
    result = op.execute(context={})
    assert result["rows"] == 3000
    assert result["raw_uri"] == str(out)
    assert (out / "_SUCCESS").exists()


def test_local_operator_failure_names_the_stage_and_shows_its_error(stage_home, tmp_path):
    from adfraud_runtime import LocalStageOperator

    missing = tmp_path / "missing.csv"
    op = LocalStageOperator(task_id="ingest", stage="ingest",
                            arguments=["--input", str(missing), "--output", str(tmp_path / "raw")],
                            env_vars={"ADFRAUD_HOME": str(stage_home)})
    with pytest.raises(RuntimeError, match=r"stage ingest exited with 2") as info:
        op.execute(context={})
    assert "missing.csv" in str(info.value)
