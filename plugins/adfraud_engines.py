"""Distributed engines for the stages that outgrow one pod: Spark, Horovod, Ray.

Everything here builds plain dicts (Kubernetes manifests, pod arguments) from a stage's
declaration, so the DAG stays thin and the tests render it all without a cluster:

- **Spark (etl).** :func:`spark_stage` is :func:`adfraud_runtime.stage` plus what a
  client-mode driver pod needs: the pod's IP, name and namespace from the downward API,
  the driver ports, and the ``ADFRAUD_SPARK_*`` sizing (:mod:`jobs.common.spark` builds
  the Spark configuration). ``deploy/k8s/spark-*.yaml`` hold the driver's headless Service
  and RBAC. :func:`spark_application_manifest` is the same ETL as a Spark Operator
  ``SparkApplication``, for clusters that run Spark that way.
- **Horovod (train).** One node: one pod with N GPUs runs ``horovodrun -np N`` through
  ``jobs.train`` (:func:`horovod_single_node`). Several nodes: an ``MPIJob``
  (kubeflow.org/v2beta1, :func:`mpijob_manifest`) with one CPU-only launcher that runs
  ``horovodrun --gloo -np nodes*gpus --hostfile /etc/mpi/hostfile`` and one worker pod per
  node with all its GPUs, each serving sshd for the launcher.
- **Ray (tune).** The stage pod connects to a long-lived KubeRay ``RayCluster``
  (``deploy/k8s/raycluster.yaml``, ``RAY_ADDRESS=ray://...``), or the stage becomes a
  ``RayJob`` (ray.io/v1, :func:`rayjob_manifest`) running ``python -m jobs.tune ...``.

:class:`ClusterJobOperator` creates one such custom resource (MPIJob, RayJob or
SparkApplication), waits for its terminal state and returns the stage's JSON result,
which the job writes to ``--result-path`` in the object store because no XCom sidecar can
reach its pods. :func:`train_task` and :func:`tune_task` pick the engine from settings and
fall back to :func:`adfraud_runtime.stage` wherever one pod (or a local process) does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shlex
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any

from adfraud_runtime import (
    DEFAULT_NAMESPACE,
    DEFAULT_SERVICE_ACCOUNT,
    NAMESPACE_ENV_VAR,
    RUNTIME_KUBERNETES,
    SERVICE_ACCOUNT_ENV_VAR,
    Resources,
    StageSpec,
    image_for,
    runtime,
    stage,
    stage_env,
)
from airflow.sdk import BaseOperator

from jobs.common import settings
from jobs.common import spark as spark_settings

logger = logging.getLogger(__name__)

# ---- shared pod settings ----------------------------------------------------------------

# Runtime user and group of the stage images (images/*/Dockerfile).
RUNTIME_UID = 10001
PART_OF_LABEL = {"app.kubernetes.io/part-of": "adfraud"}
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
# Size of the in-memory /dev/shm of NCCL ranks and Ray nodes (the container default is 64 MiB).
SHM_SIZE_ENV_VAR = "ADFRAUD_SHM_SIZE"
DEFAULT_SHM_SIZE = "8Gi"

# ---- Spark ------------------------------------------------------------------------------

# The etl pod's labels (adfraud_runtime.kubernetes_operator) that the driver Service selects.
SPARK_DRIVER_STAGE = "etl"
SPARK_DRIVER_SERVICE = "adfraud-etl-driver"
SPARK_OPERATOR_API_VERSION = "sparkoperator.k8s.io/v1beta2"
# The pinned pyspark (constraints.txt); the Spark Operator records it on the application.
SPARK_VERSION = "4.3.0"

# ---- Horovod / MPI Operator -------------------------------------------------------------

MPI_API_VERSION = "kubeflow.org/v2beta1"
# Where the MPI Operator mounts the hostfile ("<worker> slots=<gpus>" per line, OpenMPI's
# format, which horovodrun --hostfile reads too).
MPI_HOSTFILE = "/etc/mpi/hostfile"
# sshd of the trainer image (images/trainer-gpu/Dockerfile): non-root, this port, this config.
SSH_PORT = 2222
SSH_DIR = "/home/adfraud/.ssh"
SSHD_CONFIG = "/etc/adfraud/sshd_config"
# Pod network interface that Gloo and NCCL use between nodes.
HOROVOD_NETWORK_INTERFACE_ENV_VAR = "ADFRAUD_HOROVOD_NETWORK_INTERFACE"
DEFAULT_HOROVOD_NETWORK_INTERFACE = "eth0"
# Shape of a training run on Kubernetes: nodes, and GPUs of each (np = nodes * GPUs).
TRAIN_NODES_ENV_VAR = "ADFRAUD_TRAIN_NODES"
DEFAULT_TRAIN_NODES = 1
TRAIN_GPUS_PER_NODE_ENV_VAR = "ADFRAUD_TRAIN_GPUS_PER_NODE"
DEFAULT_TRAIN_GPUS_PER_NODE = 1

# ---- Ray / KubeRay ----------------------------------------------------------------------

RAY_API_VERSION = "ray.io/v1"
# The pinned ray (constraints.txt): head, workers and the tune driver run the same version.
RAY_VERSION = "2.60.0"
# The long-lived cluster of deploy/k8s/raycluster.yaml; its head service is <name>-head-svc.
RAY_CLUSTER_NAME = "adfraud-ray"
RAY_CLIENT_PORT = 10001
RAY_DASHBOARD_PORT = 8265
RAY_GCS_PORT = 6379
# Ray's dashboard agent, which serves the raylet health endpoint on every node.
RAY_AGENT_PORT = 52365
# How the tune stage runs on Kubernetes: "pod" (one stage pod; a RayCluster when
# RAY_ADDRESS is set) or "rayjob" (a RayJob per run).
TUNE_ENGINE_ENV_VAR = "ADFRAUD_TUNE_ENGINE"
DEFAULT_TUNE_ENGINE = "pod"
TUNE_ENGINES = ("pod", "rayjob")
# With the "rayjob" engine: run on this existing RayCluster ("" = a new cluster per job).
RAY_CLUSTER_ENV_VAR = "ADFRAUD_RAY_CLUSTER"
# Workers of a per-job cluster.
RAY_WORKERS_ENV_VAR = "ADFRAUD_RAY_WORKERS"
DEFAULT_RAY_WORKERS = 2

# ---- ClusterJobOperator -----------------------------------------------------------------

PLURALS = {"MPIJob": "mpijobs", "RayJob": "rayjobs", "SparkApplication": "sparkapplications"}
DEFAULT_POLL_INTERVAL_S = 30
# Finished jobs (and their pods) stay this long for their logs, then their operator deletes them.
FINISHED_TTL_S = 3_600
RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"
# Kubernetes object names: DNS-1035 labels; short enough for the names operators derive.
JOB_NAME_MAX = 40


# ---- small builders ---------------------------------------------------------------------


def _env_list(env: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": k, "value": str(v)} for k, v in sorted(env.items())]


def _resources(cpu: str, memory: str, gpu: int = 0) -> dict:
    limits: dict[str, str] = {"cpu": cpu, "memory": memory}
    if gpu:
        limits[GPU_RESOURCE] = str(gpu)
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def _pod_security() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_UID,
        "runAsGroup": RUNTIME_UID,
        "fsGroup": RUNTIME_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _shm(size: str) -> tuple[dict, dict]:
    """An in-memory /dev/shm: the volume and its mount."""
    return (
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}},
        {"name": "dshm", "mountPath": "/dev/shm"},
    )


def _namespace() -> str:
    return os.environ.get(NAMESPACE_ENV_VAR, DEFAULT_NAMESPACE)


def _service_account() -> str:
    return os.environ.get(SERVICE_ACCOUNT_ENV_VAR, DEFAULT_SERVICE_ACCOUNT)


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not an integer") from exc
    if value < 1:
        raise ValueError(f"{name}={value} must be at least 1")
    return value


def _with_result_path(arguments: list[str], result_uri: str) -> list[str]:
    # argparse keeps the last occurrence of a flag, so appending overrides the DAG's value.
    return [*arguments, "--result-path", result_uri]


# ---- Spark ------------------------------------------------------------------------------


def spark_driver_env(dag_id: str = "{{ dag.dag_id }}", run_id: str = "{{ run_id }}") -> dict[str, str]:
    """Environment of a Spark driver stage, beside ``settings.POD_ENV_VARS`` (templated).

    The ``ADFRAUD_SPARK_*`` sizing variables set on the scheduler, the executor image (the
    DAG's jobs image unless ``ADFRAUD_SPARK_IMAGE`` is set) and the DAG run that labels
    the executor pods.
    """
    env = {name: os.environ[name] for name in spark_settings.SPARK_K8S_ENV_VARS if os.environ.get(name)}
    env.setdefault(spark_settings.IMAGE_ENV_VAR, image_for("jobs"))
    env[spark_settings.DAG_ID_ENV_VAR] = dag_id
    env[spark_settings.DAG_RUN_ID_ENV_VAR] = run_id
    return env


def spark_driver_pod_kwargs() -> dict[str, Any]:
    """KubernetesPodOperator arguments of a client-mode driver pod ({} for the local runtime).

    ``POD_IP``, ``POD_NAME`` and ``POD_NAMESPACE`` from the downward API (the driver's
    address, the owner of its executors, their namespace) and the named driver ports that
    ``deploy/k8s/spark-driver-service.yaml`` exposes.
    """
    if runtime() != RUNTIME_KUBERNETES:
        return {}
    from kubernetes.client import models as k8s

    fields = {
        spark_settings.POD_IP_ENV_VAR: "status.podIP",
        spark_settings.POD_NAME_ENV_VAR: "metadata.name",
        spark_settings.POD_NAMESPACE_ENV_VAR: "metadata.namespace",
    }
    envs = [
        k8s.V1EnvVar(
            name=name, value_from=k8s.V1EnvVarSource(field_ref=k8s.V1ObjectFieldSelector(field_path=path))
        )
        for name, path in fields.items()
    ]
    ports = [
        k8s.V1ContainerPort(name=name, container_port=port, protocol="TCP")
        for name, port in (
            ("spark-driver", spark_settings.DRIVER_PORT),
            ("spark-blockmgr", spark_settings.BLOCK_MANAGER_PORT),
            ("spark-ui", spark_settings.UI_PORT),
        )
    ]
    return {"pod_runtime_info_envs": envs, "ports": ports}


def spark_stage(spec: StageSpec, env: dict[str, str] | None = None, **kwargs):
    """A Spark stage whose driver runs in its pod (``ADFRAUD_SPARK_MASTER=k8s://...``).

    The same task as :func:`adfraud_runtime.stage`, with :func:`spark_driver_env` and
    :func:`spark_driver_pod_kwargs`; locally (or with ``local[*]``) these change nothing.

    :param spec: the stage (``etl``).
    :param env: extra environment variables for the stage.
    :param kwargs: passed to the operator (trigger_rule, retries ...).
    """
    return stage(spec, env={**spark_driver_env(), **(env or {})}, **spark_driver_pod_kwargs(), **kwargs)


def spark_application_manifest(
    name: str,
    arguments: list[str],
    env: dict[str, str],
    *,
    image: str,
    namespace: str,
    service_account: str,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    driver_cores: int = 1,
    driver_memory_mb: int = 4096,
    executors: int = spark_settings.DEFAULT_EXECUTOR_INSTANCES,
    executor_cores: int = spark_settings.DEFAULT_EXECUTOR_CORES,
    executor_memory_mb: int = spark_settings.DEFAULT_EXECUTOR_MEMORY_MB,
    module: str = "etl",
) -> dict:
    """The ``jobs.<module>`` stage as a Spark Operator ``SparkApplication`` (cluster mode).

    Needs Spark Operator 2.1 or later (``driver.template`` / ``executor.template``): the
    templates replace Spark's container entrypoint, which the jobs image lacks, with
    ``python -m jobs.common.spark driver|executor``. The driver runs with
    ``ADFRAUD_SPARK_MASTER=spark-submit``, so :func:`jobs.common.spark.session` keeps the
    operator's settings.

    :param name: object name.
    :param arguments: the stage's argv (rendered), including ``--result-path``.
    :param env: environment of driver and executors (no credentials: IRSA).
    :param image: the jobs image.
    :param namespace: where the application and its pods run.
    :param service_account: service account of driver and executors.
    :param labels: extra labels of the object and its pods.
    :param annotations: annotations of the object.
    :param driver_cores: driver cores.
    :param driver_memory_mb: driver heap, MiB.
    :param executors: executor pods.
    :param executor_cores: cores per executor.
    :param executor_memory_mb: heap per executor, MiB.
    :param module: the stage module under ``jobs``.
    """
    labels = {**PART_OF_LABEL, "adfraud/stage": module, **(labels or {})}
    pod_env = {**env, settings.SPARK_MASTER_ENV_VAR: spark_settings.SUBMITTED_MASTER}
    conf = spark_settings.s3a_conf(env)
    conf["spark.sql.session.timeZone"] = "UTC"
    executor_template = spark_settings.executor_pod_template({})
    driver_template = spark_settings.executor_pod_template({})
    driver_template["spec"]["containers"][0]["name"] = "spark-kubernetes-driver"
    # The driver talks to the API server to start its executors.
    driver_template["spec"].pop("automountServiceAccountToken")
    return {
        "apiVersion": SPARK_OPERATOR_API_VERSION,
        "kind": "SparkApplication",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations or {},
        },
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "mainApplicationFile": f"local:///opt/adfraud/jobs/{module}.py",
            "arguments": list(arguments),
            "sparkVersion": SPARK_VERSION,
            "sparkConf": conf,
            "restartPolicy": {"type": "Never"},
            "timeToLiveSeconds": FINISHED_TTL_S,
            "driver": {
                "cores": driver_cores,
                "memory": f"{driver_memory_mb}m",
                "serviceAccount": service_account,
                "labels": labels,
                "env": _env_list(pod_env),
                "template": {"metadata": {"labels": labels}, "spec": driver_template["spec"]},
            },
            "executor": {
                "instances": executors,
                "cores": executor_cores,
                "memory": f"{executor_memory_mb}m",
                "serviceAccount": service_account,
                "labels": {**labels, "app.kubernetes.io/component": "spark-executor"},
                "env": _env_list(env),
                "template": {"metadata": {"labels": labels}, "spec": executor_template["spec"]},
            },
        },
    }


# ---- Horovod ----------------------------------------------------------------------------


def horovod_train_arguments(arguments: list[str], np: int) -> list[str]:
    """``jobs.train``'s argv for ``np`` Horovod ranks (overrides the DAG's backend and workers)."""
    return [*arguments, "--backend", "horovod", "--workers", str(np)]


def horovodrun_argv(
    np: int,
    train_arguments: list[str],
    *,
    hostfile: str = MPI_HOSTFILE,
    network_interface: str = DEFAULT_HOROVOD_NETWORK_INTERFACE,
    ssh_port: int = SSH_PORT,
) -> list[str]:
    """The launcher's command: ``np`` ranks over the hosts of ``hostfile``, Gloo over ssh.

    Horovod is built with Gloo and NCCL and without MPI (images/trainer-gpu), so
    ``horovodrun --gloo`` starts the ranks itself over ssh (the MPI Operator's key pair and
    hostfile) instead of ``mpirun``; NCCL carries the gradients between the GPUs.
    """
    return [
        "horovodrun",
        "-np",
        str(np),
        "--hostfile",
        hostfile,
        "--gloo",
        "--network-interfaces",
        network_interface,
        "--ssh-port",
        str(ssh_port),
        "--ssh-identity-file",
        f"{SSH_DIR}/id_rsa",
        "--disable-cache",
        "python",
        "-m",
        "jobs.train",
        *horovod_train_arguments(train_arguments, np),
    ]


def horovod_single_node(spec: StageSpec, gpus: int) -> tuple[StageSpec, dict[str, Any]]:
    """One pod with ``gpus`` GPUs running ``horovodrun -np <gpus>`` (jobs.train launches it).

    Returns the stage with the GPU count and Horovod arguments, and the pod arguments
    (an in-memory /dev/shm for NCCL; nothing for the local runtime).
    """
    res = spec.resources
    one_pod = StageSpec(
        spec.name,
        horovod_train_arguments(spec.arguments, gpus),
        Resources(cpu=res.cpu, memory=res.memory, gpu=gpus, image=res.image, timeout_s=res.timeout_s),
        task_id=spec.task_id,
    )
    if runtime() != RUNTIME_KUBERNETES:
        return one_pod, {}
    from kubernetes.client import models as k8s

    size = os.environ.get(SHM_SIZE_ENV_VAR, DEFAULT_SHM_SIZE)
    kwargs = {
        "volumes": [
            k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=size))
        ],
        "volume_mounts": [k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
    }
    return one_pod, kwargs


def mpijob_manifest(
    name: str,
    arguments: list[str],
    env: dict[str, str],
    *,
    image: str,
    nodes: int,
    gpus_per_node: int,
    namespace: str,
    service_account: str,
    worker_cpu: str,
    worker_memory: str,
    launcher_cpu: str = "1",
    launcher_memory: str = "2Gi",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    timeout_s: int | None = None,
    network_interface: str = DEFAULT_HOROVOD_NETWORK_INTERFACE,
    shm_size: str = DEFAULT_SHM_SIZE,
) -> dict:
    """An MPIJob (kubeflow.org/v2beta1) training on ``nodes`` x ``gpus_per_node`` GPUs.

    One launcher (CPU only) runs :func:`horovodrun_argv` with ``np = nodes * gpus_per_node``;
    ``nodes`` workers, each with ``gpus_per_node`` GPUs and ``slotsPerWorker`` equal to it,
    run the trainer image's sshd until the launcher starts their ranks. The launcher is
    created once every worker's sshd is ready.

    :param name: object name (its pods are ``<name>-launcher``, ``<name>-worker-<i>``).
    :param arguments: ``jobs.train``'s argv (rendered), including ``--result-path``.
    :param env: environment of every pod; horovodrun forwards the launcher's to the ranks.
    :param image: the trainer-gpu image.
    :param nodes: worker pods, one per GPU node.
    :param gpus_per_node: GPUs of each worker (and Horovod ranks on it).
    :param namespace: where the job runs.
    :param service_account: service account of every pod (its IRSA role reaches S3).
    :param worker_cpu: CPU request and limit of a worker.
    :param worker_memory: memory request and limit of a worker.
    :param launcher_cpu: CPU of the launcher.
    :param launcher_memory: memory of the launcher.
    :param labels: extra labels of the object and its pods.
    :param annotations: annotations of the object.
    :param timeout_s: ``runPolicy.activeDeadlineSeconds``.
    :param network_interface: pod interface for Gloo and NCCL between nodes.
    :param shm_size: size of each worker's in-memory /dev/shm (NCCL).
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(
            f"an MPIJob needs at least one node and one GPU per node, got {nodes} x {gpus_per_node}"
        )
    np = nodes * gpus_per_node
    labels = {**PART_OF_LABEL, "adfraud/stage": "train", **(labels or {})}
    shm_volume, shm_mount = _shm(shm_size)
    launcher_env = {
        **env,
        "NCCL_SOCKET_IFNAME": network_interface,
        "GLOO_SOCKET_IFNAME": network_interface,
        # The CUDA base image sets NVIDIA_VISIBLE_DEVICES=all: the launcher asks for no GPU
        # and must not be handed every GPU of its node by the container runtime.
        "NVIDIA_VISIBLE_DEVICES": "void",
    }
    worker_env = {k: v for k, v in launcher_env.items() if k != "NVIDIA_VISIBLE_DEVICES"}
    run_policy: dict[str, Any] = {
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": FINISHED_TTL_S,
        "backoffLimit": 0,
    }
    if timeout_s:
        run_policy["activeDeadlineSeconds"] = int(timeout_s)
    return {
        "apiVersion": MPI_API_VERSION,
        "kind": "MPIJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations or {},
        },
        "spec": {
            "slotsPerWorker": gpus_per_node,
            "mpiImplementation": "OpenMPI",
            "sshAuthMountPath": SSH_DIR,
            "launcherCreationPolicy": "WaitForWorkersReady",
            "runPolicy": run_policy,
            "mpiReplicaSpecs": {
                "Launcher": {
                    "replicas": 1,
                    "restartPolicy": "Never",
                    "template": {
                        "metadata": {"labels": {**labels, "adfraud/role": "launcher"}},
                        "spec": {
                            "serviceAccountName": service_account,
                            "securityContext": _pod_security(),
                            "containers": [
                                {
                                    "name": "launcher",
                                    "image": image,
                                    "imagePullPolicy": "IfNotPresent",
                                    "command": horovodrun_argv(
                                        np, arguments, network_interface=network_interface
                                    ),
                                    "env": _env_list(launcher_env),
                                    "resources": _resources(launcher_cpu, launcher_memory),
                                    "securityContext": _container_security(),
                                }
                            ],
                        },
                    },
                },
                "Worker": {
                    "replicas": nodes,
                    "restartPolicy": "Never",
                    "template": {
                        "metadata": {"labels": {**labels, "adfraud/role": "worker"}},
                        "spec": {
                            "serviceAccountName": service_account,
                            "securityContext": _pod_security(),
                            "nodeSelector": dict(GPU_NODE_SELECTOR),
                            "tolerations": [dict(t) for t in GPU_TOLERATIONS],
                            "volumes": [shm_volume],
                            "containers": [
                                {
                                    "name": "worker",
                                    "image": image,
                                    "imagePullPolicy": "IfNotPresent",
                                    "command": ["/usr/sbin/sshd", "-D", "-e", "-f", SSHD_CONFIG],
                                    "env": _env_list(worker_env),
                                    "ports": [{"name": "ssh", "containerPort": SSH_PORT, "protocol": "TCP"}],
                                    "readinessProbe": {"tcpSocket": {"port": SSH_PORT}, "periodSeconds": 5},
                                    "resources": _resources(worker_cpu, worker_memory, gpus_per_node),
                                    "volumeMounts": [shm_mount],
                                    "securityContext": _container_security(),
                                }
                            ],
                        },
                    },
                },
            },
        },
    }


# ---- Ray --------------------------------------------------------------------------------


def _python_probe(*ports_paths: tuple[int, str]) -> dict:
    """An exec probe that GETs local Ray health endpoints with Python (the image has no wget)."""
    urls = [f"http://localhost:{port}{path}" for port, path in ports_paths]
    code = "import urllib.request as u; [u.urlopen(x, timeout=2) for x in " + json.dumps(urls) + "]"
    return {
        "exec": {"command": ["python", "-c", code]},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 12,
    }


def ray_cluster_spec(
    *,
    image: str,
    env: dict[str, str],
    service_account: str,
    workers: int,
    worker_cpu: str = "4",
    worker_memory: str = "16Gi",
    head_cpu: str = "2",
    head_memory: str = "8Gi",
    labels: dict[str, str] | None = None,
    shm_size: str = "4Gi",
) -> dict:
    """A RayCluster spec: a head that schedules no trials and ``workers`` CPU workers.

    :param image: the tuner image (same Ray and Python as the tune driver).
    :param env: environment of every Ray node (no credentials: IRSA).
    :param service_account: service account of every pod.
    :param workers: worker pods.
    :param worker_cpu: CPU of a worker (its Ray CPUs).
    :param worker_memory: memory of a worker.
    :param head_cpu: CPU of the head (GCS, dashboard, the tune driver).
    :param head_memory: memory of the head.
    :param labels: extra labels of the pods.
    :param shm_size: in-memory /dev/shm of each node (Ray's object store).
    """
    labels = {**PART_OF_LABEL, "adfraud/stage": "tune", **(labels or {})}
    env = {k: v for k, v in env.items() if k != settings.RAY_ADDRESS_ENV_VAR}
    shm_volume, shm_mount = _shm(shm_size)

    def pod(name: str, cpu: str, memory: str, ports: list[dict], probe: dict) -> dict:
        return {
            "metadata": {"labels": labels},
            "spec": {
                "serviceAccountName": service_account,
                "securityContext": _pod_security(),
                "volumes": [shm_volume],
                "containers": [
                    {
                        "name": name,
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "env": _env_list(env),
                        "ports": ports,
                        "resources": _resources(cpu, memory),
                        "readinessProbe": probe,
                        "livenessProbe": {**probe, "failureThreshold": 30},
                        "volumeMounts": [shm_mount],
                        "securityContext": _container_security(),
                    }
                ],
            },
        }

    head_ports = [
        {"name": "gcs-server", "containerPort": RAY_GCS_PORT},
        {"name": "dashboard", "containerPort": RAY_DASHBOARD_PORT},
        {"name": "client", "containerPort": RAY_CLIENT_PORT},
    ]
    return {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": {
            # num-cpus 0: trials run on the workers, the head keeps GCS and the driver.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": pod(
                "ray-head",
                head_cpu,
                head_memory,
                head_ports,
                _python_probe(
                    (RAY_AGENT_PORT, "/api/local_raylet_healthz"), (RAY_DASHBOARD_PORT, "/api/gcs_healthz")
                ),
            ),
        },
        "workerGroupSpecs": [
            {
                "groupName": "cpu",
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": workers,
                "rayStartParams": {},
                "template": pod(
                    "ray-worker",
                    worker_cpu,
                    worker_memory,
                    [],
                    _python_probe((RAY_AGENT_PORT, "/api/local_raylet_healthz")),
                ),
            }
        ],
    }


def tune_entrypoint(arguments: list[str]) -> str:
    """``python -m jobs.tune <arguments>`` as one shell-quoted command (RayJob.spec.entrypoint)."""
    return shlex.join(["python", "-m", "jobs.tune", *arguments])


def rayjob_manifest(
    name: str,
    arguments: list[str],
    env: dict[str, str],
    *,
    image: str,
    namespace: str,
    service_account: str,
    cluster: str | None = None,
    workers: int = DEFAULT_RAY_WORKERS,
    worker_cpu: str = "4",
    worker_memory: str = "16Gi",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    timeout_s: int | None = None,
) -> dict:
    """A RayJob (ray.io/v1) running ``python -m jobs.tune <arguments>`` as its entrypoint.

    With ``cluster`` it is submitted to that running RayCluster (``clusterSelector``);
    without, KubeRay creates a cluster for it (:func:`ray_cluster_spec`) and deletes it
    ``FINISHED_TTL_S`` after the job ends. Inside the job Ray sets ``RAY_ADDRESS``, so
    ``jobs.tune.start_ray`` joins the cluster.

    :param name: object name.
    :param arguments: ``jobs.tune``'s argv (rendered), including ``--result-path``.
    :param env: environment of the Ray nodes and of the submitter.
    :param image: the tuner image.
    :param namespace: where the job runs.
    :param service_account: service account of every pod.
    :param cluster: name of an existing RayCluster, or None for a cluster of its own.
    :param workers: workers of its own cluster.
    :param worker_cpu: CPU of each of those workers.
    :param worker_memory: memory of each of those workers.
    :param labels: extra labels of the object and its pods.
    :param annotations: annotations of the object.
    :param timeout_s: ``activeDeadlineSeconds``.
    """
    labels = {**PART_OF_LABEL, "adfraud/stage": "tune", **(labels or {})}
    env = {k: v for k, v in env.items() if k != settings.RAY_ADDRESS_ENV_VAR}
    spec: dict[str, Any] = {
        "entrypoint": tune_entrypoint(arguments),
        "submissionMode": "K8sJobMode",
        "backoffLimit": 0,
        "submitterPodTemplate": {
            "metadata": {"labels": labels},
            "spec": {
                "restartPolicy": "Never",
                "serviceAccountName": service_account,
                "securityContext": _pod_security(),
                "containers": [
                    {
                        "name": "ray-job-submitter",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "env": _env_list(env),
                        "resources": _resources("500m", "1Gi"),
                        "securityContext": _container_security(),
                    }
                ],
            },
        },
    }
    if timeout_s:
        spec["activeDeadlineSeconds"] = int(timeout_s)
    if cluster:
        spec["clusterSelector"] = {"ray.io/cluster": cluster}
    else:
        spec.update(
            shutdownAfterJobFinishes=True,
            ttlSecondsAfterFinished=FINISHED_TTL_S,
            rayClusterSpec=ray_cluster_spec(
                image=image,
                env=env,
                service_account=service_account,
                workers=workers,
                worker_cpu=worker_cpu,
                worker_memory=worker_memory,
                labels=labels,
            ),
        )
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations or {},
        },
        "spec": spec,
    }


# ---- job state and results --------------------------------------------------------------


def job_state(obj: dict) -> tuple[str, str]:
    """``(running | succeeded | failed, detail)`` of an MPIJob, RayJob or SparkApplication."""
    kind = obj.get("kind")
    status = obj.get("status") or {}
    if kind == "MPIJob":
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
        for kind_of_end, state in (("Failed", FAILED), ("Succeeded", SUCCEEDED)):
            if kind_of_end in conditions:
                c = conditions[kind_of_end]
                return state, f"{c.get('reason', kind_of_end)}: {c.get('message', '')}".strip(": ")
        return RUNNING, ", ".join(sorted(conditions)) or "pending"
    if kind == "RayJob":
        deployment = status.get("jobDeploymentStatus", "")
        job = status.get("jobStatus", "")
        detail = f"deployment {deployment or 'New'}, job {job or 'PENDING'}"
        if status.get("message"):
            detail += f": {status['message']}"
        if job in ("FAILED", "STOPPED") or deployment in ("Failed", "ValidationFailed"):
            return FAILED, detail
        if deployment == "Complete":
            return (SUCCEEDED if job == "SUCCEEDED" else FAILED), detail
        return RUNNING, detail
    if kind == "SparkApplication":
        app = status.get("applicationState") or {}
        state = app.get("state", "")
        detail = f"{state or 'NEW'}: {app.get('errorMessage', '')}".strip(": ")
        if state == "COMPLETED":
            return SUCCEEDED, detail
        if state in ("FAILED", "SUBMISSION_FAILED", "FAILING"):
            return FAILED, detail
        return RUNNING, detail
    raise ValueError(f"no state rule for kind {kind!r}: expected one of {', '.join(PLURALS)}")


def read_result(uri: str) -> dict:
    """The JSON a job wrote to ``--result-path``: an ``s3://`` object (boto3) or a local file."""
    if uri.startswith(("s3://", "s3a://")):
        import boto3

        bucket, _, key = uri.split("://", 1)[1].partition("/")
        body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        return json.loads(body)
    with open(uri.removeprefix("file://")) as handle:
        return json.load(handle)


def job_name(prefix: str, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
    """A DNS-1035 object name, the same for one task try (a restarted worker reattaches)."""
    digest = hashlib.sha1(f"{dag_id}/{run_id}/{task_id}".encode()).hexdigest()[:8]
    base = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")
    suffix = f"-{digest}-{try_number}"
    return f"{base[: JOB_NAME_MAX - len(suffix)].rstrip('-')}{suffix}"


class ClusterJobOperator(BaseOperator):
    """Creates one MPIJob, RayJob or SparkApplication, waits for its end, returns its result.

    At execution the builder gets the object's name (from the DAG run and try, so a
    restarted task finds its job again), the rendered arguments and environment, and
    labels/annotations that tie the job to the DAG run. The task then polls the object
    until :func:`job_state` is terminal: success returns the JSON the job wrote to
    ``result_uri`` (the same result as the stage's pod or process), failure raises with
    the job's own reason. Killing the task deletes the object; finished objects are removed
    by their operators after ``FINISHED_TTL_S``.

    TODO(engines): a deferrable trigger in place of polling in the worker, once the
    provider offers a generic custom-object trigger.

    :param kind: ``MPIJob``, ``RayJob`` or ``SparkApplication``.
    :param builder: ``builder(name=, arguments=, env=, labels=, annotations=) -> manifest``.
    :param name_prefix: first part of the object name.
    :param arguments: the stage's argv (templated).
    :param env_vars: environment of the job's pods (templated).
    :param result_uri: where the job writes its JSON result (templated).
    :param namespace: namespace of the object.
    :param kubernetes_conn_id: the Kubernetes connection (in-cluster by default).
    :param poll_interval_s: seconds between status reads.
    """

    template_fields = ("arguments", "env_vars", "result_uri")
    ui_color = "#e3ecfa"

    def __init__(
        self,
        *,
        kind: str,
        builder: Callable[..., dict],
        name_prefix: str,
        arguments: list[str],
        env_vars: dict[str, str],
        result_uri: str,
        namespace: str,
        kubernetes_conn_id: str = "kubernetes_default",
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if kind not in PLURALS:
            raise ValueError(f"kind {kind!r}: expected one of {', '.join(PLURALS)}")
        self.kind = kind
        self.builder = builder
        self.name_prefix = name_prefix
        self.arguments = arguments
        self.env_vars = env_vars
        self.result_uri = result_uri
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.poll_interval_s = poll_interval_s
        self.job_name: str | None = None

    @cached_property
    def hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=self.kubernetes_conn_id)

    def _api(self) -> tuple[str, str, str]:
        group, _, version = self.manifest_api_version().partition("/")
        return group, version, PLURALS[self.kind]

    def manifest_api_version(self) -> str:
        return {
            "MPIJob": MPI_API_VERSION,
            "RayJob": RAY_API_VERSION,
            "SparkApplication": SPARK_OPERATOR_API_VERSION,
        }[self.kind]

    def build(self, context: Any) -> dict:
        """The manifest for this task try (rendered arguments, DAG-run labels)."""
        ti = context["ti"]
        run_id = context["run_id"]
        dag_id = ti.dag_id
        name = job_name(self.name_prefix, dag_id, run_id, self.task_id, ti.try_number)
        labels = {
            "adfraud/dag-id": spark_settings.label_value(dag_id),
            "adfraud/dag-run-id": spark_settings.label_value(run_id),
        }
        annotations = {
            "adfraud/dag-id": dag_id,
            "adfraud/dag-run-id": run_id,
            "adfraud/task-id": self.task_id,
            "adfraud/try-number": str(ti.try_number),
        }
        arguments = _with_result_path([str(a) for a in self.arguments], self.result_uri)
        manifest = self.builder(
            name=name, arguments=arguments, env=dict(self.env_vars), labels=labels, annotations=annotations
        )
        if manifest.get("kind") != self.kind:
            raise ValueError(f"the builder made a {manifest.get('kind')}, not a {self.kind}")
        return manifest

    def execute(self, context: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        manifest = self.build(context)
        group, version, plural = self._api()
        self.job_name = manifest["metadata"]["name"]
        self.log.debug("manifest: %s", json.dumps(manifest))
        try:
            self.hook.create_custom_object(
                group=group, version=version, plural=plural, body=manifest, namespace=self.namespace
            )
            self.log.info("created %s %s/%s", self.kind, self.namespace, self.job_name)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.log.warning(
                "%s %s/%s exists already: waiting on it", self.kind, self.namespace, self.job_name
            )

        last = None
        while True:
            obj = self.hook.get_custom_object(
                group=group, version=version, plural=plural, name=self.job_name, namespace=self.namespace
            )
            state, detail = job_state(obj)
            if (state, detail) != last:
                self.log.info("%s %s: %s (%s)", self.kind, self.job_name, state, detail)
                last = (state, detail)
            if state == SUCCEEDED:
                break
            if state == FAILED:
                raise RuntimeError(f"{self.kind} {self.namespace}/{self.job_name} failed: {detail}")
            time.sleep(self.poll_interval_s)
        try:
            result = read_result(self.result_uri)
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"{self.kind} {self.job_name} succeeded but its result {self.result_uri} "
                f"could not be read: {exc}"
            ) from exc
        self.log.info("result of %s %s read from %s", self.kind, self.job_name, self.result_uri)
        return result

    def on_kill(self) -> None:
        if not self.job_name:
            return
        group, version, plural = self._api()
        self.log.info("deleting %s %s/%s", self.kind, self.namespace, self.job_name)
        self.hook.delete_custom_object(
            group=group, version=version, plural=plural, name=self.job_name, namespace=self.namespace
        )


# ---- what the DAG calls -----------------------------------------------------------------


def train_task(
    spec: StageSpec,
    *,
    result_uri: str,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    env: dict[str, str] | None = None,
    **kwargs,
):
    """The train stage on the engine its shape needs.

    - local runtime, or one node with one GPU: :func:`adfraud_runtime.stage` as declared;
    - one node with several GPUs: one pod, ``horovodrun -np <gpus>`` (:func:`horovod_single_node`);
    - several nodes: an MPIJob of ``nodes`` workers x ``gpus_per_node`` GPUs.

    :param spec: the train stage as the DAG declares it (its resources size each worker).
    :param result_uri: where the MPIJob's rank 0 writes the result (templated).
    :param nodes: GPU nodes (default ``ADFRAUD_TRAIN_NODES``, 1).
    :param gpus_per_node: GPUs per node (default ``ADFRAUD_TRAIN_GPUS_PER_NODE``, 1).
    :param env: extra environment variables for the stage.
    :param kwargs: passed to the operator (trigger_rule, retries ...).
    """
    nodes = nodes or _int_env(TRAIN_NODES_ENV_VAR, DEFAULT_TRAIN_NODES)
    gpus = gpus_per_node or _int_env(TRAIN_GPUS_PER_NODE_ENV_VAR, DEFAULT_TRAIN_GPUS_PER_NODE)
    if runtime() != RUNTIME_KUBERNETES or (nodes == 1 and gpus == 1):
        return stage(spec, env, **kwargs)
    if nodes == 1:
        one_pod, pod_kwargs = horovod_single_node(spec, gpus)
        return stage(one_pod, env, **pod_kwargs, **kwargs)
    res = spec.resources
    builder = functools.partial(
        mpijob_manifest,
        image=image_for(res.image),
        nodes=nodes,
        gpus_per_node=gpus,
        namespace=_namespace(),
        service_account=_service_account(),
        worker_cpu=res.cpu,
        worker_memory=res.memory,
        timeout_s=res.timeout_s,
        network_interface=os.environ.get(
            HOROVOD_NETWORK_INTERFACE_ENV_VAR, DEFAULT_HOROVOD_NETWORK_INTERFACE
        ),
        shm_size=os.environ.get(SHM_SIZE_ENV_VAR, DEFAULT_SHM_SIZE),
    )
    return _cluster_job("MPIJob", spec, builder, env, result_uri, **kwargs)


def _cluster_job(kind: str, spec: StageSpec, builder, env, result_uri: str, **kwargs) -> ClusterJobOperator:
    """The ClusterJobOperator that runs ``spec`` as a ``kind`` custom resource made by ``builder``."""
    from datetime import timedelta

    return ClusterJobOperator(
        task_id=spec.task_id or spec.name,
        kind=kind,
        builder=builder,
        name_prefix=f"adfraud-{spec.name}",
        arguments=spec.arguments,
        env_vars=stage_env(env),
        result_uri=result_uri,
        namespace=_namespace(),
        execution_timeout=timedelta(seconds=spec.resources.timeout_s),
        **kwargs,
    )


def tune_task(
    spec: StageSpec,
    *,
    result_uri: str,
    engine: str | None = None,
    cluster: str | None = None,
    env: dict[str, str] | None = None,
    **kwargs,
):
    """The tune stage as a pod (or process) or as a KubeRay RayJob.

    :param spec: the tune stage as the DAG declares it.
    :param result_uri: where the RayJob's entrypoint writes the result (templated).
    :param engine: ``pod`` or ``rayjob`` (default ``ADFRAUD_TUNE_ENGINE``, ``pod``); the
        local runtime always runs a process.
    :param cluster: RayCluster of the RayJob (default ``ADFRAUD_RAY_CLUSTER``; empty: its own).
    :param env: extra environment variables for the stage.
    :param kwargs: passed to the operator (trigger_rule, retries ...).
    """
    engine = (engine or os.environ.get(TUNE_ENGINE_ENV_VAR, DEFAULT_TUNE_ENGINE)).strip().lower()
    if engine not in TUNE_ENGINES:
        raise ValueError(f"{TUNE_ENGINE_ENV_VAR}={engine!r}: expected one of {', '.join(TUNE_ENGINES)}")
    if runtime() != RUNTIME_KUBERNETES or engine == "pod":
        return stage(spec, env, **kwargs)
    res = spec.resources
    cluster = cluster if cluster is not None else os.environ.get(RAY_CLUSTER_ENV_VAR) or None
    builder = functools.partial(
        rayjob_manifest,
        image=image_for(res.image),
        namespace=_namespace(),
        service_account=_service_account(),
        cluster=cluster,
        workers=_int_env(RAY_WORKERS_ENV_VAR, DEFAULT_RAY_WORKERS),
        worker_cpu=res.cpu,
        worker_memory=res.memory,
        timeout_s=res.timeout_s,
    )
    return _cluster_job("RayJob", spec, builder, env, result_uri, **kwargs)
