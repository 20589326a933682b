"""Unit tests of ``jobs.online_features``: the ETL's semantics, one event at a time.

A brute-force reference computes each feature straight from its definition over the
whole table (what ``jobs.etl.build_features`` computes with Spark windows); the stores
must agree with it exactly, on data built to hit every tie and window boundary. The
Redis store runs against a real ``redis-server`` on 127.0.0.1 when one is installed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs import online_features as of
from jobs.common import features
from jobs.common.datasets import SYNTHETIC, TALKINGDATA, DatasetSpec
from jobs.common.features import Preprocessor

T0_US = 1_510_047_038_000_000  # 2017-11-07 09:30:38 UTC
DERIVED = features.derived_numeric(TALKINGDATA)


# ---------------------------------------------------------------------------------------
# Helpers shared with the integration tests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_redis(workdir: Path) -> Iterator[str]:
    """A throw-away redis-server on 127.0.0.1 (no persistence); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    pytest.importorskip("redis")
    import redis

    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--protected-mode",
            "yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def reference_features(events: list[dict], spec: DatasetSpec) -> pd.DataFrame:
    """Every derived feature from its definition over the whole table, O(n^2)."""
    ts = spec.timestamp
    ms = [e[ts] // 1_000 for e in events]
    ranks = {}
    for i in sorted(range(len(events)), key=lambda i: (ms[i], events[i][spec.event_id])):
        ranks[i] = sum(1 for j in ranks if ms[j] == ms[i])
    key = [ms[i] * of.TIE_SLOTS + ranks[i] for i in range(len(events))]
    rows = []
    for i, e in enumerate(events):
        row = {spec.event_id: e[spec.event_id]}

        def same(j, entity, e=e):
            return all(events[j][getattr(spec, r)] == e[getattr(spec, r)] for r in entity)

        for name, entity, w in features.WINDOW_COUNTS:
            lo = key[i] - w * 1_000 * of.TIE_SLOTS
            row[name] = float(
                sum(1 for j in range(len(events)) if same(j, entity) and lo <= key[j] <= key[i])
            )
        for name, entity in features.GAP_FEATURES:
            before = [j for j in range(len(events)) if same(j, entity) and key[j] < key[i]]
            if before:
                prev = max(before, key=lambda j: key[j])
                row[name] = e[ts] / 1e6 - events[prev][ts] / 1e6
            else:
                row[name] = float(features.NO_PREVIOUS_CLICK_S)
        for name, role in features.DISTINCT_FEATURES:
            values = {
                events[j][getattr(spec, role)]
                for j in range(len(events))
                if same(j, ("ip",)) and key[j] <= key[i]
            }
            row[name] = float(len(values))
        row["hour_of_day"] = float(dt.datetime.fromtimestamp(e[ts] / 1e6, dt.UTC).hour)
        rows.append(row)
    return pd.DataFrame(rows)


ALL_BOUNDARIES_MS = (
    0,
    1,
    2,
    59_999,
    60_000,
    60_001,
    120_000,
    3_599_999,
    3_600_000,
    3_600_001,
    86_399_999,
    86_400_000,
    86_400_001,
    90_000_000,
    172_800_000,
    777_600_000,
)
MINUTE_BOUNDARIES_MS = (0, 1, 2, 59_999, 60_000, 60_001, 120_000)


def tie_heavy_events(n: int, seed: int = 3, offsets_ms: tuple[int, ...] = ALL_BOUNDARIES_MS) -> list[dict]:
    """TalkingData-layout events crowded onto few entities, few milliseconds and exact
    window boundaries (60 s, 1 h, 1 d apart), with event ids unrelated to time."""
    rng = np.random.default_rng(seed)
    offsets_ms = np.array(offsets_ms)
    ids = rng.permutation(n * 10)[:n]
    events = []
    for i in range(n):
        ms = int(rng.choice(offsets_ms))
        events.append(
            {
                "event_id": int(ids[i]),
                "ip": int(rng.integers(0, 3)),
                "app": int(rng.integers(0, 3)),
                "device": int(rng.integers(0, 2)),
                "os": int(rng.integers(0, 4)),
                "channel": int(rng.integers(0, 2)),
                "click_time": T0_US + ms * 1_000 + int(rng.choice([0, 1, 999])),
            }
        )
    return events


def etl_order(events: list[dict], spec: DatasetSpec = TALKINGDATA) -> list[dict]:
    return sorted(events, key=lambda e: (e[spec.timestamp] // 1_000, e[spec.event_id]))


def assert_features_equal(got: pd.DataFrame, want: pd.DataFrame, columns: list[str]) -> None:
    got = got.set_index(got.columns[0]).sort_index()
    want = want.set_index(want.columns[0]).sort_index()
    for column in columns:
        diff = np.abs(got[column].to_numpy(float) - want[column].to_numpy(float))
        assert diff.max() == 0.0, f"{column}: max |online - reference| = {diff.max()}"


@pytest.fixture(params=["memory", "redis"])
def make_store(request, tmp_path) -> Iterator:
    """A factory of fresh stores of one kind (Redis ones share one server)."""
    if request.param == "memory":
        yield lambda spec=TALKINGDATA, **kw: of.MemoryFeatureStore(
            of.FeaturePlan.build(of.DEFAULT_LATENESS_S), **kw
        )
        return
    with running_redis(tmp_path / "redis") as url:
        made = []

        def make(spec=TALKINGDATA, **kw):
            store = of.RedisFeatureStore(
                url, of.FeaturePlan.build(of.DEFAULT_LATENESS_S), f"test:{len(made)}", **kw
            )
            made.append(store)
            return store

        yield make
        for store in made:
            store.close()


# ---------------------------------------------------------------------------------------
# Semantics


@pytest.mark.parametrize("batch", [1, 7, 10_000], ids=["one_by_one", "batches_of_7", "one_batch"])
def test_in_order_stream_matches_reference(make_store, batch: int):
    """Events arriving in the ETL's order get exactly the reference features, whatever
    the request size: ties, window boundaries and gaps included."""
    events = etl_order(tie_heavy_events(300))
    online = of.OnlineFeatures(TALKINGDATA, make_store())
    frames = [online.compute_frame(events[i : i + batch]) for i in range(0, len(events), batch)]
    assert_features_equal(
        pd.concat(frames, ignore_index=True), reference_features(events, TALKINGDATA), DERIVED
    )


def test_events_within_a_request_are_ordered_before_they_count(make_store):
    """One request holding a shuffled minute of events is ordered by (ms, event id) first."""
    events = tie_heavy_events(200, seed=11)
    shuffled = list(np.random.default_rng(0).permutation(np.array(events, dtype=object)))
    online = of.OnlineFeatures(TALKINGDATA, make_store())
    got = online.compute_frame(shuffled)
    assert list(got["event_id"]) == [e["event_id"] for e in shuffled]
    assert_features_equal(got, reference_features(events, TALKINGDATA), DERIVED)


def test_late_event_is_scored_and_then_counted(make_store):
    """A late event gets its features as of its own time from what was seen, and events
    after it see the state the ETL would have: it counts as if it had come in order."""
    events = etl_order(tie_heavy_events(120, seed=5))
    late = {**events[99], "event_id": 10**9, "click_time": events[99]["click_time"] - 30_000_000}
    online = of.OnlineFeatures(TALKINGDATA, make_store())
    online.compute(events[:100])
    late_row = online.compute_frame([late])
    after = online.compute_frame(events[100:])

    # Its own features: the reference over everything seen up to its key.
    seen = etl_order([*events[:100], late])
    want_late = reference_features(seen, TALKINGDATA)
    want_late = want_late[want_late["event_id"] == late["event_id"]]
    assert_features_equal(late_row, want_late, DERIVED)

    # Later events: the reference over the whole table, the late event in its place.
    want_after = reference_features(etl_order([*events, late]), TALKINGDATA)
    want_after = want_after[want_after["event_id"].isin([e["event_id"] for e in events[100:]])]
    assert_features_equal(after, want_after, DERIVED)


def test_repeated_event_is_not_counted_twice(make_store):
    """A retried request (within the lateness allowance) gets the same features back and
    leaves the state unchanged."""
    events = etl_order(tie_heavy_events(80, seed=9, offsets_ms=MINUTE_BOUNDARIES_MS))
    online = of.OnlineFeatures(TALKINGDATA, make_store())
    first = online.compute_frame(events[:50])
    again = online.compute_frame(events[40:50])
    assert_features_equal(
        again, first[first["event_id"].isin([e["event_id"] for e in events[40:50]])], DERIVED
    )
    rest = online.compute_frame(events[50:])
    want = reference_features(events, TALKINGDATA)
    assert_features_equal(rest, want[want["event_id"].isin([e["event_id"] for e in events[50:]])], DERIVED)


def test_first_event_of_an_entity(make_store):
    """No history: counts of 1, gaps of NO_PREVIOUS_CLICK_S, one distinct value each."""
    event = {"event_id": 0, "ip": 1, "app": 2, "device": 3, "os": 4, "channel": 5, "click_time": T0_US}
    row = of.OnlineFeatures(TALKINGDATA, make_store()).compute([event])
    for name, _, _ in features.WINDOW_COUNTS:
        assert row[name] == [1.0]
    for name, _ in features.GAP_FEATURES:
        assert row[name] == [float(features.NO_PREVIOUS_CLICK_S)]
    for name, _ in features.DISTINCT_FEATURES:
        assert row[name] == [1.0]
    assert row["hour_of_day"] == [9.0]


def test_categoricals_and_calendar_follow_spark_casts():
    """Integer categoricals become Spark's strings; the hour is UTC; raw numbers pass."""
    event = {
        "event_id": 7,
        "ip": 12,
        "app": 3,
        "device": 1,
        "os": 19,
        "channel": 280,
        "click_time": dt.datetime(2017, 11, 7, 23, 59, 59, 999_999, tzinfo=dt.UTC),
    }
    row = of.OnlineFeatures(TALKINGDATA, of.MemoryFeatureStore(of.FeaturePlan.build(60))).compute([event])
    assert (row["app"], row["device"], row["os"], row["channel"]) == (["3"], ["1"], ["19"], ["280"])
    assert row["hour_of_day"] == [23.0]


@pytest.mark.parametrize(
    ("ip", "subnet"),
    [("10.1.2.3", "10.1.2"), ("10.1.2", "10.1.2"), ("10.1", "10.1"), ("a.b.c.d.e", "a.b.c"), ("", "")],
    ids=["ipv4", "three_parts", "two_parts", "five_parts", "empty"],
)
def test_ip_subnet_is_spark_substring_index(ip: str, subnet: str):
    assert of.ip_subnet(ip) == subnet


def test_synthetic_layout_with_string_ids(make_store):
    """String event ids order ties as Spark orders strings; ip_subnet and the raw cost
    come through; the reference agrees on every derived feature."""
    rng = np.random.default_rng(1)
    events = []
    for i in range(150):
        events.append(
            {
                "event_id": f"e{rng.integers(0, 10**6):06d}-{i}",
                "campaign_id": f"c{rng.integers(0, 3)}",
                "ad_group": f"g{rng.integers(0, 2)}",
                "keyword_type": "brand",
                "click_time": T0_US + int(rng.choice([0, 1_000, 60_000_000, 3_600_000_000])),
                "ip_address": f"10.0.{rng.integers(0, 2)}.{rng.integers(0, 3)}",
                "device_id": f"d{rng.integers(0, 3)}",
                "user_agent": "ua",
                "click_cost": float(rng.random()),
            }
        )
    events = etl_order(events, SYNTHETIC)
    online = of.OnlineFeatures(SYNTHETIC, make_store(SYNTHETIC))
    got = online.compute_frame(events)
    assert_features_equal(got, reference_features(events, SYNTHETIC), features.derived_numeric(SYNTHETIC))
    assert list(got["ip_subnet"]) == [e["ip_address"].rsplit(".", 1)[0] for e in events]
    assert list(got["click_cost"]) == [e["click_cost"] for e in events]


# ---------------------------------------------------------------------------------------
# State bounds


def test_memory_store_prunes_history_but_keeps_counts():
    """A busy entity's history stays bounded by its longest window plus the lateness."""
    plan = of.FeaturePlan.build(lateness_s=0)
    store = of.MemoryFeatureStore(plan, lateness_s=0)
    online = of.OnlineFeatures(TALKINGDATA, store)
    base = {"ip": 1, "app": 1, "device": 1, "os": 1, "channel": 1}
    events = [
        {**base, "event_id": i, "click_time": T0_US + i * 600_000_000} for i in range(1_000)
    ]  # 10 min apart
    out = online.compute(events)
    assert out["ip_clicks_1d"][-1] == 145.0  # 24 h / 10 min + the event itself
    assert out["ip_device_clicks_1h"][-1] == 7.0
    ip_history = store._histories[0][(1,)]
    assert len(ip_history.keys) <= 145 + 64


def test_memory_store_state_ttl_drops_idle_entities():
    """With a state TTL, entities idle longer than it lose their state (and only they)."""
    store = of.MemoryFeatureStore(of.FeaturePlan.build(0), lateness_s=0, state_ttl_s=3_600)
    online = of.OnlineFeatures(TALKINGDATA, store)
    base = {"app": 1, "device": 1, "os": 1, "channel": 1}
    online.compute([{**base, "ip": 99, "event_id": 0, "click_time": T0_US}])
    busy = [{**base, "ip": 1, "event_id": i, "click_time": T0_US + i * 1_000_000} for i in range(1, 5_000)]
    online.compute(busy)
    assert (99,) not in store._histories[0]
    assert (1,) in store._histories[0]
    back = online.compute([{**base, "ip": 99, "event_id": 10**6, "click_time": T0_US + 5_000_000_000}])
    assert back["ip_secs_since_prev"] == [float(features.NO_PREVIOUS_CLICK_S)]


def test_redis_state_lives_in_redis(tmp_path):
    """Two store objects on one server (two replicas) share the state."""
    with running_redis(tmp_path / "redis") as url:
        plan = of.FeaturePlan.build(of.DEFAULT_LATENESS_S)
        a = of.OnlineFeatures(TALKINGDATA, of.RedisFeatureStore(url, plan, "shared"))
        b = of.OnlineFeatures(TALKINGDATA, of.RedisFeatureStore(url, plan, "shared"))
        events = etl_order(tie_heavy_events(60, seed=2))
        parts = [
            a.compute_frame(events[i : i + 5]) if (i // 5) % 2 == 0 else b.compute_frame(events[i : i + 5])
            for i in range(0, len(events), 5)
        ]
        assert_features_equal(
            pd.concat(parts, ignore_index=True), reference_features(events, TALKINGDATA), DERIVED
        )
        assert a.store.clear() > 0


def test_store_from_env_picks_redis_only_when_configured(monkeypatch):
    monkeypatch.delenv(of.REDIS_URL_ENV_VAR, raising=False)
    assert isinstance(of.store_from_env(TALKINGDATA), of.MemoryFeatureStore)
    monkeypatch.setenv(of.LATENESS_S_ENV_VAR, "soon")
    with pytest.raises(ValueError, match=of.LATENESS_S_ENV_VAR):
        of.store_from_env(TALKINGDATA)


# ---------------------------------------------------------------------------------------
# Model inputs


def test_input_encoder_is_bit_identical_to_preprocessor():
    """The list-based encoder gives Preprocessor.transform's arrays, bit for bit, with
    unseen values, nulls and negative numbers in the mix."""
    pre = Preprocessor(
        dataset="synthetic",
        categorical={
            "campaign_id": ["c1", "c2", ""],
            "ad_group": ["g1"],
            "keyword_type": ["brand"],
            "user_agent": ["ua"],
            "ip_subnet": ["10.0.0"],
        },
        numeric={
            name: {"mean": 0.37 * k, "std": 1.3 + k}
            for k, name in enumerate(features.numeric_features(SYNTHETIC))
        },
        feature_spec_hash=features.feature_spec_hash(SYNTHETIC),
    )
    rng = np.random.default_rng(4)
    n = 64
    columns = {
        "campaign_id": list(rng.choice(np.array(["c1", "c2", "c9", None, ""], dtype=object), n)),
        "ad_group": ["g1"] * (n // 2) + ["g2"] * (n // 2),
        "keyword_type": ["brand"] * n,
        "user_agent": [None] * n,
        "ip_subnet": ["10.0.0"] * n,
    }
    for name in features.numeric_features(SYNTHETIC):
        values = list(rng.exponential(50.0, n))
        values[0], values[1] = None, -3.0
        columns[name] = values
    want_cats, want_nums = pre.transform(pd.DataFrame(columns))
    got_cats, got_nums = of.InputEncoder(pre).encode(columns)
    np.testing.assert_array_equal(got_cats, want_cats)
    assert got_nums.dtype == np.float32 and got_nums.tobytes() == want_nums.tobytes()


def test_to_micros_accepts_the_usual_timestamp_types():
    want = T0_US + 123_456
    stamp = dt.datetime(2017, 11, 7, 9, 30, 38, 123_456, tzinfo=dt.UTC)
    for value in (want, stamp, stamp.replace(tzinfo=None), pd.Timestamp(stamp), np.datetime64(want, "us")):
        assert of.to_micros(value) == want
    with pytest.raises(TypeError):
        of.to_micros("2017-11-07")


def test_no_import_side_effects():
    """Importing the module reads no environment and opens no connection."""
    env = {k: v for k, v in os.environ.items() if k != of.REDIS_URL_ENV_VAR}
    code = "import sys, jobs.online_features; assert 'redis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).resolve().parents[2])
