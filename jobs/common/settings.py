"""Environment settings shared by every stage.

Each setting is an ``ADFRAUD_*`` variable named beside its default. The runtime switch
in ``plugins/`` hands exactly :data:`POD_ENV_VARS` to every stage, local or on
Kubernetes, so a stage sees the same configuration wherever it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

# Where a stage writes its JSON result; the KubernetesPodOperator's XCom sidecar reads
# this exact path, the local runtime points it at a per-task temporary file.
XCOM_PATH_ENV_VAR = "ADFRAUD_XCOM_PATH"
DEFAULT_XCOM_PATH = "/airflow/xcom/return.json"

# Root of all pipeline outputs (raw events, features, models, reports) when a stage is
# not given explicit URIs. Any fsspec URI: a path, file://..., s3://bucket/prefix.
HOME_ENV_VAR = "ADFRAUD_HOME"
DEFAULT_HOME = "var"

# MLflow tracking and registry. MLflow's own variable wins; without it the embedded
# default is a SQLite store under ADFRAUD_HOME with artifacts beside it.
MLFLOW_TRACKING_URI_ENV_VAR = "MLFLOW_TRACKING_URI"
MLFLOW_EXPERIMENT_ENV_VAR = "ADFRAUD_MLFLOW_EXPERIMENT"
DEFAULT_MLFLOW_EXPERIMENT = "adfraud-retrain"

# Which runtime the DAG builds its stage tasks for: "local" or "kubernetes".
RUNTIME_ENV_VAR = "ADFRAUD_RUNTIME"
DEFAULT_RUNTIME = "local"

# Spark master for the ETL stage; local[*] on one machine, k8s://... on a cluster.
SPARK_MASTER_ENV_VAR = "ADFRAUD_SPARK_MASTER"
DEFAULT_SPARK_MASTER = "local[*]"

# Spark driver memory for local runs, in MiB.
SPARK_DRIVER_MEMORY_MB_ENV_VAR = "ADFRAUD_SPARK_DRIVER_MEMORY_MB"
DEFAULT_SPARK_DRIVER_MEMORY_MB = 2048

# Address of an existing Ray cluster for the tune stage ("" starts a local one).
RAY_ADDRESS_ENV_VAR = "RAY_ADDRESS"

# Where the serving side looks for its live model configuration.
SERVING_CONFIG_ENV_VAR = "ADFRAUD_SERVING_CONFIG"

# Variables handed to every stage process or pod, and nothing else from the worker's
# environment: the list is explicit so that a pod spec never picks up stray secrets.
POD_ENV_VARS = (
    HOME_ENV_VAR,
    MLFLOW_TRACKING_URI_ENV_VAR,
    MLFLOW_EXPERIMENT_ENV_VAR,
    SPARK_MASTER_ENV_VAR,
    SPARK_DRIVER_MEMORY_MB_ENV_VAR,
    RAY_ADDRESS_ENV_VAR,
    SERVING_CONFIG_ENV_VAR,
    "ADFRAUD_REDIS_URL",
    "ADFRAUD_SERVING_THRESHOLD",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def home() -> str:
    """The root URI of pipeline outputs, from ``ADFRAUD_HOME`` or the default."""
    value = os.environ.get(HOME_ENV_VAR, DEFAULT_HOME)
    if "://" in value:
        return value.rstrip("/")
    return str(Path(value).resolve())


def mlflow_tracking_uri() -> str:
    """The MLflow tracking URI: ``MLFLOW_TRACKING_URI`` or a SQLite store under home."""
    explicit = os.environ.get(MLFLOW_TRACKING_URI_ENV_VAR)
    if explicit:
        return explicit
    root = home()
    if "://" in root and not root.startswith("file://"):
        raise RuntimeError(
            f"{HOME_ENV_VAR}={root} is remote; set {MLFLOW_TRACKING_URI_ENV_VAR} to a tracking server"
        )
    root = root.removeprefix("file://")
    Path(root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def mlflow_experiment() -> str:
    """The MLflow experiment every stage logs to."""
    return os.environ.get(MLFLOW_EXPERIMENT_ENV_VAR, DEFAULT_MLFLOW_EXPERIMENT)


def xcom_path() -> str:
    """Where this stage's JSON result goes."""
    return os.environ.get(XCOM_PATH_ENV_VAR, DEFAULT_XCOM_PATH)
