"""The serving chart, rendered and linted with Helm's own engine, and the values files for
the Airflow and MLflow charts.

charts/adfraud-serving is rendered offline by helm-python-sdk (Helm's Go SDK, no helm
binary, no cluster) once per values case for the whole module, and every rendered object
is validated against the Kubernetes OpenAPI schemas of kubernetes-validate. The
Prometheus Operator kinds have no schema there; they are checked against the small
schemas below, which hold only what the operator requires of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="pip install -r requirements-dev.txt")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -r requirements-dev.txt")

from jobs.common import settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "adfraud-serving"
VALUES_DIR = ROOT / "charts" / "values"
RELEASE = "adfraud-serving"
NAMESPACE = "adfraud"
FULLNAME = "adfraud-serving"

# Kubernetes versions the rendered objects must validate against: the chart's kubeVersion
# floor and the newest schema kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
CRD_API_GROUP = "monitoring.coreos.com/"

# Everything optional switched on, to render every template.
ALL_FEATURES = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True},
    "dashboards": {"enabled": True},
    "modelConfig": {
        "configMap": {"enabled": True, "content": {"model_name": "adfraud-synthetic", "version": 3}},
    },
    "autoscaling": {"targetMemoryUtilizationPercentage": 80, "requestsPerSecond": {"enabled": True}},
    "redis": {"existingSecret": {"name": "adfraud-redis", "key": "url"}},
    "extraEnv": [{"name": "ADFRAUD_EXTRA", "value": "1"}],
    "serving": {"warmupUri": "s3://adfraud-prod/adfraud/serving/warmup.parquet", "accessLog": True},
    "networkPolicy": {"extraEgress": [{"to": [{"podSelector": {"matchLabels": {"app": "redis"}}}],
                                       "ports": [{"port": 6379, "protocol": "TCP"}]}]},
}


def load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def merge(base: dict, override: dict) -> dict:
    """Helm's coalescing of -f files: maps merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


PRODUCTION = load_yaml(CHART / "values-production.yaml")
TENSORRT = merge(PRODUCTION, load_yaml(CHART / "values-tensorrt.yaml"))
CASES = {
    "default": {},
    "production": PRODUCTION,
    "production-tensorrt": TENSORRT,
    "all-features": ALL_FEATURES,
}


# ---- rendering, once per module -------------------------------------------------------------

@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, dict[str, Any]]:
    """Per values case: the rendered manifests' text and objects keyed by (kind, name)."""
    out = {}
    for case, values in CASES.items():
        manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        objects = {}
        for path, text in manifests.items():
            if not path.endswith(".yaml"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    objects[(doc["kind"], doc["metadata"]["name"])] = doc
        out[case] = {"text": "\n".join(manifests.values()), "objects": objects, "paths": set(manifests)}
    return out


def obj(rendered, case: str, kind: str, name: str = FULLNAME) -> dict[str, Any]:
    objects = rendered[case]["objects"]
    assert (kind, name) in objects, f"{case}: no {kind}/{name} in {sorted(objects)}"
    return objects[(kind, name)]


def container(rendered, case: str) -> dict[str, Any]:
    containers = obj(rendered, case, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["serving"]
    return containers[0]


def env_of(ctr: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in ctr.get("env", [])}


# ---- lint, schema, layout -------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_lint_is_clean(case):
    """helm lint --strict finds nothing worse than info (the chart icon) for any values case."""
    report = helm.lint(str(CHART), CASES[case], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_values_files_pass_the_schema(chart, case):
    chart.validate_schema(CASES[case])


@pytest.mark.parametrize(
    "values",
    [
        {"serving": {"backend": "torch"}},
        {"autoscalling": {"enabled": True}},
        {"extraEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]},
        {"podSecurityContext": {"runAsNonRoot": False}},
        {"probes": {"readiness": {"path": "ready"}}},
        {"prometheusRule": {"fraudRate": {"max": 2}}},
    ],
    ids=[
        "unknown-backend",
        "typo-key",
        "static-aws-key",
        "root-pods",
        "relative-probe-path",
        "ratio-above-one",
    ],
)
def test_schema_rejects_bad_values(chart, values):
    with pytest.raises(helm.HelmError):
        chart.validate_schema(values)


def closed_objects(schema: dict, prefix: str = "") -> dict[str, set[str]]:
    """Dotted path ("" for the root) of every closed schema object -> the keys it declares."""
    out = {}
    if schema.get("additionalProperties") is False:
        out[prefix.rstrip(".")] = set(schema.get("properties", {}))
        for name, sub in schema.get("properties", {}).items():
            out |= closed_objects(sub, f"{prefix}{name}.")
    return out


def value_objects(values: dict, prefix: str = "") -> dict[str, set[str]]:
    """Dotted path of every mapping in a values file -> its keys."""
    out = {prefix.rstrip("."): set(values)}
    for name, value in values.items():
        if isinstance(value, dict):
            out |= value_objects(value, f"{prefix}{name}.")
    return out


def test_schema_and_values_declare_the_same_keys():
    """values.schema.json is kept in step: no schema-only (stale) key, no untyped value."""
    schema = closed_objects(json.loads((CHART / "values.schema.json").read_text()))
    defaults = value_objects(load_yaml(CHART / "values.yaml"))
    for path, declared in schema.items():
        present = defaults.get(path, set())
        assert declared - present - {"global"} == set(), f"{path or '<root>'}: in the schema only"
        assert present - declared == set(), f"{path or '<root>'}: in values.yaml only"


def uncommented_keys(path: Path, schema: dict) -> list[str]:
    """Keys of closed schema objects without a comment line right above them."""
    missing, stack, previous = [], [], ""
    for line in path.read_text().splitlines():
        match = re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):", line)
        if match and not line.lstrip().startswith("-"):
            indent, key = len(match.group(1)), match.group(2)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            parent = stack[-1][2] if stack else schema
            closed = parent is not None and parent.get("additionalProperties") is False
            if closed and not previous.lstrip().startswith("#"):
                missing.append(".".join([s[1] for s in stack] + [key]))
            child = parent.get("properties", {}).get(key) if parent else None
            stack.append((indent, key, child))
        if line.strip():
            previous = line
    return missing


@pytest.mark.parametrize("name", ["values.yaml", "values-production.yaml", "values-tensorrt.yaml"])
def test_every_value_is_commented(name):
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert uncommented_keys(CHART / name, schema) == []


def test_templates_follow_the_layout():
    """templates/<component>/<component>-<kind>.yaml, and only <chart>.<name> helpers."""
    templates = sorted(p.relative_to(CHART / "templates") for p in (CHART / "templates").rglob("*.yaml"))
    assert templates, "no templates"
    for rel in templates:
        assert len(rel.parts) == 2 and rel.name.startswith(f"{rel.parts[0]}-"), rel
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    defined = set(re.findall(r'define "([^"]+)"', helpers))
    assert defined and all(name.startswith("adfraud-serving.") for name in defined), defined
    used = set()
    for path in (CHART / "templates").rglob("*"):
        if path.is_file():
            used |= set(re.findall(r'include "([^"]+)"', path.read_text()))
    assert used <= defined, used - defined


def test_chart_packages(tmp_path):
    archive = helm.package(str(CHART), destination=str(tmp_path), version="9.9.9", app_version="9.9.9")
    assert Path(archive).name == "adfraud-serving-9.9.9.tgz"
    with helm.Chart.load(archive) as packaged:
        assert packaged.metadata["appVersion"] == "9.9.9"
        assert {f["name"] for f in packaged.files} >= {"files/dashboards/adfraud-serving.json"}


# ---- Kubernetes schemas -----------------------------------------------------------------------

# What the Prometheus Operator requires of the two custom resources (and what we rely on).
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
DURATION = {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}
ENDPOINT_SCHEMA = {
    "type": "object",
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string", "pattern": "^/"},
        "interval": DURATION,
    },
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "endpoints": {"type": "array", "minItems": 1, "items": ENDPOINT_SCHEMA},
            },
        },
    },
}
RULE_SCHEMA = {
    "type": "object",
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "expr": {"type": "string", "minLength": 1},
        "for": DURATION,
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}
GROUP_SCHEMA = {
    "type": "object",
    "required": ["name", "rules"],
    "properties": {"rules": {"type": "array", "minItems": 1, "items": RULE_SCHEMA}},
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "required": ["groups"],
            "properties": {"groups": {"type": "array", "minItems": 1, "items": GROUP_SCHEMA}},
        },
    },
}
CRD_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA, "PrometheusRule": PROMETHEUS_RULE_SCHEMA}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_objects_match_kubernetes_schemas(rendered, case, kube_version):
    objects = rendered[case]["objects"]
    assert objects
    for (kind, _name), doc in objects.items():
        if doc["apiVersion"].startswith(CRD_API_GROUP):
            jsonschema.validate(doc, CRD_SCHEMAS[kind])
        else:
            kubernetes_validate.validate(doc, kube_version, strict=True)


def test_kubernetes_validation_catches_a_bad_object(rendered):
    """The validator is live: a misspelt probe field fails."""
    bad = json.loads(json.dumps(obj(rendered, "default", "Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/ready"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[-1], strict=True)


# ---- the rendered objects --------------------------------------------------------------------

def test_default_render_has_the_core_objects(rendered):
    kinds = {kind for kind, _ in rendered["default"]["objects"]}
    assert kinds == {"Deployment", "Service", "ServiceAccount", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "NetworkPolicy"}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_probes_and_port(rendered, case):
    ctr = container(rendered, case)
    assert ctr["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert ctr["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert ctr["command"] == ["python", "-m", "jobs.serve"]
    assert ctr["args"][ctr["args"].index("--port") + 1] == "8080"
    # The server binds loopback by default, where neither kubelet nor the Service reach it.
    assert ctr["args"][ctr["args"].index("--host") + 1] == "0.0.0.0"


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_pods_run_locked_down(rendered, case):
    pod = obj(rendered, case, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container(rendered, case)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs writable scratch space.
    mounts = {m["mountPath"] for m in container(rendered, case)["volumeMounts"]}
    assert {"/tmp", "/data"} <= mounts


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_no_static_cloud_credentials(rendered, case):
    text = rendered[case]["text"]
    for needle in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        assert needle not in text


def test_scrape_annotations_and_resources(rendered):
    template = obj(rendered, "default", "Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
    resources = container(rendered, "default")["resources"]
    assert resources["requests"] == {"cpu": "500m", "memory": "512Mi"}
    assert resources["limits"]["memory"] == "1Gi"


def test_model_config_from_env_and_uri(rendered):
    ctr = container(rendered, "production")
    env = env_of(ctr)
    uri = "s3://adfraud-prod/adfraud/serving/current.json"
    assert env[settings.SERVING_CONFIG_ENV_VAR] == uri
    assert ctr["args"][:2] == ["--config", uri]
    assert env["ADFRAUD_SERVING_BACKEND"] == "onnxruntime"
    assert env["AWS_REGION"] == "eu-west-1"


def test_model_config_from_configmap(rendered):
    ctr = container(rendered, "all-features")
    path = "/etc/adfraud/serving/current.json"
    assert env_of(ctr)[settings.SERVING_CONFIG_ENV_VAR] == path
    assert ctr["args"][:2] == ["--config", path]
    assert ctr["args"][-3:] == ["--access-log", "--warmup", "s3://adfraud-prod/adfraud/serving/warmup.parquet"]
    mount = {"name": "serving-config", "mountPath": "/etc/adfraud/serving", "readOnly": True}
    assert mount in ctr["volumeMounts"]
    config = obj(rendered, "all-features", "ConfigMap", f"{FULLNAME}-config")
    assert json.loads(config["data"]["current.json"]) == {"model_name": "adfraud-synthetic", "version": 3}
    annotations = obj(rendered, "all-features", "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/serving-config"])


def test_redis_url_from_a_secret(rendered):
    env = env_of(container(rendered, "all-features"))
    assert env["ADFRAUD_REDIS_URL"] == {"secretKeyRef": {"name": "adfraud-redis", "key": "url"}}
    assert env["ADFRAUD_EXTRA"] == "1"


def test_server_settings_reach_the_environment(rendered):
    """The variables jobs.serve and jobs.online_features read, and only set ones."""
    default = env_of(container(rendered, "default"))
    assert {k: default[k] for k in ("ADFRAUD_SERVING_THREADS", "ADFRAUD_SERVING_POLL_S",
                                    "ADFRAUD_SERVING_MAX_EVENTS", "ADFRAUD_SERVING_MAX_BODY_KB")} == {
        "ADFRAUD_SERVING_THREADS": "1", "ADFRAUD_SERVING_POLL_S": "30",
        "ADFRAUD_SERVING_MAX_EVENTS": "1024", "ADFRAUD_SERVING_MAX_BODY_KB": "1024"}
    for unset in ("ADFRAUD_SERVING_THRESHOLD", "ADFRAUD_ONLINE_STATE_TTL_S", "ADFRAUD_ONLINE_LATENESS_S",
                  "ADFRAUD_SERVING_ADMIN_TOKEN", "ADFRAUD_SERVING_TRT_MAX_BATCH", "ADFRAUD_REDIS_URL"):
        assert unset not in default, unset
    production = env_of(container(rendered, "production"))
    assert production["ADFRAUD_REDIS_URL"] == {"secretKeyRef": {"name": "adfraud-redis", "key": "url"}}
    assert production["ADFRAUD_ONLINE_STATE_TTL_S"] == "691200"
    assert production["ADFRAUD_SERVING_ADMIN_TOKEN"] == {
        "secretKeyRef": {"name": "adfraud-serving-admin", "key": "token"}}
    tensorrt = env_of(container(rendered, "production-tensorrt"))
    batches = (tensorrt["ADFRAUD_SERVING_TRT_MAX_BATCH"], tensorrt["ADFRAUD_SERVING_TRT_OPT_BATCH"])
    assert batches == ("4096", "256")


def test_notes_warn_about_per_pod_feature_state(chart):
    """Several replicas without Redis compute features from partial traffic: NOTES say so."""
    def notes(values):
        manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        return manifests["adfraud-serving/templates/NOTES.txt"]

    assert "WARNING: up to 10 replicas" in notes({})
    assert "WARNING" not in notes(PRODUCTION)
    assert "WARNING" not in notes({"autoscaling": {"enabled": False}, "replicaCount": 1})


@pytest.mark.parametrize(
    ("case", "low", "high"),
    [("default", 2, 10), ("production", 3, 20), ("production-tensorrt", 2, 6)],
    ids=["default", "production", "tensorrt"],
)
def test_hpa_bounds(rendered, case, low, high):
    hpa = obj(rendered, case, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (low, high)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert "replicas" not in obj(rendered, case, "Deployment")["spec"], "the HPA owns the replica count"


def test_hpa_optional_metrics(rendered):
    metrics = obj(rendered, "all-features", "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m.get("resource", {}).get("name") or m["pods"]["metric"]["name"] for m in metrics] == [
        "cpu", "memory", "adfraud_serving_requests_per_second"]


@pytest.mark.parametrize(("case", "min_available"), [("default", 1), ("production", 2)])
def test_pdb(rendered, case, min_available):
    pdb = obj(rendered, case, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == min_available
    pods = obj(rendered, case, "Deployment")["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == pods


def test_network_policy(rendered):
    default = obj(rendered, "default", "NetworkPolicy")["spec"]
    assert default["policyTypes"] == ["Ingress", "Egress"]
    assert default["ingress"][0]["from"] == [{"podSelector": {}}]
    assert {p["port"] for rule in default["egress"] for p in rule["ports"]} == {53, 443}
    production = obj(rendered, "production", "NetworkPolicy")["spec"]
    assert production["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ad-gateway"}}}]
    extra = obj(rendered, "all-features", "NetworkPolicy")["spec"]["egress"]
    assert {"port": 6379, "protocol": "TCP"} in extra[-1]["ports"]


def test_service_and_service_account(rendered):
    service = obj(rendered, "default", "Service")["spec"]
    assert service["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert service["selector"] == obj(rendered, "default", "Deployment")["spec"]["selector"]["matchLabels"]
    account = obj(rendered, "production", "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_tensorrt_variant(rendered):
    ctr = container(rendered, "production-tensorrt")
    assert ctr["image"] == "ghcr.io/adfraud/adfraud-serving:0.1.0-tensorrt"
    assert env_of(ctr)["ADFRAUD_SERVING_BACKEND"] == "tensorrt"
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = obj(rendered, "production-tensorrt", "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container(rendered, "production")["image"] == "ghcr.io/adfraud/adfraud-serving:0.1.0"


def test_topology_spread_gets_the_pod_selector(rendered):
    pod = obj(rendered, "production", "Deployment")["spec"]["template"]["spec"]
    (constraint,) = pod["topologySpreadConstraints"]
    assert constraint["topologyKey"] == "topology.kubernetes.io/zone"
    assert constraint["labelSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "adfraud-serving", "app.kubernetes.io/instance": RELEASE}


# ---- monitoring ------------------------------------------------------------------------------

MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}
# The series jobs.serve exports (ServingMetrics), as Prometheus names them.
SERVING_METRICS = (
    "adfraud_serving_requests_total",
    "adfraud_serving_request_latency_seconds_bucket",
    "adfraud_serving_events_total",
    "adfraud_serving_flagged_total",
    "adfraud_serving_model_loaded",
    "adfraud_serving_reloads_total",
)


def test_monitoring_objects_are_guarded(rendered):
    default_kinds = {kind for kind, _ in rendered["default"]["objects"]}
    assert not default_kinds & MONITORING_KINDS
    assert ("ConfigMap", f"{FULLNAME}-dashboards") not in rendered["default"]["objects"]
    production_kinds = {kind for kind, _ in rendered["production"]["objects"]}
    assert MONITORING_KINDS <= production_kinds


def test_service_monitor(rendered):
    monitor = obj(rendered, "production", "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


def test_prometheus_rules(rendered):
    rule = obj(rendered, "production", "PrometheusRule")
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert set(alerts) == {
        "AdfraudServingFraudRateHigh",
        "AdfraudServingFraudRateLow",
        "AdfraudServingErrorRateHigh",
        "AdfraudServingLatencyP99High",
        "AdfraudServingNoModel",
        "AdfraudServingReloadFailing",
    }
    assert all(a["labels"]["severity"] == "critical" for a in alerts.values())
    assert alerts["AdfraudServingFraudRateHigh"]["expr"].endswith("> 0.2")
    assert alerts["AdfraudServingErrorRateHigh"]["expr"].endswith("> 0.01")
    assert alerts["AdfraudServingLatencyP99High"]["expr"].endswith("> 0.1")
    everything = " ".join(r["expr"] for r in rules)
    for metric in SERVING_METRICS:
        assert metric in everything, metric
    assert 'status=~"5.."' in everything
    assert f'namespace="{NAMESPACE}",job="{FULLNAME}"' in everything
    for r in rules:
        assert balanced(r["expr"]), r["expr"]
        # Prometheus template syntax survives Helm's rendering.
        for text in r.get("annotations", {}).values():
            assert "{{ $value" in text or "$value" not in text


def test_grafana_dashboard(rendered):
    config = obj(rendered, "production", "ConfigMap", f"{FULLNAME}-dashboards")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config["data"]["adfraud-serving.json"])
    assert dashboard == json.loads((CHART / "files" / "dashboards" / "adfraud-serving.json").read_text())
    assert dashboard["uid"] == "adfraud-serving"
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (*SERVING_METRICS, "adfraud_serving_score_bucket", "adfraud_serving_model_info"):
        assert metric in exprs, metric
    assert all(p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for p in dashboard["panels"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# ---- values for the Airflow and MLflow charts ---------------------------------------------

def runtime_constant(name: str) -> str:
    """A string constant of plugins/adfraud_runtime.py (read, not imported: Airflow is heavy)."""
    match = re.search(rf'^{name} = "([^"]*)"', (ROOT / "plugins" / "adfraud_runtime.py").read_text(), re.M)
    assert match, name
    return match.group(1)


def constraint(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


@pytest.fixture(scope="module")
def airflow_values() -> dict[str, Any]:
    return load_yaml(VALUES_DIR / "airflow-values.yaml")


def test_airflow_values_executor_and_image(airflow_values):
    assert airflow_values["executor"] in {"KubernetesExecutor", "CeleryExecutor"}
    assert airflow_values["airflowVersion"] == constraint("apache-airflow")
    image = airflow_values["images"]["airflow"]
    assert image["repository"] == f"{runtime_constant('DEFAULT_IMAGE_REGISTRY')}/adfraud-airflow"
    assert image["tag"] == runtime_constant("DEFAULT_IMAGE_TAG")
    assert airflow_values["postgresql"]["enabled"] is False


def test_airflow_values_git_sync(airflow_values):
    git_sync = airflow_values["dags"]["gitSync"]
    assert git_sync["enabled"] is True
    assert git_sync["repo"].endswith(".git")
    assert git_sync["subPath"] == "dags"
    assert (ROOT / git_sync["subPath"] / "adfraud_retrain.py").is_file()


def test_airflow_values_hand_the_stage_settings_to_pods(airflow_values):
    env = {e["name"]: e["value"] for e in airflow_values["env"]}
    assert env[settings.RUNTIME_ENV_VAR] == "kubernetes"
    for name in ("IMAGE_REGISTRY_ENV_VAR", "IMAGE_TAG_ENV_VAR", "NAMESPACE_ENV_VAR",
                 "SERVICE_ACCOUNT_ENV_VAR"):
        assert runtime_constant(name) in env, name
    assert env[runtime_constant("IMAGE_TAG_ENV_VAR")] == airflow_values["images"]["airflow"]["tag"]
    for name in (settings.HOME_ENV_VAR, settings.MLFLOW_TRACKING_URI_ENV_VAR, settings.SERVING_CONFIG_ENV_VAR,
                 settings.SPARK_MASTER_ENV_VAR, settings.RAY_ADDRESS_ENV_VAR):
        assert env.get(name), name
    assert env[settings.HOME_ENV_VAR].startswith("s3://")
    # The serving chart's production values read what rollout writes.
    assert env[settings.SERVING_CONFIG_ENV_VAR] == PRODUCTION["modelConfig"]["uri"]


def test_airflow_values_hold_no_secret(airflow_values):
    text = (VALUES_DIR / "airflow-values.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
    for key in ("fernetKey", "apiSecretKey", "jwtSecret", "webserverSecretKey"):
        assert key not in airflow_values, f"{key}: use the *SecretName value instead"
    assert "metadataConnection" not in airflow_values["data"]
    assert airflow_values["workers"]["serviceAccount"]["annotations"]["eks.amazonaws.com/role-arn"]


@pytest.fixture(scope="module")
def mlflow_values() -> dict[str, Any]:
    return load_yaml(VALUES_DIR / "mlflow-values.yaml")


def test_mlflow_values_postgres_and_s3(mlflow_values):
    store = mlflow_values["backendStore"]
    assert store["postgres"]["enabled"] is True
    assert store["postgres"]["host"] and store["postgres"]["database"] == "mlflow"
    assert "user" not in store["postgres"] and "password" not in store["postgres"]
    assert store["existingDatabaseSecret"]["name"]
    s3 = mlflow_values["artifactRoot"]["s3"]
    assert s3["enabled"] is True and s3["bucket"]
    assert "awsAccessKeyId" not in s3 and "awsSecretAccessKey" not in s3
    assert mlflow_values["artifactRoot"]["proxiedArtifactStorage"] is True
    assert mlflow_values["serviceAccount"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert mlflow_values["image"]["tag"] == constraint("mlflow")


@pytest.mark.parametrize("name", ["airflow-values.yaml", "mlflow-values.yaml"])
def test_external_values_are_commented(name):
    """Every top-level value of the external charts' files carries a comment."""
    lines = (VALUES_DIR / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z]", line):
            above = next((x for x in reversed(lines[:i]) if x.strip()), "")
            assert above.startswith("#"), f"{name}: {line}"
