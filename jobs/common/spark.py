"""The Spark session every Spark stage starts the same way, locally or on Kubernetes.

``ADFRAUD_SPARK_MASTER`` picks where the work runs:

- ``local[*]`` (the default): driver and executors in this process, bound to loopback.
- ``spark-submit``: a driver that spark-submit started in cluster mode (a Spark Operator
  ``SparkApplication``); its master and Kubernetes settings are spark-submit's.
- ``k8s://https://<api server>``: this process is the driver, in client mode, inside the
  stage's pod; Spark starts executor pods of the jobs image in the same namespace. The
  pod hands the driver its IP, name and namespace through the downward API (``POD_IP``,
  ``POD_NAME``, ``POD_NAMESPACE``; ``plugins/adfraud_engines.py`` adds them to the stage
  pod), executors reach it on :data:`DRIVER_PORT` and :data:`BLOCK_MANAGER_PORT`, and
  ``s3://`` / ``s3a://`` paths go through Hadoop's S3A with web-identity (IRSA) credentials.

:func:`spark_conf` builds the whole configuration from a master URL and an environment
mapping, and touches nothing else, so it is tested without a cluster. The jobs image is
a plain Python image with ``pip install pyspark``, without Spark's own container
entrypoint: executor pods therefore run ``python -m jobs.common.spark executor`` (set by
the pod template of :func:`executor_pod_template`), which starts the executor JVM the way
Spark's ``entrypoint.sh`` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from jobs.common import settings

logger = logging.getLogger(__name__)

K8S_MASTER_PREFIX = "k8s://"
# The master of a driver that spark-submit started (a Spark Operator SparkApplication):
# master, deploy mode and spark.kubernetes.* come from spark-submit and are left alone.
SUBMITTED_MASTER = "spark-submit"

# Executors of a Kubernetes master: how many pods, and the cores and memory of each.
EXECUTOR_INSTANCES_ENV_VAR = "ADFRAUD_SPARK_EXECUTOR_INSTANCES"
DEFAULT_EXECUTOR_INSTANCES = 2
EXECUTOR_CORES_ENV_VAR = "ADFRAUD_SPARK_EXECUTOR_CORES"
DEFAULT_EXECUTOR_CORES = 2
# Executor JVM heap, in MiB (Spark adds its memory overhead on top for the pod's limit).
EXECUTOR_MEMORY_MB_ENV_VAR = "ADFRAUD_SPARK_EXECUTOR_MEMORY_MB"
DEFAULT_EXECUTOR_MEMORY_MB = 4096

# Image of the executor pods; the jobs image, which holds the same pyspark as the driver.
# Equal to adfraud_runtime.image_for("jobs") with its default registry and tag (a test
# keeps them in step); plugins/adfraud_engines.py sets it to the DAG's jobs image.
IMAGE_ENV_VAR = "ADFRAUD_SPARK_IMAGE"
DEFAULT_IMAGE = "ghcr.io/adfraud/adfraud-jobs:0.1.0"

# Namespace of the executor pods: this variable, else the driver pod's own namespace.
NAMESPACE_ENV_VAR = "ADFRAUD_SPARK_NAMESPACE"
DEFAULT_NAMESPACE = "adfraud"

# Service account of the executor pods: it carries the IRSA role for S3 and needs no RBAC.
EXECUTOR_SERVICE_ACCOUNT_ENV_VAR = "ADFRAUD_SPARK_EXECUTOR_SERVICE_ACCOUNT"
DEFAULT_EXECUTOR_SERVICE_ACCOUNT = "adfraud-jobs"

# The address executors connect back to: this variable (e.g. the headless Service
# deploy/k8s/spark-driver-service.yaml), else the pod IP from the downward API.
DRIVER_HOST_ENV_VAR = "ADFRAUD_SPARK_DRIVER_HOST"

# Set in the stage pod by the downward API (adfraud_engines.spark_driver_pod_kwargs).
POD_IP_ENV_VAR = "POD_IP"
POD_NAME_ENV_VAR = "POD_NAME"
POD_NAMESPACE_ENV_VAR = "POD_NAMESPACE"

# The Airflow DAG and run an ETL belongs to; they label and annotate its executor pods.
DAG_ID_ENV_VAR = "ADFRAUD_DAG_ID"
DAG_RUN_ID_ENV_VAR = "ADFRAUD_DAG_RUN_ID"

# Fixed driver ports, so the container ports and the headless Service can name them.
DRIVER_PORT = 7078
BLOCK_MANAGER_PORT = 7079
UI_PORT = 4040

# Where the driver writes the executor pod template before the session starts.
EXECUTOR_TEMPLATE_PATH = "/tmp/adfraud-spark/executor-pod-template.json"
EXECUTOR_CONTAINER_NAME = "spark-executor"
# Runtime user of the jobs image (images/jobs/Dockerfile).
RUNTIME_UID = 10001

# S3 through S3A and the AWS SDK v2 that Hadoop 3.4+ uses: credentials from the pod's
# projected service-account token (IRSA sets AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE).
S3A_FILESYSTEM = "org.apache.hadoop.fs.s3a.S3AFileSystem"
S3A_ABSTRACT_FILESYSTEM = "org.apache.hadoop.fs.s3a.S3A"
WEB_IDENTITY_PROVIDER = "software.amazon.awssdk.auth.credentials.WebIdentityTokenFileCredentialsProvider"

# AWS variables that the executors need too (beside the IRSA ones the webhook injects).
EXECUTOR_AWS_ENV = ("AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")

# The Spark variables the DAG hands to a Spark stage pod (beside settings.POD_ENV_VARS).
SPARK_K8S_ENV_VARS = (
    EXECUTOR_INSTANCES_ENV_VAR,
    EXECUTOR_CORES_ENV_VAR,
    EXECUTOR_MEMORY_MB_ENV_VAR,
    IMAGE_ENV_VAR,
    NAMESPACE_ENV_VAR,
    EXECUTOR_SERVICE_ACCOUNT_ENV_VAR,
    DRIVER_HOST_ENV_VAR,
)

# Kubernetes label values: at most 63 characters, alphanumeric at both ends.
LABEL_VALUE_MAX = 63

KUBERNETES_EXECUTOR_BACKEND = "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend"


def is_kubernetes(master: str) -> bool:
    return master.startswith(K8S_MASTER_PREFIX)


def label_value(value: str) -> str:
    """``value`` as a valid Kubernetes label value (a hash suffix keeps long ones distinct)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-_.")
    if len(clean) > LABEL_VALUE_MAX:
        digest = hashlib.sha1(value.encode()).hexdigest()[:8]
        clean = f"{clean[: LABEL_VALUE_MAX - 9].rstrip('-_.')}-{digest}"
    return clean


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not an integer") from exc
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


def spark_conf(
    master: str, env: Mapping[str, str], shuffle_partitions: int | None = None, cpu_count: int | None = None
) -> dict[str, str]:
    """The Spark configuration for ``master``, from ``env`` (the process environment).

    Pure: it reads only its arguments. A Kubernetes master needs ``POD_IP`` (or
    ``ADFRAUD_SPARK_DRIVER_HOST``) in ``env``; without it the error says how to add it.

    :param master: ``local[...]`` or ``k8s://https://<api server>``.
    :param env: environment variables (``os.environ`` in :func:`session`).
    :param shuffle_partitions: ``spark.sql.shuffle.partitions``; default: twice the cores.
    :param cpu_count: cores of a local driver (default: ``os.cpu_count()``).
    """
    memory_mb = _int(env, settings.SPARK_DRIVER_MEMORY_MB_ENV_VAR, settings.DEFAULT_SPARK_DRIVER_MEMORY_MB)
    conf = {
        "spark.sql.session.timeZone": "UTC",
        "spark.driver.memory": f"{memory_mb}m",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.adaptive.enabled": "true",
    }
    if master != SUBMITTED_MASTER:
        conf["spark.master"] = master
    else:
        # spark-submit already sized the driver JVM; a late spark.driver.memory is ignored.
        del conf["spark.driver.memory"]
    if is_kubernetes(master):
        conf.update(kubernetes_conf(env))
        cores = int(conf["spark.executor.instances"]) * int(conf["spark.executor.cores"])
    else:
        cores = cpu_count or os.cpu_count() or 2
        if master.startswith("local"):
            # Keep a local driver on loopback whatever the host name resolves to.
            conf.update(
                {
                    "spark.driver.host": "127.0.0.1",
                    "spark.driver.bindAddress": "127.0.0.1",
                    "spark.ui.enabled": "false",
                    "spark.ui.showConsoleProgress": "false",
                }
            )
    conf["spark.sql.shuffle.partitions"] = str(shuffle_partitions or cores * 2)
    return conf


def kubernetes_conf(env: Mapping[str, str]) -> dict[str, str]:
    """Client-mode settings of a driver running in a pod, with executors as pods."""
    host = env.get(DRIVER_HOST_ENV_VAR) or env.get(POD_IP_ENV_VAR)
    if not host:
        raise ValueError(
            f"a k8s:// Spark master needs the driver pod's address: set {POD_IP_ENV_VAR} from the downward API "
            f"(adfraud_engines.spark_driver_pod_kwargs() does) or {DRIVER_HOST_ENV_VAR}"
        )
    instances = _int(env, EXECUTOR_INSTANCES_ENV_VAR, DEFAULT_EXECUTOR_INSTANCES)
    cores = _int(env, EXECUTOR_CORES_ENV_VAR, DEFAULT_EXECUTOR_CORES)
    memory_mb = _int(env, EXECUTOR_MEMORY_MB_ENV_VAR, DEFAULT_EXECUTOR_MEMORY_MB, minimum=512)
    namespace = env.get(NAMESPACE_ENV_VAR) or env.get(POD_NAMESPACE_ENV_VAR) or DEFAULT_NAMESPACE
    conf = {
        "spark.submit.deployMode": "client",
        "spark.kubernetes.namespace": namespace,
        "spark.kubernetes.container.image": env.get(IMAGE_ENV_VAR) or DEFAULT_IMAGE,
        "spark.kubernetes.container.image.pullPolicy": "IfNotPresent",
        "spark.kubernetes.authenticate.executor.serviceAccountName": env.get(EXECUTOR_SERVICE_ACCOUNT_ENV_VAR)
        or DEFAULT_EXECUTOR_SERVICE_ACCOUNT,
        "spark.kubernetes.executor.podTemplateFile": EXECUTOR_TEMPLATE_PATH,
        "spark.kubernetes.executor.podTemplateContainerName": EXECUTOR_CONTAINER_NAME,
        "spark.kubernetes.executor.deleteOnTermination": "true",
        "spark.executor.instances": str(instances),
        "spark.executor.cores": str(cores),
        "spark.kubernetes.executor.request.cores": str(cores),
        "spark.executor.memory": f"{memory_mb}m",
        # Executors connect back to this pod: its address, fixed ports, all interfaces.
        "spark.driver.host": host,
        "spark.driver.bindAddress": "0.0.0.0",
        "spark.driver.port": str(DRIVER_PORT),
        "spark.driver.blockManager.port": str(BLOCK_MANAGER_PORT),
        "spark.ui.port": str(UI_PORT),
        "spark.ui.showConsoleProgress": "false",
        # Python workers on the executors use the image's interpreter and code.
        "spark.executorEnv.PYTHONPATH": "/opt/adfraud",
        "spark.executorEnv.PYSPARK_PYTHON": "python",
    }
    pod_name = env.get(POD_NAME_ENV_VAR)
    if pod_name:
        # Executors become owned by the driver pod: deleting the stage pod deletes them.
        conf["spark.kubernetes.driver.pod.name"] = pod_name

    # Executor pods say which DAG run they work for (labels are sanitised, annotations exact).
    labels = {
        "app.kubernetes.io/part-of": "adfraud",
        "app.kubernetes.io/component": "spark-executor",
        "adfraud/stage": "etl-executor",
    }
    annotations = {}
    for key, name in (("adfraud/dag-id", DAG_ID_ENV_VAR), ("adfraud/dag-run-id", DAG_RUN_ID_ENV_VAR)):
        if env.get(name):
            labels[key] = label_value(env[name])
            annotations[key] = env[name]
    conf.update({f"spark.kubernetes.executor.label.{k}": v for k, v in labels.items()})
    conf.update({f"spark.kubernetes.executor.annotation.{k}": v for k, v in annotations.items()})
    for name in EXECUTOR_AWS_ENV:
        if env.get(name):
            conf[f"spark.executorEnv.{name}"] = env[name]
    conf.update(s3a_conf(env))
    return conf


def s3a_conf(env: Mapping[str, str]) -> dict[str, str]:
    """Hadoop S3A for ``s3a://`` and ``s3://`` paths, with web-identity credentials only.

    No access key is ever set: the pod's service account token is exchanged for the IRSA
    role's temporary credentials by the AWS SDK v2 bundled beside hadoop-aws.
    """
    conf = {
        "spark.hadoop.fs.s3a.impl": S3A_FILESYSTEM,
        # ADFRAUD_HOME=s3://... reaches Spark unchanged: map the s3 scheme to S3A too.
        "spark.hadoop.fs.s3.impl": S3A_FILESYSTEM,
        "spark.hadoop.fs.AbstractFileSystem.s3a.impl": S3A_ABSTRACT_FILESYSTEM,
        "spark.hadoop.fs.AbstractFileSystem.s3.impl": S3A_ABSTRACT_FILESYSTEM,
        "spark.hadoop.fs.s3a.aws.credentials.provider": WEB_IDENTITY_PROVIDER,
        # The classic input stream: the analytics-accelerator stream needs another jar.
        "spark.hadoop.fs.s3a.input.stream.type": "classic",
    }
    region = env.get("AWS_REGION")
    if region:
        conf["spark.hadoop.fs.s3a.endpoint.region"] = region
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        # An S3-compatible store (MinIO ...) usually serves buckets as paths.
        conf["spark.hadoop.fs.s3a.endpoint"] = endpoint
        conf["spark.hadoop.fs.s3a.path.style.access"] = "true"
    return conf


def executor_pod_template(conf: Mapping[str, str]) -> dict:
    """The pod template of the executors: non-root, no API token, our executor entry point.

    Spark fills in image, resources, environment and ``args: [executor]``; it keeps the
    container's ``command``, which starts :func:`executor_command` in place of Spark's
    ``entrypoint.sh`` (the jobs image has none).
    """
    labels = {
        k.removeprefix("spark.kubernetes.executor.label."): v
        for k, v in conf.items()
        if k.startswith("spark.kubernetes.executor.label.")
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"labels": labels},
        "spec": {
            # Executors read S3 through IRSA's own projected token; they never call the API.
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": RUNTIME_UID,
                "runAsGroup": RUNTIME_UID,
                "fsGroup": RUNTIME_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": EXECUTOR_CONTAINER_NAME,
                    "command": ["python", "-m", "jobs.common.spark"],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def executor_command(env: Mapping[str, str], spark_home: str, java_home: str | None = None) -> list[str]:
    """The executor JVM's argv, from the variables Spark sets in an executor pod.

    The same command as the ``executor`` branch of Spark's ``entrypoint.sh``: the
    ``SPARK_JAVA_OPT_<n>`` options in order, the heap from ``SPARK_EXECUTOR_MEMORY``, the
    conf directory and Spark's jars on the classpath, and ``KubernetesExecutorBackend``.
    """
    required = (
        "SPARK_DRIVER_URL",
        "SPARK_EXECUTOR_ID",
        "SPARK_EXECUTOR_CORES",
        "SPARK_APPLICATION_ID",
        "SPARK_EXECUTOR_POD_IP",
        "SPARK_EXECUTOR_MEMORY",
    )
    missing = [name for name in required if not env.get(name)]
    if missing:
        raise ValueError(f"not in a Spark executor pod: {', '.join(missing)} unset")
    java_opts = [
        value
        for _, value in sorted(
            (
                (int(name.removeprefix("SPARK_JAVA_OPT_")), value)
                for name, value in env.items()
                if re.fullmatch(r"SPARK_JAVA_OPT_\d+", name)
            )
        )
    ]
    classpath = [env.get("SPARK_CONF_DIR") or f"{spark_home}/conf"]
    if env.get("SPARK_CLASSPATH"):
        classpath.append(env["SPARK_CLASSPATH"])
    classpath.append(f"{spark_home}/jars/*")
    java = f"{java_home}/bin/java" if java_home else "java"
    memory = env["SPARK_EXECUTOR_MEMORY"]
    argv = [
        java,
        *java_opts,
        f"-Xms{memory}",
        f"-Xmx{memory}",
        "-cp",
        ":".join(classpath),
        KUBERNETES_EXECUTOR_BACKEND,
        "--driver-url",
        env["SPARK_DRIVER_URL"],
        "--executor-id",
        env["SPARK_EXECUTOR_ID"],
        "--cores",
        env["SPARK_EXECUTOR_CORES"],
        "--app-id",
        env["SPARK_APPLICATION_ID"],
        "--hostname",
        env["SPARK_EXECUTOR_POD_IP"],
        "--resourceProfileId",
        env.get("SPARK_RESOURCE_PROFILE_ID", "0"),
    ]
    if env.get("SPARK_EXECUTOR_POD_NAME"):
        argv += ["--podName", env["SPARK_EXECUTOR_POD_NAME"]]
    return argv


def driver_command(env: Mapping[str, str], spark_home: str, args: list[str]) -> list[str]:
    """A cluster-mode driver pod's argv (the ``driver`` branch of ``entrypoint.sh``).

    Used by the Spark Operator's driver pods (adfraud_engines.spark_application_manifest).
    """
    bind = env.get("SPARK_DRIVER_BIND_ADDRESS")
    if not bind:
        raise ValueError("not in a Spark driver pod: SPARK_DRIVER_BIND_ADDRESS unset")
    return [
        f"{spark_home}/bin/spark-submit",
        "--conf",
        f"spark.driver.bindAddress={bind}",
        "--deploy-mode",
        "client",
        *args,
    ]


def spark_home() -> str:
    """``SPARK_HOME``, or the directory of the installed pyspark package (its jars/ and bin/)."""
    explicit = os.environ.get("SPARK_HOME")
    if explicit:
        return explicit
    import importlib.util

    found = importlib.util.find_spec("pyspark")
    if found is None or not found.submodule_search_locations:
        raise RuntimeError("pyspark is not installed and SPARK_HOME is unset")
    return list(found.submodule_search_locations)[0]


def session(app_name: str, shuffle_partitions: int | None = None):
    """A Spark session in UTC on ``ADFRAUD_SPARK_MASTER`` (``local[*]`` by default).

    On a ``k8s://`` master this also writes the executor pod template, then starts the
    driver in client mode (:func:`spark_conf` has the settings).
    """
    from pyspark.sql import SparkSession

    from jobs.common import cli

    master = os.environ.get(settings.SPARK_MASTER_ENV_VAR, settings.DEFAULT_SPARK_MASTER)
    try:
        conf = spark_conf(master, os.environ, shuffle_partitions=shuffle_partitions)
    except ValueError as exc:
        cli.fail(str(exc))
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if is_kubernetes(master):
        template = Path(conf["spark.kubernetes.executor.podTemplateFile"])
        template.parent.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: Spark's Kubernetes client reads either.
        template.write_text(json.dumps(executor_pod_template(conf)))
        logger.info(
            "spark on %s: %s executors x %s cores, %s, image %s, namespace %s",
            master,
            conf["spark.executor.instances"],
            conf["spark.executor.cores"],
            conf["spark.executor.memory"],
            conf["spark.kubernetes.container.image"],
            conf["spark.kubernetes.namespace"],
        )
    logger.debug("spark conf: %s", conf)
    builder = SparkSession.builder.appName(app_name)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    logger.info("spark %s on %s", spark.version, master)
    return spark


def main(argv: list[str] | None = None) -> None:
    """Entry point of Spark's own pods in the jobs image: ``executor`` or ``driver <args>``."""
    from jobs.common import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("executor", "driver"):
        cli.fail("usage: python -m jobs.common.spark executor | driver <spark-submit args>")
    home = spark_home()
    env = dict(os.environ)
    try:
        if argv[0] == "executor":
            cmd = executor_command(env, home, env.get("JAVA_HOME"))
        else:
            cmd = driver_command(env, home, argv[1:])
    except ValueError as exc:
        cli.fail(str(exc))
    env.setdefault("SPARK_HOME", home)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
