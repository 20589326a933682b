"""The distributed engines, rendered and validated without a cluster.

Spark on Kubernetes (``jobs.common.spark.spark_conf``, the executor pod template and entry
point, the etl driver pod), Horovod across nodes (the MPIJob), Ray (the RayJob and the
RayCluster of ``deploy/k8s``), the Spark Operator's SparkApplication, the operator that
runs those custom resources (against a stand-in for the Kubernetes hook), and every YAML
file under ``deploy/k8s``. Core objects, and every pod template inside a custom resource,
are validated against the Kubernetes OpenAPI schemas of kubernetes-validate; the custom
resources against the small schemas below (what their operators require, with types).
"""

from __future__ import annotations

import copy
import json
import re
import zipfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import jsonschema
import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -r requirements-dev.txt")

from jobs.common import settings  # noqa: E402
from jobs.common import spark as spark_settings  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402

DEPLOY = REPO_ROOT / "deploy" / "k8s"
KUBE_VERSION = "1.37.0"
K8S_MASTER = "k8s://https://kubernetes.default.svc:443"
RUN_ID = "scheduled__2026-01-01T02:00:00+00:00"
POD_ENV = {"POD_IP": "10.1.2.3", "POD_NAME": "adfraud-etl-x7k2p", "POD_NAMESPACE": "adfraud"}
IMAGE = "registry.example.com/adfraud/adfraud-trainer-gpu:1.2.3"
# Patch target: the operator's Kubernetes hook (a property, so no kube config is loaded).
HOOK = "adfraud_engines.ClusterJobOperator.hook"
KPO_HOOK = "airflow.providers.cncf.kubernetes.operators.pod.KubernetesPodOperator.hook"
# Names of secrets that must never reach a manifest, and the values a leaky scheduler has.
SECRET_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIA-must-not-leak",
    "AWS_SECRET_ACCESS_KEY": "must-not-leak",
    "AWS_SESSION_TOKEN": "must-not-leak",
}
SECRET_MARKERS = re.compile(
    r"must-not-leak|AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|"
    r"fs\.s3a\.(access|secret|session)\.key"
)

# ---- small schemas of the custom resources ----------------------------------------------

OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1}},
        }
    },
}
REPLICA_SPEC = {
    "type": "object",
    "required": ["replicas", "template"],
    "properties": {
        "replicas": {"type": "integer", "minimum": 1},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": POD_TEMPLATE,
    },
}
MPIJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v2beta1"},
        "kind": {"const": "MPIJob"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "required": ["mpiReplicaSpecs"],
            "additionalProperties": False,
            "properties": {
                "slotsPerWorker": {"type": "integer", "minimum": 1},
                "mpiImplementation": {"enum": ["OpenMPI", "Intel", "MPICH"]},
                "sshAuthMountPath": {"type": "string"},
                "launcherCreationPolicy": {"enum": ["AtStartup", "WaitForWorkersReady"]},
                "runLauncherAsWorker": {"type": "boolean"},
                "runPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "cleanPodPolicy": {"enum": ["None", "Running", "All"]},
                        "ttlSecondsAfterFinished": {"type": "integer"},
                        "activeDeadlineSeconds": {"type": "integer"},
                        "backoffLimit": {"type": "integer"},
                        "suspend": {"type": "boolean"},
                        "schedulingPolicy": {"type": "object"},
                        "managedBy": {"type": "string"},
                    },
                },
                "mpiReplicaSpecs": {
                    "type": "object",
                    "required": ["Launcher", "Worker"],
                    "additionalProperties": False,
                    "properties": {"Launcher": REPLICA_SPEC, "Worker": REPLICA_SPEC},
                },
            },
        },
    },
}
RAY_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "properties": {
        "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
        "template": POD_TEMPLATE,
    },
}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "headGroupSpec": RAY_GROUP,
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "allOf": [
                    RAY_GROUP,
                    {
                        "type": "object",
                        "required": ["groupName"],
                        "properties": {
                            "groupName": {"type": "string"},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                        },
                    },
                ]
            },
        },
    },
}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "required": ["entrypoint"],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer"},
                "activeDeadlineSeconds": {"type": "integer"},
                "backoffLimit": {"type": "integer"},
                "clusterSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                "rayClusterSpec": RAY_CLUSTER_SPEC,
                "submitterPodTemplate": POD_TEMPLATE,
            },
            # A job runs on its own cluster or on a selected one, never both.
            "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
        },
    },
}
RAYCLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": OBJECT_META,
        "spec": RAY_CLUSTER_SPEC,
    },
}
SPARK_POD = {
    "type": "object",
    "properties": {
        "cores": {"type": "integer", "minimum": 1},
        "memory": {"type": "string", "pattern": r"^\d+[mg]$"},
        "instances": {"type": "integer", "minimum": 1},
        "serviceAccount": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name", "value"]}},
        "template": POD_TEMPLATE,
    },
}
SPARK_APPLICATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "sparkoperator.k8s.io/v1beta2"},
        "kind": {"const": "SparkApplication"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "required": ["type", "mode", "mainApplicationFile", "sparkVersion", "driver", "executor"],
            "properties": {
                "type": {"enum": ["Java", "Scala", "Python", "R"]},
                "mode": {"enum": ["cluster", "client"]},
                "image": {"type": "string"},
                "mainApplicationFile": {"type": "string", "pattern": "^local://"},
                "arguments": {"type": "array", "items": {"type": "string"}},
                "sparkVersion": {"type": "string"},
                "sparkConf": {"type": "object", "additionalProperties": {"type": "string"}},
                "restartPolicy": {"type": "object", "required": ["type"]},
                "timeToLiveSeconds": {"type": "integer"},
                "driver": SPARK_POD,
                "executor": {"allOf": [SPARK_POD, {"required": ["instances"]}]},
            },
        },
    },
}
CRD_SCHEMAS = {
    "MPIJob": MPIJOB_SCHEMA,
    "RayJob": RAYJOB_SCHEMA,
    "RayCluster": RAYCLUSTER_SCHEMA,
    "SparkApplication": SPARK_APPLICATION_SCHEMA,
}


def pod_of(template: dict, image: str | None = None) -> dict:
    """A pod template (of a custom resource or Spark) as a Pod, for kubernetes-validate."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": copy.deepcopy(template.get("metadata", {})),
        "spec": copy.deepcopy(template["spec"]),
    }
    pod["metadata"].setdefault("name", "template")
    for container in pod["spec"]["containers"]:
        container.setdefault("image", image or "filled-in-by-the-operator")
    return pod


def validate(doc: dict) -> None:
    """A custom resource against its schema and its pod templates against Kubernetes; core kinds whole."""
    kind = doc["kind"]
    if kind not in CRD_SCHEMAS:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        return
    jsonschema.validate(doc, CRD_SCHEMAS[kind])
    for template in pod_templates(doc):
        kubernetes_validate.validate(
            pod_of(template, doc.get("spec", {}).get("image")), KUBE_VERSION, strict=True
        )


def pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "MPIJob":
        return [r["template"] for r in spec["mpiReplicaSpecs"].values()]
    if doc["kind"] == "SparkApplication":
        return [spec["driver"]["template"], spec["executor"]["template"]]
    cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
    templates = [spec["submitterPodTemplate"]] if doc["kind"] == "RayJob" else []
    if cluster:
        templates += [
            cluster["headGroupSpec"]["template"],
            *(g["template"] for g in cluster["workerGroupSpecs"]),
        ]
    return templates


def assert_no_secrets(doc) -> None:
    text = json.dumps(doc)
    assert not SECRET_MARKERS.search(text), SECRET_MARKERS.search(text).group(0)


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.fixture
def k8s(monkeypatch):
    """The Kubernetes runtime, a known registry and a scheduler environment with stray keys."""
    monkeypatch.setenv("ADFRAUD_RUNTIME", "kubernetes")
    monkeypatch.setenv("ADFRAUD_IMAGE_REGISTRY", "registry.example.com/adfraud")
    monkeypatch.setenv("ADFRAUD_IMAGE_TAG", "1.2.3")
    monkeypatch.setenv("ADFRAUD_HOME", "s3://adfraud-data/prod")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.adfraud.svc:5000")
    monkeypatch.setenv("RAY_ADDRESS", "ray://adfraud-ray-head-svc.adfraud.svc.cluster.local:10001")
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    for name in (
        spark_settings.IMAGE_ENV_VAR,
        spark_settings.EXECUTOR_INSTANCES_ENV_VAR,
        "ADFRAUD_TRAIN_NODES",
        "ADFRAUD_TRAIN_GPUS_PER_NODE",
        "ADFRAUD_TUNE_ENGINE",
        "ADFRAUD_RAY_CLUSTER",
    ):
        monkeypatch.delenv(name, raising=False)


# ---- Spark: the configuration -----------------------------------------------------------


def k8s_conf(**env: str) -> dict:
    return spark_settings.spark_conf(K8S_MASTER, {**POD_ENV, **env})


def test_local_master_keeps_the_driver_on_loopback():
    conf = spark_settings.spark_conf("local[*]", {}, cpu_count=3)
    assert conf["spark.master"] == "local[*]"
    assert conf["spark.driver.host"] == conf["spark.driver.bindAddress"] == "127.0.0.1"
    assert conf["spark.ui.enabled"] == "false"
    assert conf["spark.sql.shuffle.partitions"] == "6"
    assert conf["spark.driver.memory"] == "2048m"
    assert not any(k.startswith(("spark.kubernetes.", "spark.hadoop.fs.s3a.")) for k in conf)


def test_kubernetes_master_sizes_the_executors_from_the_environment():
    conf = k8s_conf(
        ADFRAUD_SPARK_EXECUTOR_INSTANCES="6",
        ADFRAUD_SPARK_EXECUTOR_CORES="3",
        ADFRAUD_SPARK_EXECUTOR_MEMORY_MB="6144",
        ADFRAUD_SPARK_DRIVER_MEMORY_MB="4096",
    )
    assert conf["spark.master"] == K8S_MASTER
    assert conf["spark.submit.deployMode"] == "client"
    assert (
        conf["spark.executor.instances"],
        conf["spark.executor.cores"],
        conf["spark.executor.memory"],
    ) == ("6", "3", "6144m")
    assert conf["spark.kubernetes.executor.request.cores"] == "3"
    assert conf["spark.driver.memory"] == "4096m"
    # Twice the executor cores, not the driver pod's.
    assert conf["spark.sql.shuffle.partitions"] == "36"


def test_kubernetes_defaults_are_the_named_constants():
    conf = k8s_conf()
    assert conf["spark.executor.instances"] == str(spark_settings.DEFAULT_EXECUTOR_INSTANCES)
    assert conf["spark.executor.cores"] == str(spark_settings.DEFAULT_EXECUTOR_CORES)
    assert conf["spark.executor.memory"] == f"{spark_settings.DEFAULT_EXECUTOR_MEMORY_MB}m"
    assert conf["spark.kubernetes.container.image"] == spark_settings.DEFAULT_IMAGE
    assert conf["spark.kubernetes.authenticate.executor.serviceAccountName"] == "adfraud-jobs"
    assert conf["spark.kubernetes.namespace"] == "adfraud"


def test_default_executor_image_is_the_default_jobs_image(monkeypatch):
    from adfraud_runtime import image_for

    monkeypatch.delenv("ADFRAUD_IMAGE_REGISTRY", raising=False)
    monkeypatch.delenv("ADFRAUD_IMAGE_TAG", raising=False)
    assert spark_settings.DEFAULT_IMAGE == image_for("jobs")


def test_driver_is_reachable_from_the_executors():
    conf = k8s_conf()
    assert conf["spark.driver.host"] == "10.1.2.3"
    assert conf["spark.driver.bindAddress"] == "0.0.0.0"
    assert conf["spark.driver.port"] == "7078"
    assert conf["spark.driver.blockManager.port"] == "7079"
    # Executors are owned by the driver pod, so deleting the stage pod removes them.
    assert conf["spark.kubernetes.driver.pod.name"] == "adfraud-etl-x7k2p"
    assert k8s_conf(ADFRAUD_SPARK_DRIVER_HOST="adfraud-etl-driver.adfraud.svc")["spark.driver.host"] == (
        "adfraud-etl-driver.adfraud.svc"
    )


def test_image_namespace_and_service_account_overrides():
    conf = k8s_conf(
        ADFRAUD_SPARK_IMAGE="registry.example.com/adfraud/adfraud-jobs:1.2.3",
        ADFRAUD_SPARK_NAMESPACE="spark-jobs",
        ADFRAUD_SPARK_EXECUTOR_SERVICE_ACCOUNT="spark-exec",
    )
    assert conf["spark.kubernetes.container.image"] == "registry.example.com/adfraud/adfraud-jobs:1.2.3"
    assert conf["spark.kubernetes.namespace"] == "spark-jobs"
    assert conf["spark.kubernetes.authenticate.executor.serviceAccountName"] == "spark-exec"
    # Without an explicit namespace, the driver pod's own.
    assert (
        spark_settings.spark_conf(K8S_MASTER, {**POD_ENV, "POD_NAMESPACE": "ml"})[
            "spark.kubernetes.namespace"
        ]
        == "ml"
    )


def test_missing_pod_ip_is_a_clear_error():
    with pytest.raises(ValueError, match=r"POD_IP.*spark_driver_pod_kwargs.*ADFRAUD_SPARK_DRIVER_HOST"):
        spark_settings.spark_conf(K8S_MASTER, {})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ADFRAUD_SPARK_EXECUTOR_INSTANCES", "two"),
        ("ADFRAUD_SPARK_EXECUTOR_CORES", "0"),
        ("ADFRAUD_SPARK_EXECUTOR_MEMORY_MB", "128"),
    ],
    ids=["not-a-number", "zero-cores", "tiny-heap"],
)
def test_bad_sizes_are_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        k8s_conf(**{name: value})


def test_executor_pods_are_labelled_with_the_dag_run():
    conf = k8s_conf(ADFRAUD_DAG_ID="adfraud_retrain", ADFRAUD_DAG_RUN_ID=RUN_ID)
    labels = {
        k.removeprefix("spark.kubernetes.executor.label."): v
        for k, v in conf.items()
        if k.startswith("spark.kubernetes.executor.label.")
    }
    assert labels["adfraud/dag-id"] == "adfraud_retrain"
    assert labels["adfraud/dag-run-id"] == "scheduled__2026-01-01T02-00-00-00-00"
    assert labels["app.kubernetes.io/part-of"] == "adfraud"
    # Not the driver's stage label: the driver Service must not select executors.
    assert labels["adfraud/stage"] != "etl"
    assert conf["spark.kubernetes.executor.annotation.adfraud/dag-run-id"] == RUN_ID


@pytest.mark.parametrize(
    "value", [RUN_ID, "manual__" + "x" * 80, "a+b:c", "-odd-"], ids=["scheduled", "long", "symbols", "edges"]
)
def test_label_values_are_valid(value):
    label = spark_settings.label_value(value)
    assert len(label) <= 63
    assert re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", label)
    assert spark_settings.label_value(value + "y") != label


def test_s3a_uses_web_identity_and_no_keys():
    conf = k8s_conf(AWS_REGION="eu-west-1", **SECRET_ENV)
    assert conf["spark.hadoop.fs.s3a.aws.credentials.provider"] == (
        "software.amazon.awssdk.auth.credentials.WebIdentityTokenFileCredentialsProvider"
    )
    assert (
        conf["spark.hadoop.fs.s3a.impl"]
        == conf["spark.hadoop.fs.s3.impl"]
        == ("org.apache.hadoop.fs.s3a.S3AFileSystem")
    )
    assert conf["spark.hadoop.fs.s3a.endpoint.region"] == "eu-west-1"
    assert conf["spark.executorEnv.AWS_REGION"] == "eu-west-1"
    assert "spark.hadoop.fs.s3a.endpoint" not in conf
    assert_no_secrets(conf)


def test_s3_compatible_endpoint_uses_path_style():
    conf = spark_settings.s3a_conf({"AWS_ENDPOINT_URL_S3": "http://minio.storage.svc:9000"})
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://minio.storage.svc:9000"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"


def test_submitted_driver_keeps_spark_submit_settings():
    conf = spark_settings.spark_conf(spark_settings.SUBMITTED_MASTER, {}, cpu_count=2)
    assert "spark.master" not in conf and "spark.driver.memory" not in conf
    assert not any(k.startswith("spark.kubernetes.") for k in conf)


def test_web_identity_provider_matches_the_bundled_hadoop():
    """Hadoop 3.4+ S3A takes AWS SDK v2 providers; the pinned pyspark bundles such a Hadoop."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    (client,) = jars.glob("hadoop-client-api-*.jar")
    major, minor = (int(x) for x in client.stem.removeprefix("hadoop-client-api-").split(".")[:2])
    assert (major, minor) >= (3, 4)
    assert spark_settings.WEB_IDENTITY_PROVIDER.startswith("software.amazon.awssdk.")
    dockerfile = (REPO_ROOT / "images" / "jobs" / "Dockerfile").read_text()
    version = client.stem.removeprefix("hadoop-client-api-")
    assert f"ARG HADOOP_AWS_VERSION={version}" in dockerfile


# ---- Spark: executor pods ---------------------------------------------------------------


def test_executor_pod_template_is_a_valid_non_root_pod():
    template = spark_settings.executor_pod_template(k8s_conf(ADFRAUD_DAG_RUN_ID=RUN_ID))
    kubernetes_validate.validate(pod_of(template, spark_settings.DEFAULT_IMAGE), KUBE_VERSION, strict=True)
    (container,) = containers(template)
    assert container["name"] == spark_settings.EXECUTOR_CONTAINER_NAME
    assert container["command"] == ["python", "-m", "jobs.common.spark"]
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    assert template["spec"]["automountServiceAccountToken"] is False
    assert template["metadata"]["labels"]["adfraud/dag-run-id"] == spark_settings.label_value(RUN_ID)


def test_spark_keeps_the_template_command():
    """Spark's executor step appends ``executor`` to the args and sets no command (so the
    template's command runs), and the backend class our entry point starts exists."""
    import pyspark

    (jar,) = (Path(pyspark.__file__).parent / "jars").glob("spark-kubernetes_*.jar")
    with zipfile.ZipFile(jar) as archive:
        step = archive.read("org/apache/spark/deploy/k8s/features/BasicExecutorFeatureStep.class")
        names = set(archive.namelist())
    assert b"addToArgs" in step and b"withCommand" not in step
    assert "org/apache/spark/scheduler/cluster/k8s/KubernetesExecutorBackend.class" in names


EXECUTOR_ENV = {
    "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@10.1.2.3:7078",
    "SPARK_EXECUTOR_ID": "3",
    "SPARK_EXECUTOR_CORES": "2",
    "SPARK_EXECUTOR_MEMORY": "4096m",
    "SPARK_APPLICATION_ID": "spark-abc",
    "SPARK_EXECUTOR_POD_IP": "10.1.9.9",
    "SPARK_EXECUTOR_POD_NAME": "adfraud-etl-abc-exec-3",
    "SPARK_RESOURCE_PROFILE_ID": "0",
    "SPARK_CONF_DIR": "/opt/spark/conf",
    "SPARK_JAVA_OPT_10": "-Dlater",
    "SPARK_JAVA_OPT_2": "-Dearlier",
}


def test_executor_command_matches_sparks_entrypoint():
    argv = spark_settings.executor_command(EXECUTOR_ENV, "/site/pyspark", "/usr/lib/jvm/java-17")
    assert argv[:5] == ["/usr/lib/jvm/java-17/bin/java", "-Dearlier", "-Dlater", "-Xms4096m", "-Xmx4096m"]
    assert argv[argv.index("-cp") + 1] == "/opt/spark/conf:/site/pyspark/jars/*"
    assert argv[argv.index("-cp") + 2] == spark_settings.KUBERNETES_EXECUTOR_BACKEND
    pairs = dict(
        zip(
            argv[argv.index(spark_settings.KUBERNETES_EXECUTOR_BACKEND) + 1 :: 2],
            argv[argv.index(spark_settings.KUBERNETES_EXECUTOR_BACKEND) + 2 :: 2],
            strict=True,
        )
    )
    assert pairs == {
        "--driver-url": EXECUTOR_ENV["SPARK_DRIVER_URL"],
        "--executor-id": "3",
        "--cores": "2",
        "--app-id": "spark-abc",
        "--hostname": "10.1.9.9",
        "--resourceProfileId": "0",
        "--podName": "adfraud-etl-abc-exec-3",
    }


def test_executor_entry_point_outside_an_executor_pod_says_so():
    with pytest.raises(ValueError, match="SPARK_DRIVER_URL"):
        spark_settings.executor_command({}, "/site/pyspark")


def test_executor_entry_point_execs_the_jvm(monkeypatch):
    monkeypatch.setattr("os.environ", {**EXECUTOR_ENV, "SPARK_HOME": "/site/pyspark"})
    with mock.patch("os.execvpe") as execvpe:
        spark_settings.main(["executor"])
    cmd, argv, env = execvpe.call_args.args
    assert cmd == "java" and argv[-1] == "adfraud-etl-abc-exec-3"
    assert env["SPARK_HOME"] == "/site/pyspark"


def test_driver_entry_point_runs_spark_submit_in_client_mode():
    argv = spark_settings.driver_command(
        {"SPARK_DRIVER_BIND_ADDRESS": "10.1.2.3"},
        "/site/pyspark",
        ["--properties-file", "/opt/spark/conf/spark.properties", "etl.py"],
    )
    assert argv[:5] == [
        "/site/pyspark/bin/spark-submit",
        "--conf",
        "spark.driver.bindAddress=10.1.2.3",
        "--deploy-mode",
        "client",
    ]
    assert argv[-1] == "etl.py"


# ---- Spark: the etl driver pod ----------------------------------------------------------


def render_pod(task) -> dict:
    from kubernetes.client import ApiClient

    hook = mock.MagicMock(is_in_cluster=False)
    # The XCom sidecar's image and resources come from the hook's connection.
    hook.get_xcom_sidecar_container_image.return_value = "alpine:3.22"
    hook.get_xcom_sidecar_container_resources.return_value = None
    with mock.patch(KPO_HOOK, new_callable=mock.PropertyMock, return_value=hook):
        pod = task.build_pod_request_obj()
    return ApiClient().sanitize_for_serialization(pod)


def etl_spec():
    from adfraud_runtime import Resources, StageSpec

    return StageSpec(
        "etl",
        ["--input", "s3://b/raw", "--output", "s3://b/features", "--dataset", "synthetic"],
        Resources(cpu="2", memory="8Gi"),
    )


def test_etl_driver_pod_gets_its_address_ports_and_sizing(k8s, monkeypatch):
    from adfraud_engines import spark_stage

    monkeypatch.setenv("ADFRAUD_SPARK_MASTER", K8S_MASTER)
    monkeypatch.setenv("ADFRAUD_SPARK_EXECUTOR_INSTANCES", "4")
    task = spark_stage(etl_spec())
    pod = render_pod(task)
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
    container = pod["spec"]["containers"][0]
    assert container["name"] == "base"
    refs = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    assert refs == {
        "POD_IP": "status.podIP",
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
    }
    env = env_of(container)
    assert env["ADFRAUD_SPARK_MASTER"] == K8S_MASTER
    assert env["ADFRAUD_SPARK_EXECUTOR_INSTANCES"] == "4"
    assert env["ADFRAUD_SPARK_IMAGE"] == "registry.example.com/adfraud/adfraud-jobs:1.2.3"
    assert env["ADFRAUD_DAG_RUN_ID"] == "{{ run_id }}"
    assert "env_vars" in task.template_fields
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"spark-driver": 7078, "spark-blockmgr": 7079, "spark-ui": 4040}
    assert pod["metadata"]["labels"]["adfraud/stage"] == "etl"
    assert_no_secrets(pod)

    # What the driver then configures from this environment, as the pod would see it.
    seen = {**{k: v for k, v in env.items() if v is not None}, **POD_ENV, "ADFRAUD_DAG_RUN_ID": RUN_ID}
    conf = spark_settings.spark_conf(seen[settings.SPARK_MASTER_ENV_VAR], seen)
    assert conf["spark.executor.instances"] == "4"
    assert conf["spark.kubernetes.container.image"] == env["ADFRAUD_SPARK_IMAGE"]


def test_etl_stage_stays_a_plain_process_locally(monkeypatch):
    from adfraud_engines import spark_stage
    from adfraud_runtime import LocalStageOperator

    monkeypatch.setenv("ADFRAUD_RUNTIME", "local")
    task = spark_stage(etl_spec())
    assert isinstance(task, LocalStageOperator)
    assert task.env_vars["ADFRAUD_DAG_RUN_ID"] == "{{ run_id }}"


# ---- Horovod ----------------------------------------------------------------------------


def train_spec():
    from adfraud_runtime import Resources, StageSpec

    return StageSpec(
        "train",
        [
            "--features",
            "s3://b/features",
            "--output",
            "s3://b/model",
            "--workers",
            "2",
            "--backend",
            "torch",
            "--run-id",
            "{{ run_id }}",
        ],
        Resources(cpu="8", memory="32Gi", gpu=1, image="trainer-gpu", timeout_s=7200),
    )


def mpijob(nodes=2, gpus=4, **kwargs) -> dict:
    from adfraud_engines import mpijob_manifest

    return mpijob_manifest(
        "adfraud-train-1a2b3c4d-1",
        ["--features", "s3://b/f", "--output", "s3://b/model", "--result-path", "s3://b/r.json"],
        {"ADFRAUD_HOME": "s3://b", "MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        image=IMAGE,
        nodes=nodes,
        gpus_per_node=gpus,
        namespace="adfraud",
        service_account="adfraud-jobs",
        worker_cpu="8",
        worker_memory="32Gi",
        **kwargs,
    )


@pytest.mark.parametrize(("nodes", "gpus"), [(2, 4), (4, 8), (3, 1)], ids=["2x4", "4x8", "3x1"])
def test_mpijob_runs_nodes_times_gpus_ranks(nodes, gpus):
    job = mpijob(nodes, gpus)
    validate(job)
    spec = job["spec"]
    launcher, worker = spec["mpiReplicaSpecs"]["Launcher"], spec["mpiReplicaSpecs"]["Worker"]
    assert launcher["replicas"] == 1
    assert worker["replicas"] == nodes
    assert spec["slotsPerWorker"] == gpus
    command = containers(launcher["template"])[0]["command"]
    assert command[:3] == ["horovodrun", "-np", str(nodes * gpus)]
    assert command[command.index("--hostfile") + 1] == "/etc/mpi/hostfile"
    assert "--gloo" in command
    module = command.index("-m")
    train_argv = command[module + 2 :]
    assert command[module - 1 : module + 2] == ["python", "-m", "jobs.train"]
    # jobs.train parses what the launcher passes (last flag wins): Horovod, np ranks, the result file.
    from jobs.train import build_parser

    args = build_parser().parse_args(train_argv)
    assert (args.backend, args.workers, args.result_path) == ("horovod", nodes * gpus, "s3://b/r.json")
    # Each worker: all GPUs of one node; the launcher: none.
    assert containers(worker["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert "nvidia.com/gpu" not in containers(launcher["template"])[0]["resources"]["limits"]
    assert worker["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert worker["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_mpijob_is_not_n_pods_each_running_its_own_horovodrun():
    """One launcher runs the only horovodrun; the workers only serve sshd."""
    job = mpijob(4, 4)
    worker = containers(job["spec"]["mpiReplicaSpecs"]["Worker"]["template"])[0]
    assert worker["command"][0] == "/usr/sbin/sshd"
    assert "horovodrun" not in json.dumps(worker)
    assert json.dumps(job).count('"horovodrun"') == 1


def test_mpijob_ssh_matches_the_trainer_image():
    from adfraud_engines import SSH_DIR, SSH_PORT, SSHD_CONFIG

    job = mpijob()
    spec = job["spec"]
    dockerfile = (REPO_ROOT / "images" / "trainer-gpu" / "Dockerfile").read_text()
    assert spec["sshAuthMountPath"] == SSH_DIR == "/home/adfraud/.ssh"
    assert "openssh-server" in dockerfile and f"Port {SSH_PORT}" in dockerfile
    assert SSHD_CONFIG in dockerfile and f"HostKey {SSH_DIR}/id_rsa" in dockerfile
    # No host key is baked into the image, and the runtime user can run remote commands.
    assert "rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_*" in dockerfile
    assert "--shell /bin/bash adfraud" in dockerfile
    worker = containers(spec["mpiReplicaSpecs"]["Worker"]["template"])[0]
    assert worker["command"] == ["/usr/sbin/sshd", "-D", "-e", "-f", SSHD_CONFIG]
    assert worker["readinessProbe"]["tcpSocket"]["port"] == SSH_PORT
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"
    launcher = containers(spec["mpiReplicaSpecs"]["Launcher"]["template"])[0]
    assert launcher["command"][launcher["command"].index("--ssh-port") + 1] == str(SSH_PORT)


def test_mpijob_pods_are_non_root_with_the_service_account_and_shm():
    job = mpijob()
    for replica in job["spec"]["mpiReplicaSpecs"].values():
        spec = replica["template"]["spec"]
        assert spec["serviceAccountName"] == "adfraud-jobs"
        assert (
            spec["securityContext"]["runAsUser"] == 10001 and spec["securityContext"]["runAsNonRoot"] is True
        )
        # The MPI Operator's key Secret is readable through the pod's group.
        assert spec["securityContext"]["fsGroup"] == 10001
        assert containers(replica["template"])[0]["securityContext"]["capabilities"]["drop"] == ["ALL"]
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    assert worker["volumes"][0]["emptyDir"]["medium"] == "Memory"
    launcher_env = env_of(containers(job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"])[0])
    assert launcher_env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert launcher_env["NCCL_SOCKET_IFNAME"] == launcher_env["GLOO_SOCKET_IFNAME"] == "eth0"


def test_mpijob_rejects_an_empty_shape():
    with pytest.raises(ValueError, match="at least one node"):
        mpijob(0, 4)


def test_single_node_runs_one_pod_with_n_gpus(k8s):
    from adfraud_engines import train_task
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    task = train_task(train_spec(), result_uri="s3://b/model/result.json", nodes=1, gpus_per_node=4)
    assert isinstance(task, KubernetesPodOperator)
    pod = render_pod(task)
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    from jobs.train import build_parser

    args = build_parser().parse_args(container["args"])
    assert (args.backend, args.workers) == ("horovod", 4)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts
    assert_no_secrets(pod)


def test_one_gpu_on_one_node_is_the_stage_as_declared(k8s):
    from adfraud_engines import train_task

    task = train_task(train_spec(), result_uri="s3://b/model/result.json", nodes=1, gpus_per_node=1)
    assert task.arguments == train_spec().arguments


def test_local_runtime_never_builds_a_cluster_job(monkeypatch):
    from adfraud_engines import train_task, tune_task
    from adfraud_runtime import LocalStageOperator

    monkeypatch.setenv("ADFRAUD_RUNTIME", "local")
    assert isinstance(
        train_task(train_spec(), result_uri="/tmp/r.json", nodes=4, gpus_per_node=8), LocalStageOperator
    )
    assert isinstance(tune_task(tune_spec(), result_uri="/tmp/r.json", engine="rayjob"), LocalStageOperator)


def test_several_nodes_make_an_mpijob_task(k8s, monkeypatch):
    from adfraud_engines import ClusterJobOperator, train_task

    monkeypatch.setenv("ADFRAUD_TRAIN_NODES", "3")
    monkeypatch.setenv("ADFRAUD_TRAIN_GPUS_PER_NODE", "8")
    task = train_task(train_spec(), result_uri="{{ run_dir(run_id) }}/model/result.json")
    assert isinstance(task, ClusterJobOperator) and task.kind == "MPIJob"
    assert task.task_id == "train"
    assert "result_uri" in task.template_fields and "arguments" in task.template_fields
    assert task.env_vars["ADFRAUD_HOME"] == "s3://adfraud-data/prod"
    assert not set(SECRET_ENV) & set(task.env_vars)
    job = task.build(context(try_number=2))
    validate(job)
    spec = job["spec"]
    assert spec["mpiReplicaSpecs"]["Worker"]["replicas"] == 3
    launcher = containers(spec["mpiReplicaSpecs"]["Launcher"]["template"])[0]
    assert launcher["image"] == "registry.example.com/adfraud/adfraud-trainer-gpu:1.2.3"
    assert launcher["command"][2] == "24"
    assert launcher["command"][-6:] == [
        "--result-path",
        "{{ run_dir(run_id) }}/model/result.json",
        "--backend",
        "horovod",
        "--workers",
        "24",
    ]
    worker = containers(spec["mpiReplicaSpecs"]["Worker"]["template"])[0]
    assert worker["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "8"}
    assert spec["runPolicy"]["activeDeadlineSeconds"] == 7200
    assert job["metadata"]["labels"]["adfraud/dag-run-id"] == spark_settings.label_value(RUN_ID)
    assert job["metadata"]["annotations"]["adfraud/try-number"] == "2"
    assert_no_secrets(job)


# ---- Ray --------------------------------------------------------------------------------


def tune_spec():
    from adfraud_runtime import Resources, StageSpec

    return StageSpec(
        "tune",
        [
            "--features",
            "s3://b/features",
            "--output",
            "s3://b/tune",
            "--trials",
            "8",
            "--run-id",
            "{{ run_id }}",
        ],
        Resources(cpu="4", memory="16Gi", image="tuner"),
    )


def rayjob(cluster=None) -> dict:
    from adfraud_engines import rayjob_manifest

    return rayjob_manifest(
        "adfraud-tune-1a2b3c4d-1",
        ["--features", "s3://b/features", "--trials", "8", "--result-path", "s3://b/t.json"],
        {"ADFRAUD_HOME": "s3://b", "RAY_ADDRESS": "ray://elsewhere:10001"},
        image="registry.example.com/adfraud/adfraud-tuner:1.2.3",
        namespace="adfraud",
        service_account="adfraud-jobs",
        cluster=cluster,
        workers=3,
    )


def test_rayjob_runs_jobs_tune_on_its_own_cluster():
    import shlex

    job = rayjob()
    validate(job)
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.tune"]
    from jobs.tune import main  # noqa: F401  (the entrypoint's module imports)

    assert argv[argv.index("--result-path") + 1] == "s3://b/t.json"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["workerGroupSpecs"][0]["replicas"] == 3
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["shutdownAfterJobFinishes"] is True
    for template in pod_templates(job):
        (container,) = containers(template)
        assert container["image"] == "registry.example.com/adfraud/adfraud-tuner:1.2.3"
        assert template["spec"]["serviceAccountName"] == "adfraud-jobs"
        # Ray sets RAY_ADDRESS inside the job; a stray one would point the driver elsewhere.
        assert "RAY_ADDRESS" not in env_of(container)


def test_rayjob_on_an_existing_cluster_only_selects_it():
    job = rayjob(cluster="adfraud-ray")
    validate(job)
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "adfraud-ray"}
    assert "rayClusterSpec" not in job["spec"] and "shutdownAfterJobFinishes" not in job["spec"]


def test_rayjob_entrypoint_quotes_rendered_arguments():
    import shlex

    from adfraud_engines import tune_entrypoint

    tricky = [
        "--features",
        "s3://b/run with space/features",
        "--run-id",
        "manual__2026-01-01T00:00:00+00:00;rm",
    ]
    assert shlex.split(tune_entrypoint(tricky))[3:] == tricky


def test_ray_version_and_spark_version_follow_the_pins():
    from adfraud_engines import RAY_VERSION, SPARK_VERSION

    pins = dict(
        line.split("==", 1)
        for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    assert pins["ray"] == RAY_VERSION
    assert pins["pyspark"] == SPARK_VERSION
    raycluster = yaml.safe_load((DEPLOY / "raycluster.yaml").read_text())
    assert raycluster["spec"]["rayVersion"] == RAY_VERSION


def test_rayjob_task_from_the_dag(k8s, monkeypatch):
    from adfraud_engines import ClusterJobOperator, tune_task

    monkeypatch.setenv("ADFRAUD_TUNE_ENGINE", "rayjob")
    monkeypatch.setenv("ADFRAUD_RAY_CLUSTER", "adfraud-ray")
    task = tune_task(tune_spec(), result_uri="s3://adfraud-data/prod/runs/r/tune/result.json")
    assert isinstance(task, ClusterJobOperator) and task.kind == "RayJob"
    job = task.build(context())
    validate(job)
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "adfraud-ray"}
    assert job["spec"]["entrypoint"].endswith("--result-path s3://adfraud-data/prod/runs/r/tune/result.json")
    assert_no_secrets(job)


def test_tune_pod_engine_is_the_stage(k8s):
    from adfraud_engines import tune_task
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    task = tune_task(tune_spec(), result_uri="s3://b/r.json", engine="pod")
    assert isinstance(task, KubernetesPodOperator)
    assert task.env_vars[settings.RAY_ADDRESS_ENV_VAR].startswith("ray://adfraud-ray-head-svc.")


def test_unknown_tune_engine_is_a_clear_error(k8s):
    from adfraud_engines import tune_task

    with pytest.raises(ValueError, match="ADFRAUD_TUNE_ENGINE='yarn'.*pod, rayjob"):
        tune_task(tune_spec(), result_uri="s3://b/r.json", engine="yarn")


# ---- Spark Operator ---------------------------------------------------------------------


def test_spark_application_runs_the_etl_with_our_entry_point():
    from adfraud_engines import spark_application_manifest

    app = spark_application_manifest(
        "adfraud-etl-1a2b3c4d-1",
        ["--input", "s3://b/raw", "--result-path", "s3://b/etl.json"],
        {"ADFRAUD_HOME": "s3://b", "AWS_REGION": "eu-west-1"},
        image="registry.example.com/adfraud/adfraud-jobs:1.2.3",
        namespace="adfraud",
        service_account="adfraud-jobs",
        executors=5,
        executor_cores=3,
    )
    validate(app)
    spec = app["spec"]
    assert spec["mainApplicationFile"] == "local:///opt/adfraud/jobs/etl.py"
    assert (spec["executor"]["instances"], spec["executor"]["cores"]) == (5, 3)
    assert spec["driver"]["serviceAccount"] == spec["executor"]["serviceAccount"] == "adfraud-jobs"
    assert env_of(spec["driver"])["ADFRAUD_SPARK_MASTER"] == "spark-submit"
    for role in ("driver", "executor"):
        assert containers(spec[role]["template"])[0]["command"] == ["python", "-m", "jobs.common.spark"]
    assert (
        spec["sparkConf"]["spark.hadoop.fs.s3a.aws.credentials.provider"]
        == spark_settings.WEB_IDENTITY_PROVIDER
    )
    assert (REPO_ROOT / "jobs" / "etl.py").is_file()
    assert_no_secrets(app)


# ---- job state, results, the operator ---------------------------------------------------

STATES = {
    "mpijob-running": (
        {
            "kind": "MPIJob",
            "status": {
                "conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]
            },
        },
        "running",
    ),
    "mpijob-succeeded": (
        {
            "kind": "MPIJob",
            "status": {
                "conditions": [
                    {"type": "Running", "status": "False"},
                    {"type": "Succeeded", "status": "True"},
                ]
            },
        },
        "succeeded",
    ),
    "mpijob-failed": (
        {
            "kind": "MPIJob",
            "status": {
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "launcher failed",
                    }
                ]
            },
        },
        "failed",
    ),
    "mpijob-new": ({"kind": "MPIJob"}, "running"),
    "rayjob-initializing": ({"kind": "RayJob", "status": {"jobDeploymentStatus": "Initializing"}}, "running"),
    "rayjob-complete": (
        {"kind": "RayJob", "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}},
        "succeeded",
    ),
    "rayjob-job-failed": (
        {"kind": "RayJob", "status": {"jobDeploymentStatus": "Running", "jobStatus": "FAILED"}},
        "failed",
    ),
    "rayjob-complete-stopped": (
        {"kind": "RayJob", "status": {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}},
        "failed",
    ),
    "rayjob-invalid": (
        {"kind": "RayJob", "status": {"jobDeploymentStatus": "ValidationFailed", "message": "bad spec"}},
        "failed",
    ),
    "sparkapp-running": (
        {"kind": "SparkApplication", "status": {"applicationState": {"state": "RUNNING"}}},
        "running",
    ),
    "sparkapp-completed": (
        {"kind": "SparkApplication", "status": {"applicationState": {"state": "COMPLETED"}}},
        "succeeded",
    ),
    "sparkapp-submission-failed": (
        {
            "kind": "SparkApplication",
            "status": {"applicationState": {"state": "SUBMISSION_FAILED", "errorMessage": "no image"}},
        },
        "failed",
    ),
}


@pytest.mark.parametrize("case", list(STATES), ids=list(STATES))
def test_job_state(case):
    from adfraud_engines import job_state

    obj, expected = STATES[case]
    state, detail = job_state(obj)
    assert state == expected
    if case == "mpijob-failed":
        assert detail == "BackoffLimitExceeded: launcher failed"


def test_job_names_are_stable_per_try_and_valid():
    from adfraud_engines import job_name

    first = job_name("adfraud-train", "adfraud_retrain", RUN_ID, "train", 1)
    assert first == job_name("adfraud-train", "adfraud_retrain", RUN_ID, "train", 1)
    assert first != job_name("adfraud-train", "adfraud_retrain", RUN_ID, "train", 2)
    assert first != job_name("adfraud-train", "adfraud_retrain", "manual__other", "train", 1)
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", first)
    long = job_name("a-very-long-prefix-for-a-stage-name-indeed", "d", RUN_ID, "t", 10)
    assert len(long) <= 40 and long.endswith("-10")


def context(try_number: int = 1) -> dict:
    return {"ti": SimpleNamespace(dag_id="adfraud_retrain", try_number=try_number), "run_id": RUN_ID}


class FakeHook:
    """The Kubernetes hook's custom-object calls, against an in-memory store."""

    def __init__(self, states: list[dict], exists: bool = False):
        self.states = list(states)
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.exists = exists

    def create_custom_object(self, *, group, version, plural, body, namespace):
        from kubernetes.client.exceptions import ApiException

        assert (group, version, plural) == ("kubeflow.org", "v2beta1", "mpijobs")
        if self.exists:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(body)
        return body

    def get_custom_object(self, *, group, version, plural, name, namespace):
        status = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"kind": "MPIJob", "metadata": {"name": name}, "status": status}

    def delete_custom_object(self, *, group, version, plural, name, namespace):
        self.deleted.append(name)


def operator(tmp_path, **kwargs):
    import functools

    from adfraud_engines import ClusterJobOperator, mpijob_manifest

    builder = functools.partial(
        mpijob_manifest,
        image=IMAGE,
        nodes=2,
        gpus_per_node=2,
        namespace="adfraud",
        service_account="adfraud-jobs",
        worker_cpu="4",
        worker_memory="8Gi",
    )
    return ClusterJobOperator(
        task_id="train",
        kind="MPIJob",
        builder=builder,
        name_prefix="adfraud-train",
        arguments=["--features", "s3://b/f"],
        env_vars={"ADFRAUD_HOME": "s3://b"},
        result_uri=str(tmp_path / "result.json"),
        namespace="adfraud",
        poll_interval_s=0,
        **kwargs,
    )


RUNNING_STATUS = {"conditions": [{"type": "Running", "status": "True"}]}
SUCCEEDED_STATUS = {"conditions": [{"type": "Succeeded", "status": "True"}]}


def test_operator_creates_waits_and_returns_the_result(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"model_uri": "s3://b/model", "world_size": 4}))
    op = operator(tmp_path)
    hook = FakeHook([RUNNING_STATUS, RUNNING_STATUS, SUCCEEDED_STATUS])
    with mock.patch(HOOK, new_callable=mock.PropertyMock, return_value=hook):
        result = op.execute(context())
    assert result == {"model_uri": "s3://b/model", "world_size": 4}
    (created,) = hook.created
    validate(created)
    assert created["metadata"]["name"] == op.job_name
    launcher = containers(created["spec"]["mpiReplicaSpecs"]["Launcher"]["template"])[0]
    assert launcher["command"][launcher["command"].index("--result-path") + 1] == str(
        tmp_path / "result.json"
    )


def test_operator_reattaches_to_the_job_of_its_try(tmp_path):
    (tmp_path / "result.json").write_text("{}")
    op = operator(tmp_path)
    hook = FakeHook([SUCCEEDED_STATUS], exists=True)
    with mock.patch(HOOK, new_callable=mock.PropertyMock, return_value=hook):
        assert op.execute(context()) == {}
    assert hook.created == []


def test_operator_fails_with_the_jobs_reason(tmp_path):
    op = operator(tmp_path)
    failed = {
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "worker-1 OOMKilled",
            }
        ]
    }
    hook = FakeHook([RUNNING_STATUS, failed])
    with (
        mock.patch(HOOK, new_callable=mock.PropertyMock, return_value=hook),
        pytest.raises(RuntimeError, match=r"MPIJob adfraud/adfraud-train-\w+-1 failed: .*OOMKilled"),
    ):
        op.execute(context())


def test_operator_fails_when_the_result_is_missing(tmp_path):
    op = operator(tmp_path)
    hook = FakeHook([SUCCEEDED_STATUS])
    with (
        mock.patch(HOOK, new_callable=mock.PropertyMock, return_value=hook),
        pytest.raises(RuntimeError, match="succeeded but its result"),
    ):
        op.execute(context())


def test_killing_the_task_deletes_its_job(tmp_path):
    op = operator(tmp_path)
    hook = FakeHook([RUNNING_STATUS])
    with mock.patch(HOOK, new_callable=mock.PropertyMock, return_value=hook):
        op.job_name = "adfraud-train-1a2b3c4d-1"
        op.on_kill()
    assert hook.deleted == ["adfraud-train-1a2b3c4d-1"]


def test_operator_rejects_a_builder_of_another_kind(tmp_path):
    from adfraud_engines import ClusterJobOperator

    op = ClusterJobOperator(
        task_id="x",
        kind="RayJob",
        builder=lambda **_: {"kind": "MPIJob"},
        name_prefix="x",
        arguments=[],
        env_vars={},
        result_uri="r",
        namespace="adfraud",
    )
    with pytest.raises(ValueError, match="made a MPIJob, not a RayJob"):
        op.build(context())


# ---- deploy/k8s -------------------------------------------------------------------------

MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_deploy_manifests_parse_and_validate(path):
    docs = load(path)
    assert docs
    for doc in docs:
        validate(doc)
        assert doc["metadata"]["namespace"] == "adfraud"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "adfraud"
        assert_no_secrets(doc)


def test_kubernetes_validation_catches_a_bad_object():
    """The validator is live: a misspelt Service field fails."""
    (service,) = load(DEPLOY / "spark-driver-service.yaml")
    service["spec"]["clusterIp"] = "None"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)


def test_crd_schemas_catch_a_bad_object():
    bad = mpijob()
    bad["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


def test_driver_service_matches_the_driver_pod():
    from adfraud_engines import SPARK_DRIVER_SERVICE, SPARK_DRIVER_STAGE

    (service,) = load(DEPLOY / "spark-driver-service.yaml")
    assert service["metadata"]["name"] == SPARK_DRIVER_SERVICE
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {
        "app.kubernetes.io/part-of": "adfraud",
        "adfraud/stage": SPARK_DRIVER_STAGE,
    }
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {
        "spark-driver": (spark_settings.DRIVER_PORT, "spark-driver"),
        "spark-blockmgr": (spark_settings.BLOCK_MANAGER_PORT, "spark-blockmgr"),
        "spark-ui": (spark_settings.UI_PORT, "spark-ui"),
    }


def test_spark_driver_role_covers_executor_pods_and_their_configmap():
    role, binding = load(DEPLOY / "spark-rbac.yaml")
    rules = {r["resources"][0]: set(r["verbs"]) for r in role["rules"]}
    assert {"create", "delete", "watch", "get", "list"} <= rules["pods"]
    assert {"create", "delete"} <= rules["configmaps"]
    assert "secrets" not in rules
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "adfraud-jobs", "namespace": "adfraud"}]


def test_cluster_jobs_role_covers_what_the_operator_calls():
    from adfraud_engines import PLURALS

    role, binding = load(DEPLOY / "cluster-jobs-rbac.yaml")
    granted = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    for kind, plural in PLURALS.items():
        group = {"MPIJob": "kubeflow.org", "RayJob": "ray.io", "SparkApplication": "sparkoperator.k8s.io"}[
            kind
        ]
        assert {"create", "get", "delete"} <= granted[(group, plural)]
    assert binding["subjects"][0]["name"] == "airflow-worker"


def test_raycluster_matches_the_tune_stage():
    from adfraud_engines import RAY_CLIENT_PORT, RAY_CLUSTER_NAME

    (cluster,) = load(DEPLOY / "raycluster.yaml")
    assert cluster["metadata"]["name"] == RAY_CLUSTER_NAME
    head = cluster["spec"]["headGroupSpec"]
    (container,) = containers(head["template"])
    assert container["image"].split("/")[-1].startswith("adfraud-tuner:")
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["client"] == RAY_CLIENT_PORT
    assert head["rayStartParams"]["num-cpus"] == "0"
    values = (REPO_ROOT / "charts" / "values" / "airflow-values.yaml").read_text()
    assert f"ray://{RAY_CLUSTER_NAME}-head-svc.adfraud.svc.cluster.local:{RAY_CLIENT_PORT}" in values
    for template in pod_templates(cluster):
        assert template["spec"]["serviceAccountName"] == "adfraud-jobs"
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.slow
def test_executor_backend_accepts_our_command(tmp_path):
    """The real KubernetesExecutorBackend parses the argv of our entry point and dials the
    driver URL (a socket this test listens on, on loopback)."""
    import os
    import shutil
    import socket
    import subprocess

    if not (os.environ.get("JAVA_HOME") or shutil.which("java")):
        pytest.skip("no Java here")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(90)
        env = {
            **EXECUTOR_ENV,
            "SPARK_DRIVER_URL": f"spark://CoarseGrainedScheduler@127.0.0.1:{server.getsockname()[1]}",
            "SPARK_EXECUTOR_MEMORY": "512m",
            "SPARK_EXECUTOR_POD_IP": "127.0.0.1",
            "SPARK_CONF_DIR": str(tmp_path),
        }
        for name in ("SPARK_JAVA_OPT_2", "SPARK_JAVA_OPT_10"):
            env.pop(name)
        home = spark_settings.spark_home()
        argv = spark_settings.executor_command(env, home, os.environ.get("JAVA_HOME"))
        with subprocess.Popen(
            argv,
            env={**os.environ, **env, "SPARK_HOME": home},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as backend:
            try:
                connection, _ = server.accept()
                connection.close()
            finally:
                backend.kill()


def test_horovodrun_reads_the_launcher_command_and_the_operators_hostfile(tmp_path, monkeypatch):
    """horovodrun's own parser takes the launcher's argv, and its hostfile reader takes the
    MPI Operator's OpenMPI hostfile, with as many slots as ranks."""
    launch = pytest.importorskip("horovod.runner.launch")
    from adfraud_engines import horovodrun_argv
    from horovod.runner.common.util import hosts

    nodes, gpus = 3, 4
    argv = horovodrun_argv(nodes * gpus, ["--features", "s3://b/f", "--output", "s3://b/m"])
    monkeypatch.setattr("sys.argv", argv)
    args = launch.parse_args()
    assert (args.num_proc, args.hostfile, args.use_gloo, args.nics) == (
        12,
        "/etc/mpi/hostfile",
        True,
        {"eth0"},
    )
    assert (args.ssh_port, args.ssh_identity_file) == (2222, "/home/adfraud/.ssh/id_rsa")
    assert args.command[:3] == ["python", "-m", "jobs.train"]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(
        "".join(
            f"adfraud-train-1a2b3c4d-1-worker-{i}.adfraud-train-1a2b3c4d-1.adfraud.svc slots={gpus}\n"
            for i in range(nodes)
        )
    )
    parsed = hosts.parse_hosts(hosts.parse_host_files(str(hostfile)))
    assert sum(h.slots for h in parsed) == args.num_proc
