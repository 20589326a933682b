"""The runtime switch: one stage definition, run as a pod or as a local process.

:func:`stage` turns a stage (its name, argv and resources) into either a
``KubernetesPodOperator`` that runs ``python -m jobs.<stage> <argv>`` in the stage's
image, or a :class:`LocalStageOperator` that runs the same argv as a subprocess of the
worker. Both hand the stage the same environment variables
(:data:`jobs.common.settings.POD_ENV_VARS`) and collect its JSON result the same way:
the stage writes ``$ADFRAUD_XCOM_PATH`` (in a pod, the path the XCom sidecar reads) and
the result becomes the task's XCom.

The runtime is chosen by ``ADFRAUD_RUNTIME`` (``local``, the default, or
``kubernetes``), read when the DAG file is parsed.

:class:`ReviewOperator` is the human review between the promotion gate and the
``promote`` stage: Airflow's HITL approval, which a policy may answer instead of a person.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk import Asset, BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from jobs import promote
from jobs.common import settings

logger = logging.getLogger(__name__)

RUNTIME_LOCAL = "local"
RUNTIME_KUBERNETES = "kubernetes"
RUNTIMES = (RUNTIME_LOCAL, RUNTIME_KUBERNETES)

# Image registry and tag for stage pods; images/<role>/Dockerfile builds each role.
IMAGE_REGISTRY_ENV_VAR = "ADFRAUD_IMAGE_REGISTRY"
DEFAULT_IMAGE_REGISTRY = "ghcr.io/adfraud"
IMAGE_TAG_ENV_VAR = "ADFRAUD_IMAGE_TAG"
DEFAULT_IMAGE_TAG = "0.1.0"

# Kubernetes namespace and service account of stage pods. The service account carries
# the cloud role (IRSA annotation); no static keys go into pod specs.
NAMESPACE_ENV_VAR = "ADFRAUD_K8S_NAMESPACE"
DEFAULT_NAMESPACE = "adfraud"
SERVICE_ACCOUNT_ENV_VAR = "ADFRAUD_K8S_SERVICE_ACCOUNT"
DEFAULT_SERVICE_ACCOUNT = "adfraud-jobs"

# The asset adfraud_drift updates when the newest events drifted past its threshold;
# adfraud_retrain is scheduled on it (or nightly). Each event's extra carries
# drift_share, report_uri, report_json_uri, mlflow_run_id, dataset and events_uri.
DRIFT_ASSET = Asset(name="adfraud_drift", uri="adfraud://drift/detected")

# Lines of a failed local stage's output repeated in the task's error.
ERROR_TAIL_LINES = 25

# Host variables a local stage process needs to run at all, beside POD_ENV_VARS.
LOCAL_PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "JAVA_HOME", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH",
                         "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "SPARK_LOCAL_IP", "GLOO_SOCKET_IFNAME")


@dataclass(frozen=True)
class Resources:
    """What a stage asks of the cluster.

    :param cpu: CPU request and limit, in Kubernetes quantity notation.
    :param memory: memory request and limit, e.g. ``"4Gi"``.
    :param gpu: NVIDIA GPUs; > 0 adds a GPU limit, a GPU node selector and toleration.
    :param image: image role under ``images/`` (``jobs``, ``tuner``, ``trainer-gpu`` ...).
    :param timeout_s: the task's execution timeout, in seconds.
    """

    cpu: str = "1"
    memory: str = "2Gi"
    gpu: int = 0
    image: str = "jobs"
    timeout_s: int = 3_600


@dataclass
class StageSpec:
    """A stage as the DAG declares it: the same for every runtime.

    :param name: the stage module under ``jobs`` (``python -m jobs.<name>``).
    :param arguments: argv after the module; Jinja templates allowed.
    :param resources: what it asks of the cluster.
    :param task_id: the Airflow task id (default: ``name``).
    """

    name: str
    arguments: list[str]
    resources: Resources = field(default_factory=Resources)
    task_id: str | None = None


def runtime() -> str:
    """The configured runtime; a clear error for an unknown one."""
    value = os.environ.get(settings.RUNTIME_ENV_VAR, settings.DEFAULT_RUNTIME).strip().lower()
    if value not in RUNTIMES:
        raise ValueError(f"{settings.RUNTIME_ENV_VAR}={value!r}: expected one of {', '.join(RUNTIMES)}")
    return value


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment handed to every stage: exactly the variables in POD_ENV_VARS that are set."""
    env = {name: os.environ[name] for name in settings.POD_ENV_VARS if os.environ.get(name)}
    env.update(extra or {})
    return env


def image_for(role: str) -> str:
    registry = os.environ.get(IMAGE_REGISTRY_ENV_VAR, DEFAULT_IMAGE_REGISTRY).rstrip("/")
    tag = os.environ.get(IMAGE_TAG_ENV_VAR, DEFAULT_IMAGE_TAG)
    return f"{registry}/adfraud-{role}:{tag}"


class LocalStageOperator(BaseOperator):
    """Runs ``python -m jobs.<stage> <arguments>`` as a subprocess and pushes its result.

    The subprocess gets the same environment variables a stage pod would, plus what a
    process needs on this host (PATH, JAVA_HOME ...), and ``ADFRAUD_XCOM_PATH`` pointing
    at a fresh temporary file whose JSON becomes this task's return value.

    :param stage: stage module name under ``jobs``.
    :param arguments: argv after the module (templated).
    :param env_vars: environment variables for the stage (templated).
    """

    template_fields = ("arguments", "env_vars")
    ui_color = "#e8f4ea"

    def __init__(self, *, stage: str, arguments: list[str], env_vars: dict[str, str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.stage = stage
        self.arguments = arguments
        self.env_vars = env_vars or {}

    def execute(self, context: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix=f"adfraud-{self.stage}-") as tmp:
            xcom_path = os.path.join(tmp, "return.json")
            env = {k: os.environ[k] for k in LOCAL_PASSTHROUGH_ENV if k in os.environ}
            env.update(self.env_vars)
            env[settings.XCOM_PATH_ENV_VAR] = xcom_path
            env.setdefault("PYTHONUNBUFFERED", "1")
            cmd = [sys.executable, "-m", f"jobs.{self.stage}", *[str(a) for a in self.arguments]]
            self.log.info("running %s", " ".join(cmd))
            tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
            with subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            ) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    line = line.rstrip()
                    tail.append(line)
                    self.log.info("%s", line)
                code = proc.wait()
            if code != 0:
                raise RuntimeError(
                    f"stage {self.stage} exited with {code}; last lines:\n" + "\n".join(tail)
                )
            if not os.path.exists(xcom_path):
                raise RuntimeError(f"stage {self.stage} succeeded but wrote no result to {xcom_path}")
            with open(xcom_path) as handle:
                return json.load(handle)


def kubernetes_operator(spec: StageSpec, env: dict[str, str], **kwargs):
    """The stage as a KubernetesPodOperator (imported only for this runtime)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    res = spec.resources
    limits = {"cpu": res.cpu, "memory": res.memory}
    if res.gpu:
        limits["nvidia.com/gpu"] = str(res.gpu)
    gpu_scheduling: dict[str, Any] = {}
    if res.gpu:
        gpu_scheduling = {
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        }
    return KubernetesPodOperator(
        task_id=spec.task_id or spec.name,
        name=f"adfraud-{spec.name}",
        namespace=os.environ.get(NAMESPACE_ENV_VAR, DEFAULT_NAMESPACE),
        image=image_for(res.image),
        cmds=["python", "-m", f"jobs.{spec.name}"],
        arguments=spec.arguments,
        env_vars={**env, settings.XCOM_PATH_ENV_VAR: settings.DEFAULT_XCOM_PATH},
        container_resources=k8s.V1ResourceRequirements(requests={"cpu": res.cpu, "memory": res.memory},
                                                       limits=limits),
        service_account_name=os.environ.get(SERVICE_ACCOUNT_ENV_VAR, DEFAULT_SERVICE_ACCOUNT),
        security_context=k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=10001, fs_group=10001,
                                                  seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        container_security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False, read_only_root_filesystem=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
        labels={"app.kubernetes.io/part-of": "adfraud", "adfraud/stage": spec.name},
        do_xcom_push=True,
        get_logs=True,
        reattach_on_restart=True,
        on_finish_action="delete_pod",
        startup_timeout_seconds=600,
        image_pull_policy="IfNotPresent",
        execution_timeout=_timedelta(res.timeout_s),
        **gpu_scheduling,
        **kwargs,
    )


def _timedelta(seconds: int):
    from datetime import timedelta

    return timedelta(seconds=seconds)


def stage(spec: StageSpec, env: dict[str, str] | None = None, **kwargs):
    """The Airflow task for ``spec`` in the configured runtime.

    :param spec: the stage.
    :param env: extra environment variables for the stage (beside POD_ENV_VARS).
    :param kwargs: passed to the operator (trigger_rule, retries ...).
    """
    env = stage_env(env)
    if runtime() == RUNTIME_KUBERNETES:
        return kubernetes_operator(spec, env, **kwargs)
    return LocalStageOperator(
        task_id=spec.task_id or spec.name,
        stage=spec.name,
        arguments=spec.arguments,
        env_vars=env,
        execution_timeout=_timedelta(spec.resources.timeout_s),
        **kwargs,
    )


def _truthy(value: Any) -> bool:
    """A rendered template flag ("True", "true", "1" ...) as a bool."""
    return str(value).strip().lower() in ("true", "1", "yes", "on")


class ReviewOperator(ApprovalOperator):
    """Asks a person to approve or reject a registered challenger, in the Airflow UI.

    The task waits (state ``awaiting_input``) until someone answers in the UI's Required
    Actions or through the REST API (``hitlDetails``), unless ``auto_approve`` renders
    true: then it approves at once and says so. It skips itself, and the promotion after
    it, when ``gate_passed`` renders false. Unlike the plain ApprovalOperator, a
    rejection does not skip downstream tasks: the ``promote`` stage records it.

    Returns ``decision`` (``approve`` | ``reject``), ``reviewer``, ``reviewed_at`` (ISO 8601
    UTC) and ``auto_approved``.

    :param gate_passed: whether the challenger passed its promotion gate (templated).
    :param auto_approve: approve without asking when true (templated).
    :param kwargs: passed to ApprovalOperator (subject, body, response_timeout ...).
    """

    template_fields = (*ApprovalOperator.template_fields, "gate_passed", "auto_approve")
    ui_color = "#fdf1d6"

    def __init__(self, *, gate_passed: str, auto_approve: str = "false", **kwargs):
        super().__init__(**kwargs)
        self.gate_passed = gate_passed
        self.auto_approve = auto_approve

    def execute(self, context: Any) -> Any:
        if not _truthy(self.gate_passed):
            raise AirflowSkipException("the challenger failed its promotion gate: nothing to review")
        if _truthy(self.auto_approve):
            from airflow.sdk.timezone import utcnow

            self.log.info("auto_approve is on: approving without a reviewer (%s)", self.subject)
            return {"decision": promote.APPROVE, "reviewer": promote.AUTO_REVIEWER,
                    "reviewed_at": utcnow().isoformat(), "auto_approved": True, "chosen_options": [self.APPROVE]}
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        # HITLOperator's checks and bookkeeping, without ApprovalOperator's skip on Reject.
        payload = HITLOperator.execute_complete(self, context=context, event=event)
        chosen = payload["chosen_options"][0]
        user = payload.get("responded_by_user") or {}
        reviewer = user.get("name") or user.get("id") or ("timeout" if event.get("timedout") else "unknown")
        responded_at = payload.get("responded_at")
        decision = promote.APPROVE if chosen == self.APPROVE else promote.REJECT
        self.log.info("review answered: %s by %s", chosen, reviewer)
        return {"decision": decision, "reviewer": reviewer,
                "reviewed_at": responded_at.isoformat() if responded_at else "",
                "auto_approved": False, "chosen_options": list(payload["chosen_options"])}
