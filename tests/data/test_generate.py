"""Data tests of ``jobs.generate``: schema, labels, ids, time order, oracle columns, drift.

One dataset is generated per module through the CLI (small parts, so that several are
written) and checked from the parquet files, as the ETL will read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from jobs import generate
from jobs.common import storage
from jobs.common.datasets import SYNTHETIC

# Logging is configured by main(); tests keep pytest's own handlers instead.
CONFIGURE_LOGGING = "jobs.generate.cli.configure_logging"

ROWS = 60_000
PART_ROWS = 25_000
SEED = 11
START = pd.Timestamp("2026-11-01T00:00:00Z")
DAYS = 7


def run_cli(output: Path, *args: str) -> dict:
    """Run ``main()`` with ``args`` and return its JSON result."""
    result_path = output.parent / f"{output.name}.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CONFIGURE_LOGGING, lambda verbose=False: None)
        code = generate.main(["--output", str(output), "--result-path", str(result_path), *args])
    assert code == 0
    return json.loads(result_path.read_text())


def part_files(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


def read_events(output: Path) -> pd.DataFrame:
    return storage.read_table(str(output)).to_pandas()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict, pd.DataFrame]:
    output = tmp_path_factory.mktemp("generate") / "raw"
    result = run_cli(output, "--rows", str(ROWS), "--part-rows", str(PART_ROWS), "--seed", str(SEED))
    return output, result, read_events(output)


@pytest.fixture(scope="module")
def drifted(tmp_path_factory) -> dict[str, pd.DataFrame | dict]:
    """The same seed and size with each drift option, and without."""
    root = tmp_path_factory.mktemp("drift")
    out: dict[str, pd.DataFrame | dict] = {}
    for name in generate.DRIFTS:
        result = run_cli(root / name, "--rows", "30000", "--seed", "5", "--drift", name)
        out[name] = read_events(root / name)
        out[f"{name}.result"] = result
    return out


def test_schema_matches_the_spec(dataset):
    """Every part, read back, has exactly SYNTHETIC's columns, types and non-null fields."""
    output, _, _ = dataset
    files = part_files(output)
    assert len(files) == 3
    for path in files:
        schema = pq.read_schema(path)
        assert schema == SYNTHETIC.arrow_schema(), path.name
        assert [f.nullable for f in schema] == [c.nullable for c in SYNTHETIC.columns]
    assert storage.read_table(str(output)).schema == SYNTHETIC.arrow_schema()
    assert (output / storage.SUCCESS_MARKER).exists()


def test_ids_unique_no_nulls_labels_binary(dataset):
    """event_id is unique and ev-<seed>-<12 digits>; nothing is null; labels are 0/1."""
    _, _, events = dataset
    assert len(events) == ROWS
    assert events["event_id"].is_unique
    assert events["event_id"].str.fullmatch(rf"ev-{SEED}-\d{{12}}").all()
    assert events["event_id"].iloc[0] == f"ev-{SEED}-000000000000"
    assert not events.isna().any().any()
    assert set(events["is_fraud"].unique()) == {0, 1}
    assert events["fraud_probability"].between(0, 1).all()
    assert (events["click_cost"] > 0).all()
    assert set(events["keyword_type"]) == set(generate.KEYWORD_TYPES)


def test_values_look_like_traffic(dataset):
    """Addresses are dotted quads, device ids UUID-shaped, ad groups belong to their campaign."""
    _, _, events = dataset
    octets = events["ip_address"].str.split(".", expand=True).astype(int)
    assert octets.shape[1] == 4 and octets.ge(0).all().all() and octets.le(255).all().all()
    assert octets[3].between(1, 254).all()
    assert events["device_id"].str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}").all()
    assert (events["ad_group"].str.rsplit("-ag", n=1).str[0] == events["campaign_id"]).all()
    assert events["user_agent"].nunique() > 500
    assert events["campaign_id"].value_counts().iloc[0] > 5 * events["campaign_id"].value_counts().median()


def test_fraud_rate_and_every_scenario(dataset):
    """A few percent fraud; every scenario present, fraud mechanisms far above the legitimate ones."""
    _, result, events = dataset
    assert 0.03 <= events["is_fraud"].mean() <= 0.09
    assert set(events["scenario"]) == {s.name for s in generate.SCENARIOS}
    rates = events.groupby("scenario")["is_fraud"].mean()
    for s in generate.SCENARIOS:
        assert (rates[s.name] > 0.4) if s.fraud else (rates[s.name] < 0.05), s.name
    counts = events["scenario"].value_counts()
    assert {k: v["events"] for k, v in result["scenarios"].items()} == counts.to_dict()
    assert result["fraud_rate"] == pytest.approx(events["is_fraud"].mean(), abs=1e-12)


def test_labels_are_drawn_from_fraud_probability(dataset):
    """Per scenario, the label rate matches the mean oracle probability within sampling error."""
    _, _, events = dataset
    for name, group in events.groupby("scenario"):
        p = group["fraud_probability"].to_numpy()
        sd = np.sqrt((p * (1 - p)).sum()) / len(p)
        assert abs(group["is_fraud"].mean() - p.mean()) < 4 * sd + 1e-3, name


def test_bayes_auc_matches_sklearn_on_the_file(dataset):
    """bayes_auc and its time splits equal sklearn's AUC of fraud_probability on the written rows."""
    _, result, events = dataset
    auc = roc_auc_score(events["is_fraud"], events["fraud_probability"])
    assert result["bayes_auc"] == pytest.approx(auc, abs=1e-9)
    assert 0.93 <= result["bayes_auc"] <= 0.99
    ordered = events.sort_values(["click_time", "event_id"]).reset_index(drop=True)
    edges = [0, round(0.70 * ROWS), round(0.70 * ROWS) + round(0.15 * ROWS), ROWS]
    for k, name in enumerate(["train", "validation", "test"]):
        part = ordered.iloc[edges[k] : edges[k + 1]]
        expected = roc_auc_score(part["is_fraud"], part["fraud_probability"])
        assert result["bayes_auc_by_split"][name] == pytest.approx(expected, abs=1e-9), name
        start = part["click_time"].iloc[0].isoformat().replace("+00:00", "Z")
        assert result["split"]["starts"][name] == start


def test_time_window_and_part_order(dataset):
    """Clicks fall in [start, start + days); parts hold part-rows rows each, in time order."""
    output, result, _ = dataset
    assert result["start"] == "2026-11-01T00:00:00Z" and result["end"] == "2026-11-08T00:00:00Z"
    previous_last = None
    sizes = []
    for path in part_files(output):
        part = pq.read_table(path).to_pandas()
        sizes.append(len(part))
        assert part.sort_values(["click_time", "event_id"]).index.equals(part.index), path.name
        if previous_last is not None:
            assert part["click_time"].iloc[0] >= previous_last
        previous_last = part["click_time"].iloc[-1]
        assert part["click_time"].min() >= START
        assert part["click_time"].max() < START + pd.Timedelta(days=DAYS)
    assert sizes == [25_000, 25_000, 10_000]
    assert result["parts"] == 3


def test_result_json(dataset):
    """The result names the dataset, its URI and row count (= parquet rows), seed and drift."""
    output, result, events = dataset
    assert result["dataset"] == "synthetic"
    assert result["raw_uri"] == str(output)
    assert result["rows"] == len(events) == pq.ParquetDataset(str(output)).read().num_rows
    assert result["seed"] == SEED
    assert result["drift"]["name"] == "none" and result["drift"]["changes"] == []
    assert result["events_per_s"] > 0
    assert set(result["bayes_auc_by_split"]) == {"train", "validation", "test"}
    assert sum(v["events"] for v in result["scenarios"].values()) == ROWS


def is_browser(agent: pd.Series) -> pd.Series:
    """A real browser's agent: Mozilla/ or Opera/, and not a headless or scripted one."""
    return agent.str.match(r"Mozilla/|Opera/") & ~agent.str.contains("HeadlessChrome|PhantomJS")


def test_mechanisms_show_in_the_traffic(dataset):
    """Each fraud mechanism leaves the trace it is documented to leave."""
    _, _, events = dataset
    events = events.assign(
        hour=events["click_time"].dt.hour, first_octet=events["ip_address"].str.split(".").str[0]
    )
    by = {name: group for name, group in events.groupby("scenario")}
    datacenter = {str(o) for o in generate.DATACENTER_FIRST_OCTETS}

    # Bots: scripted agents, datacenter ranges, a fixed period between clicks of one address
    bots = by["bot_burst"]
    assert not is_browser(bots["user_agent"]).any()
    assert bots["first_octet"].isin(datacenter).all()
    gaps = bots.groupby("ip_address")["click_time"].diff().dt.total_seconds().dropna()
    assert gaps.median() < 10

    # Click farms: many devices behind few addresses, on few campaigns
    farms = by["click_farm"]
    assert farms.groupby("ip_address")["device_id"].nunique().median() >= 10
    assert farms.groupby("ip_address")["campaign_id"].nunique().max() <= 5

    # Device resets: about one click per device id
    resets = by["device_reset"]
    assert resets["device_id"].nunique() == len(resets)

    # Odd hours on expensive keywords
    odd = by["odd_hour_premium"]
    assert (odd["hour"] < 6).mean() > 0.9
    assert odd["keyword_type"].isin(["premium", "competitor"]).all()
    assert odd["click_cost"].median() > 2 * by["organic"]["click_cost"].median()

    # Hard fraud: residential-proxy bots look like single clicks from homes
    stealth = by["stealth_bot"]
    assert not stealth["first_octet"].isin(datacenter).any()
    assert is_browser(stealth["user_agent"]).all()
    assert stealth.groupby("ip_address").size().median() == 1

    # Legitimate traffic that looks suspicious: offices in datacenter ranges, many devices per IP
    office = by["corporate_vpn"]
    assert office["first_octet"].isin(datacenter).all()
    assert office.groupby("ip_address")["device_id"].nunique().median() >= 5
    organic = by["organic"]
    assert not organic["first_octet"].isin(datacenter).any()
    assert organic.groupby("ip_address")["device_id"].nunique().median() <= 3


def test_reproducible_bytes_and_seed_dependence(tmp_path: Path):
    """Same seed and options: byte-identical parts; another seed: other data; part size: same rows."""
    args = ["--rows", "20000", "--part-rows", "7000", "--seed", "3"]
    run_cli(tmp_path / "a", *args)
    run_cli(tmp_path / "b", *args)
    a, b = part_files(tmp_path / "a"), part_files(tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b] == [f"part-{i:05d}.parquet" for i in range(3)]
    for x, y in zip(a, b, strict=True):
        assert x.read_bytes() == y.read_bytes(), x.name

    run_cli(tmp_path / "c", "--rows", "20000", "--part-rows", "7000", "--seed", "4")
    first, other = read_events(tmp_path / "a"), read_events(tmp_path / "c")
    assert not first["ip_address"].equals(other["ip_address"])
    assert not first["click_time"].equals(other["click_time"])

    run_cli(tmp_path / "d", "--rows", "20000", "--part-rows", "20000", "--seed", "3")
    assert len(part_files(tmp_path / "d")) == 1
    pd.testing.assert_frame_equal(first, read_events(tmp_path / "d"))


def test_drift_changes_what_it_claims(drifted):
    """Each drift option moves the traffic the way its description says; 'all' does every one."""
    base = drifted["none"]
    base_campaigns = set(base["campaign_id"])
    for name in ("new_campaigns", "all"):
        new = ~drifted[name]["campaign_id"].isin(base_campaigns)
        assert 0.15 < new.mean() < 0.45, name
        assert drifted[name]["campaign_id"][new].min() >= f"cmp-{generate.BASE_CAMPAIGNS:04d}"
    # Same clicks, dearer: between the flat and the premium/competitor multiplier
    ratio = drifted["cost_inflation"]["click_cost"] / base["click_cost"]
    assert ratio.min() == pytest.approx(generate.COST_INFLATION, rel=1e-3)
    assert ratio.max() == pytest.approx(generate.COST_INFLATION * generate.COST_INFLATION_EXPENSIVE, rel=1e-3)
    assert drifted["all"]["click_cost"].mean() > generate.COST_INFLATION * base["click_cost"].mean()
    for name in ("fraud_mix", "all"):
        share = drifted[name]["scenario"].value_counts(normalize=True)
        assert share["stealth_bot"] > 2 * base["scenario"].value_counts(normalize=True)["stealth_bot"]
        assert drifted[name]["is_fraud"].mean() > base["is_fraud"].mean() + 0.01
    for name in ("new_bot", "all"):
        bots = drifted[name][drifted[name]["scenario"] == "new_bot"]
        assert len(bots) == pytest.approx(0.02 * 30_000, rel=0.01)
        assert bots["user_agent"].str.startswith("Dalvik/").all()
        assert not base["user_agent"].str.startswith("Dalvik/").any()
    # Options that do not touch a property leave it as it was
    assert set(drifted["cost_inflation"]["campaign_id"]) <= base_campaigns
    assert drifted["new_campaigns"]["click_cost"].mean() == pytest.approx(base["click_cost"].mean(), rel=0.1)
    assert "new_bot" not in set(drifted["fraud_mix"]["scenario"])
    for name in generate.DRIFTS[1:]:
        described = drifted[f"{name}.result"]["drift"]
        assert described["name"] == name and described["description"] and described["changes"]
    assert len(drifted["all.result"]["drift"]["changes"]) == 4


def per_ip_features(events: pd.DataFrame) -> pd.DataFrame:
    """Simple per-IP aggregates (over the whole window) joined back onto each event."""
    ip = events.groupby("ip_address").agg(
        ip_clicks=("event_id", "size"),
        ip_devices=("device_id", "nunique"),
        ip_campaigns=("campaign_id", "nunique"),
        ip_agents=("user_agent", "nunique"),
    )
    gap = events.groupby("ip_address")["click_time"].diff().dt.total_seconds()
    features = events[["ip_address"]].join(ip, on="ip_address").drop(columns="ip_address")
    features["ip_gap_s"] = gap.fillna(1e7).to_numpy()
    features["hour"] = events["click_time"].dt.hour
    features["cost"] = events["click_cost"]
    features["keyword"] = events["keyword_type"].map({k: i for i, k in enumerate(generate.KEYWORD_TYPES)})
    features["browser"] = events["user_agent"].str.startswith("Mozilla/").astype(int)
    return features


def test_fraud_is_learnable_from_simple_features(dataset):
    """A quick boosted model on per-IP aggregates ranks test-split fraud well (AUC > 0.8)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    _, result, events = dataset
    features, label = per_ip_features(events), events["is_fraud"].to_numpy()
    train, test = slice(0, int(0.7 * ROWS)), slice(int(0.85 * ROWS), ROWS)
    model = HistGradientBoostingClassifier(max_iter=100, random_state=0)
    model.fit(features.iloc[train], label[train])
    auc = roc_auc_score(label[test], model.predict_proba(features.iloc[test])[:, 1])
    assert auc > 0.8
    assert auc <= result["bayes_auc_by_split"]["test"] + 0.02


def test_smoke_test_flag(tmp_path: Path):
    """--smoke-test writes a few thousand rows whatever --rows says."""
    result = run_cli(tmp_path / "smoke", "--smoke-test", "--rows", "10000000")
    assert result["rows"] == generate.SMOKE_TEST_ROWS
    tables = [pq.read_table(p) for p in part_files(tmp_path / "smoke")]
    assert pa.concat_tables(tables).num_rows == result["rows"]
