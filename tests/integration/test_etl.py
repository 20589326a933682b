"""The Spark ETL: past-only features, deterministic ordering, vocabularies from train only."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from jobs import etl
from jobs.common import datasets, features, storage

pytestmark = pytest.mark.slow

FEATURE_COLUMNS = features.numeric_features(datasets.SYNTHETIC) + list(datasets.SYNTHETIC.categorical)


@pytest.fixture(scope="module")
def raw_uri(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("raw") / "events"
    subprocess.run([sys.executable, "-m", "jobs.generate", "--output", str(out), "--rows", "4000", "--seed", "5",
                    "--days", "2", "--result-path", str(out.parent / "gen.json")], check=True)
    return str(out)


def all_features(features_uri: str) -> pd.DataFrame:
    frames = [storage.read_table(storage.join(features_uri, s)).to_pandas().assign(_split=s) for s in etl.SPLITS]
    return pd.concat(frames).sort_values("event_id").set_index("event_id")


@pytest.fixture(scope="module")
def full(raw_uri, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("features") / "full")
    result = etl.run(raw_uri, out, datasets.SYNTHETIC, partitions=3)
    return result, all_features(out)


def test_every_event_is_kept_and_split_by_time(full):
    result, frame = full
    assert result["rows_in"] == result["rows_out"] == len(frame) == 4000
    counts = frame["_split"].value_counts()
    assert counts["train"] == pytest.approx(2800, abs=5)
    assert counts["validation"] == pytest.approx(600, abs=5)
    # Time split: every training event is no later than any validation event, and so on.
    t = frame.groupby("_split")["click_time"].agg(["min", "max"])
    assert t.loc["train", "max"] <= t.loc["validation", "min"]
    assert t.loc["validation", "max"] <= t.loc["test", "min"]


def test_window_counts_include_the_event_and_are_monotone_in_the_window(full):
    _, frame = full
    assert (frame["ip_clicks_1m"] >= 1).all()
    assert (frame["ip_clicks_1m"] <= frame["ip_clicks_1h"]).all()
    assert (frame["ip_clicks_1h"] <= frame["ip_clicks_1d"]).all()
    assert (frame["ip_device_clicks_1h"] <= frame["ip_clicks_1h"]).all()
    assert (frame["ip_distinct_devices"] >= 1).all()
    assert (frame["ip_secs_since_prev"] > 0).all()


def test_counts_match_a_pandas_recount(full, raw_uri):
    """Clicks per IP in the last hour, recomputed naively, for a sample of events."""
    _, frame = full
    raw = storage.read_table(raw_uri).to_pandas().sort_values(["click_time", "event_id"])
    sample = frame.sample(200, random_state=1)
    for event_id, row in sample.iterrows():
        same_ip = raw[raw["ip_address"] == raw.loc[raw["event_id"] == event_id, "ip_address"].iloc[0]]
        t = row["click_time"]
        earlier = same_ip[(same_ip["click_time"] >= t - pd.Timedelta(hours=1)) &
                          ((same_ip["click_time"] < t) |
                           ((same_ip["click_time"] == t) & (same_ip["event_id"] <= event_id)))]
        assert row["ip_clicks_1h"] == pytest.approx(len(earlier), abs=0), event_id


def test_no_leakage_features_do_not_change_when_later_events_are_deleted(full, raw_uri, tmp_path):
    _, frame = full
    table = storage.read_table(raw_uri)
    cutoff = frame["click_time"].quantile(0.6)
    keep = pc.less_equal(table["click_time"], pa.scalar(cutoff.to_pydatetime(), type=table.schema.field("click_time").type))
    early = table.filter(keep)
    early_uri = str(tmp_path / "early_raw")
    storage.write_table(early, early_uri)
    out = str(tmp_path / "early_features")
    etl.run(early_uri, out, datasets.SYNTHETIC, partitions=2)
    truncated = all_features(out)
    assert 0 < len(truncated) < len(frame)
    pd.testing.assert_frame_equal(truncated[FEATURE_COLUMNS], frame.loc[truncated.index, FEATURE_COLUMNS],
                                  check_dtype=True)


def test_features_do_not_depend_on_partitioning(full, raw_uri, tmp_path):
    _, frame = full
    out = str(tmp_path / "more_partitions")
    etl.run(raw_uri, out, datasets.SYNTHETIC, partitions=11)
    again = all_features(out)
    pd.testing.assert_frame_equal(again[FEATURE_COLUMNS + ["_split"]], frame[FEATURE_COLUMNS + ["_split"]])


def test_vocabularies_are_learned_on_the_training_split_only(full):
    result, frame = full
    pre = features.Preprocessor.from_dict(storage.read_json(result["preprocessor_uri"]))
    train_values = set(frame.loc[frame["_split"] == "train", "campaign_id"].astype(str))
    assert set(pre.categorical["campaign_id"]) <= train_values
    later_only = set(frame.loc[frame["_split"] != "train", "user_agent"].astype(str)) - set(
        frame.loc[frame["_split"] == "train", "user_agent"].astype(str))
    assert not later_only & set(pre.categorical["user_agent"])


def test_a_column_above_the_vocabulary_cap_gets_hash_buckets(raw_uri, tmp_path, monkeypatch):
    """With the cap below user_agent's distinct count, its tail is hashed, not all sent to OOV."""
    monkeypatch.setattr(features, "MAX_VOCAB_SIZE", 20)
    result = etl.run(raw_uri, str(tmp_path / "capped"), datasets.SYNTHETIC, partitions=2)
    pre = features.Preprocessor.from_dict(storage.read_json(result["preprocessor_uri"]))
    assert result["hash_buckets"] == pre.hash_buckets
    assert pre.hash_buckets.get("user_agent") == features.HASH_BUCKETS
    assert "keyword_type" not in pre.hash_buckets  # four values: a vocabulary is enough
    assert len(pre.categorical["user_agent"]) == 20
    test = storage.read_table(storage.join(str(tmp_path / "capped"), "test")).to_pandas()
    cats, _ = pre.transform(test)
    column = pre.categorical_columns.index("user_agent")
    hashed = cats[:, column] > 20
    assert hashed.any() and (cats[:, column] < pre.cardinalities[column]).all()
