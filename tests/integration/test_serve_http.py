"""The scoring service over HTTP: a real ``python -m jobs.serve`` on 127.0.0.1.

The models are small untrained networks exported to ONNX (what the service does with a
model does not depend on its quality); expected scores are recomputed in the test from
the same online features, preprocessor and ONNX file. Each test scores events of IPs of
its own, so the server's feature state from other tests does not touch them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from jobs import serve
from jobs.common import features
from jobs.common.datasets import SYNTHETIC, TALKINGDATA, DatasetSpec
from jobs.common.features import Preprocessor
from jobs.online_features import (
    DEFAULT_LATENESS_S,
    FeaturePlan,
    InputEncoder,
    MemoryFeatureStore,
    OnlineFeatures,
)
from tests.unit.test_online_features import free_port, running_redis

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MAX_EVENTS = 64
MAX_BODY_KB = 64
T0_US = 1_510_047_038_000_000
_ips = itertools.count(10_000_000)


# ---------------------------------------------------------------------------------------
# Models and servers


def make_model(root: Path, spec: DatasetSpec, version: int, seed: int) -> Path:
    """An untrained model for ``spec`` as rollout would publish it; returns its config."""
    import torch

    from jobs.common.model import FraudNet, ModelConfig, save_checkpoint
    from jobs.export import export_onnx
    from jobs.rollout import serving_config

    root.mkdir(parents=True, exist_ok=True)
    categorical = {
        c: [f"{c[:1]}{i}" if spec is SYNTHETIC else str(i) for i in range(1, 40)]
        for c in features.categorical_features(spec)
    }
    if spec is SYNTHETIC:
        categorical["ip_subnet"] = [f"10.0.{i}" for i in range(10)]
    numeric = {c: {"mean": 1.0 + 0.1 * k, "std": 1.5} for k, c in enumerate(features.numeric_features(spec))}
    pre = Preprocessor(spec.name, categorical, numeric, features.feature_spec_hash(spec))
    torch.manual_seed(seed)
    net = FraudNet(ModelConfig(pre.cardinalities, len(numeric), hidden=[16])).eval()
    export_onnx(net, len(categorical), len(numeric), str(root / "model.onnx"))
    save_checkpoint(net, str(root / "model.pt"))
    (root / "preprocessor.json").write_text(json.dumps(pre.to_dict()))
    config = serving_config(f"adfraud-{spec.name}", version, pre, str(root), alias="champion",
                            checkpoint_uri=str(root / "model.pt"))
    path = root / "config.json"
    path.write_text(json.dumps(config))
    return path


def publish(config: Path, live: Path, **changes) -> None:
    """Point the live configuration at ``config`` atomically, as rollout does."""
    payload = {**json.loads(config.read_text()), **changes}
    tmp = live.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, live)


class Server:
    """A ``python -m jobs.serve`` subprocess and an HTTP client for it."""

    def __init__(self, config: Path, workdir: Path, args: tuple[str, ...] = (), **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"serve-{self.port}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ADFRAUD_")}
        full_env.update(
            {
                "ADFRAUD_HOME": str(workdir),
                serve.POLL_S_ENV_VAR: "0",
                serve.MAX_EVENTS_ENV_VAR: str(MAX_EVENTS),
                serve.MAX_BODY_KB_ENV_VAR: str(MAX_BODY_KB),
                **env,
            }
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "jobs.serve",
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    *args,
                ],
                cwd=REPO,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def wait(self, path: str = "/health", status: int = 200, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if self.client.get(path).status_code == status:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{path} never answered {status}: {self.log.read_text()[-3000:]}")

    def score(self, events: list[dict], **kw) -> httpx.Response:
        return self.client.post("/v1/score", json={"events": events}, **kw)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "td1": make_model(root / "td1", TALKINGDATA, 1, seed=1),
        "td2": make_model(root / "td2", TALKINGDATA, 2, seed=2),
        "syn": make_model(root / "syn", SYNTHETIC, 7, seed=3),
    }


@pytest.fixture(scope="module")
def server(models, tmp_path_factory) -> Iterator[tuple[Server, Path]]:
    """A server of the talkingdata model v1; yields it and its live configuration."""
    workdir = tmp_path_factory.mktemp("serve")
    live = workdir / "current.json"
    publish(models["td1"], live)
    srv = Server(live, workdir)
    try:
        srv.wait("/ready")
        yield srv, live
    finally:
        srv.stop()


def td_event(ip: int, event_id: int, seconds: float = 0.0, **overrides) -> dict:
    event = {
        "event_id": event_id,
        "ip": ip,
        "app": 3,
        "device": 1,
        "os": 13,
        "channel": 7,
        "click_time": (T0_US + int(seconds * 1e6)) / 1e6,
    }
    event.update(overrides)
    return event


def expected_probabilities(config: Path, spec: DatasetSpec, events: list[dict]) -> np.ndarray:
    """Scores of ``events`` from fresh online state, the preprocessor and onnxruntime,
    after the same request validation as the server's."""
    import onnxruntime as ort

    cfg = json.loads(Path(config).read_text())
    pre = Preprocessor.from_dict(json.loads(Path(cfg["preprocessor_uri"]).read_text()))
    rows = [e.__dict__ for e in serve.request_model(spec, 10**6).model_validate({"events": events}).events]
    online = OnlineFeatures(spec, MemoryFeatureStore(FeaturePlan.build(DEFAULT_LATENESS_S)))
    cats, nums = InputEncoder(pre).encode(online.compute(rows))
    session = ort.InferenceSession(cfg["onnx_uri"], providers=["CPUExecutionProvider"])
    return session.run(["probability"], {"categorical": cats, "numeric": nums})[0]


# ---------------------------------------------------------------------------------------
# Happy path


def test_health_ready_and_model_info(server):
    srv, _ = server
    assert srv.client.get("/health").json() == {"status": "ok"}
    assert srv.client.get("/ready").status_code == 200
    info = srv.client.get("/v1/model").json()
    assert (info["model_name"], info["version"], info["dataset"]) == (
        "adfraud-talkingdata",
        "1",
        "talkingdata",
    )
    assert (info["backend"], info["feature_store"], info["positive_is_fraud"]) == (
        "onnxruntime",
        "memory",
        False,
    )
    assert info["feature_spec_hash"] == features.feature_spec_hash(TALKINGDATA)
    assert "click_time" in info["request_schema"]["$defs"]["TalkingdataEvent"]["properties"]


def test_scores_match_offline_computation(server, models):
    """Per-event probability of the label, fraud score = 1 - probability on TalkingData
    (label 1 = download), flagged at the threshold, in request order."""
    srv, _ = server
    ip = next(_ips)
    events = [
        td_event(ip, 900_000 + i, seconds=s, app=a)
        for i, (s, a) in enumerate([(0, 3), (0.5, 3), (59.5, 9), (60, 3), (3_600, 12)])
    ]
    shuffled = [events[i] for i in (3, 0, 4, 1, 2)]
    response = srv.score(shuffled)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"], body["label"]) == (
        "adfraud-talkingdata",
        "1",
        "is_attributed",
    )
    results = body["results"]
    assert [r["event_id"] for r in results] == [e["event_id"] for e in shuffled]
    want = expected_probabilities(models["td1"], TALKINGDATA, shuffled)
    got = np.array([r["probability"] for r in results])
    assert np.max(np.abs(got - want)) < 1e-6
    for r in results:
        assert r["fraud_score"] == pytest.approx(1.0 - r["probability"], abs=1e-6)
        assert r["flagged"] == (r["fraud_score"] >= body["threshold"])


def test_iso_times_and_any_json_number_are_accepted(server):
    """Integer columns take 12 or 12.0; times take ISO 8601 (naive = UTC) or epoch seconds."""
    srv, _ = server
    ip = next(_ips)
    as_int = srv.score([td_event(ip, 1, click_time="2017-11-07 09:30:38")]).json()["results"][0]
    ip2 = next(_ips)
    as_float = srv.score([td_event(float(ip2), 2.0, app=3.0, click_time=T0_US / 1e6)]).json()["results"][0]
    assert as_int["probability"] == pytest.approx(as_float["probability"], abs=1e-7)
    assert as_float["event_id"] == 2


def test_unseen_ids_and_extra_fields_are_fine(server):
    """Unseen categorical ids go to the OOV bucket; label, withheld and unknown fields are ignored."""
    srv, _ = server
    ip = next(_ips)
    response = srv.score(
        [
            td_event(
                ip, 5, app=987_654, os=2_000_000_000, is_attributed=1, attributed_time=None, comment="hello"
            )
        ]
    )
    assert response.status_code == 200, response.text
    assert 0.0 <= response.json()["results"][0]["probability"] <= 1.0


# ---------------------------------------------------------------------------------------
# Bad input: 4xx naming the field, never 5xx


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"app": "twelve"}, "events.0.app"),
        ({"app": "12"}, "events.0.app"),
        ({"app": True}, "events.0.app"),
        ({"app": 1.5}, "events.0.app"),
        ({"app": -1}, "events.0.app"),
        ({"app": 2**40}, "events.0.app"),
        ({"os": None}, "events.0.os"),
        ({"channel": [1]}, "events.0.channel"),
        ({"event_id": "abc"}, "events.0.event_id"),
        ({"click_time": "yesterday"}, "events.0.click_time"),
        ({"click_time": -5.0}, "events.0.click_time"),
        ({"click_time": None}, "events.0.click_time"),
    ],
    ids=[
        "string_for_int",
        "numeric_string",
        "bool",
        "fraction",
        "below_min",
        "over_int32",
        "null_non_nullable",
        "list",
        "event_id_type",
        "bad_time",
        "time_before_1970",
        "null_time",
    ],
)
def test_bad_field_is_422_naming_it(server, change: dict, field: str):
    srv, _ = server
    response = srv.score([{**td_event(next(_ips), 1), **change}])
    assert response.status_code == 422, response.text
    assert field in response.json()["fields"]


def test_missing_field_is_422_naming_it(server):
    srv, _ = server
    event = td_event(next(_ips), 1)
    del event["device"]
    response = srv.score([event, td_event(next(_ips), 2)])
    assert response.status_code == 422
    assert response.json()["fields"] == ["events.0.device"]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"events": {}}', b'{"events": []}', b"[]", b'{"events": [], "extra": 1}'],
    ids=["invalid_json", "events_not_a_list", "no_events", "bare_list", "unknown_top_level_key"],
)
def test_malformed_body_is_422(server, content: bytes):
    srv, _ = server
    response = srv.client.post("/v1/score", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text


def test_too_many_events_is_413(server):
    srv, _ = server
    ip = next(_ips)
    response = srv.score([td_event(ip, i) for i in range(MAX_EVENTS + 1)])
    assert response.status_code == 413
    assert str(MAX_EVENTS) in response.json()["detail"]
    assert srv.score([td_event(ip, i) for i in range(MAX_EVENTS)]).status_code == 200


def test_oversized_body_is_413_and_the_server_carries_on(server):
    srv, _ = server
    padding = "x" * (MAX_BODY_KB * 1_024)
    response = srv.score([td_event(next(_ips), 1, comment=padding)])
    assert response.status_code == 413
    assert srv.client.get("/health").status_code == 200
    assert srv.score([td_event(next(_ips), 2)]).status_code == 200


def test_metrics_are_exposed(server):
    srv, _ = server
    srv.score([td_event(next(_ips), 1)])
    srv.score([td_event(next(_ips), 1, app="bad")])
    text = srv.client.get("/metrics").text
    for needle in (
        'adfraud_serving_requests_total{status="200"}',
        'adfraud_serving_requests_total{status="422"}',
        "adfraud_serving_request_latency_seconds_bucket",
        "adfraud_serving_score_bucket",
        "adfraud_serving_flagged_total",
        "adfraud_serving_events_total",
        'adfraud_serving_model_info{name="adfraud-talkingdata",version="1"} 1.0',
    ):
        assert needle in text, needle


# ---------------------------------------------------------------------------------------
# Reloads


def test_reload_during_traffic_drops_nothing(server, models):
    """300 requests from 3 clients while the model is swapped back and forth: all 200,
    both versions served, the last reload's version serving at the end."""
    srv, live = server
    statuses: list[int] = []
    versions: set[str] = set()
    lock = threading.Lock()

    def traffic(worker: int) -> None:
        ip = next(_ips)
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            for i in range(100):
                response = client.post(
                    "/v1/score", json={"events": [td_event(ip, worker * 1_000 + i, seconds=i)]}
                )
                with lock:
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        versions.add(response.json()["model_version"])
                time.sleep(0.005)

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    reloads = []
    for config in (models["td2"], models["td1"], models["td2"]):
        time.sleep(0.3)
        publish(config, live)
        reloads.append(srv.client.post("/admin/reload").json())
    for t in threads:
        t.join(timeout=120)
    assert len(statuses) == 300 and set(statuses) == {200}
    assert versions == {"1", "2"}
    assert [r["version"] for r in reloads] == ["2", "1", "2"]
    assert srv.client.get("/v1/model").json()["version"] == "2"


def test_sighup_reloads(server, models):
    srv, live = server
    publish(models["td1"], live, version=3, threshold=0.25)
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while srv.client.get("/v1/model").json()["version"] != "3":
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.1)
    assert srv.score([td_event(next(_ips), 1)]).json()["threshold"] == 0.25


def test_failed_reload_keeps_the_current_model(server, models, tmp_path):
    srv, live = server
    before = srv.client.get("/v1/model").json()["version"]
    publish(models["td2"], live, version=99, onnx_uri=str(tmp_path / "missing.onnx"))
    response = srv.client.post("/admin/reload")
    assert response.status_code == 409
    assert response.json()["serving_version"] == before
    assert srv.client.get("/ready").status_code == 200
    assert srv.score([td_event(next(_ips), 1)]).json()["model_version"] == before
    assert 'adfraud_serving_reloads_total{result="failed"}' in srv.client.get("/metrics").text
    publish(models["td2"], live)
    assert srv.client.post("/admin/reload").status_code == 200


# ---------------------------------------------------------------------------------------
# A server that starts without a model, then serves the synthetic one from Redis


def test_not_ready_until_a_model_loads_then_synthetic_on_redis(models, tmp_path):
    """No configuration yet: alive, not ready, 503 on scores. After the configuration
    appears and a reload: ready, synthetic scores (fraud score = probability), state in Redis."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(running_redis(tmp_path / "redis"))
            env = {"ADFRAUD_REDIS_URL": url, "ADFRAUD_REDIS_PREFIX": "servetest"}
        except pytest.skip.Exception:
            env = {}
        live = tmp_path / "current.json"
        srv = Server(live, tmp_path, **env)
        stack.callback(srv.stop)
        srv.wait("/health")
        assert srv.client.get("/ready").status_code == 503
        response = srv.client.post("/v1/score", json={"events": []})
        assert response.status_code == 503

        publish(models["syn"], live)
        assert srv.client.post("/admin/reload").status_code == 200
        assert srv.client.get("/ready").status_code == 200
        info = srv.client.get("/v1/model").json()
        assert info["feature_store"] == ("redis" if env else "memory")

        events = [
            {
                "event_id": f"s{i}",
                "campaign_id": "c1",
                "ad_group": "a2",
                "keyword_type": "brand",
                "click_time": f"2024-03-01T12:00:{i:02d}+00:00",
                "ip_address": f"10.0.{i % 3}.7",
                "device_id": "dev-1",
                "user_agent": "u3",
                "click_cost": 0.25 * i,
                "is_fraud": 0,
            }
            for i in range(6)
        ]
        body = srv.score(events).json()
        assert body["label"] == "is_fraud"
        want = expected_probabilities(models["syn"], SYNTHETIC, events)
        got = np.array([r["probability"] for r in body["results"]])
        assert np.max(np.abs(got - want)) < 1e-6
        for r in body["results"]:
            assert r["fraud_score"] == r["probability"]
        bad = srv.score([{**events[0], "click_cost": -1}])
        assert bad.status_code == 422 and bad.json()["fields"] == ["events.0.click_cost"]


def test_warmup_replays_history_before_ready(models, tmp_path):
    """--warmup feeds raw history into the feature state first: the first scored event
    of a known IP is scored with that history, as offline over history + event."""
    import pandas as pd
    import pyarrow as pa

    from jobs.common import storage

    ip = next(_ips)
    history = [td_event(ip, 50 + i, seconds=i * 7.0, app=3 + i % 2) for i in range(12)]
    frame = pd.DataFrame(history)
    frame["click_time"] = pd.to_datetime(
        (frame["click_time"] * 1e6).round().astype("int64"), unit="us", utc=True
    )
    frame["attributed_time"] = pd.NaT
    frame["is_attributed"] = 0
    table = pa.Table.from_pandas(frame, schema=TALKINGDATA.arrow_schema(), preserve_index=False)
    storage.write_table(table, str(tmp_path / "history"))
    srv = Server(models["td1"], tmp_path, args=("--warmup", str(tmp_path / "history")))
    try:
        srv.wait("/ready")
        new = td_event(ip, 99, seconds=90.0)
        got = srv.score([new]).json()["results"][0]["probability"]
        want = expected_probabilities(models["td1"], TALKINGDATA, [*history, new])[-1]
        cold = expected_probabilities(models["td1"], TALKINGDATA, [new])[0]
        assert got == pytest.approx(float(want), abs=1e-6)
        assert abs(float(want) - float(cold)) > 1e-6  # the history changes the score
    finally:
        srv.stop()
