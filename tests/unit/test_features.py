"""The preprocessor maps feature tables to model inputs the same way everywhere."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest

from jobs.common import datasets, features
from jobs.common.features import OOV_INDEX, Preprocessor


@pytest.fixture
def pre() -> Preprocessor:
    return Preprocessor(
        dataset="talkingdata",
        categorical={"app": ["3", "12"], "os": ["19"]},
        numeric={"ip_clicks_1h": {"mean": 1.0, "std": 2.0}, "hour_of_day": {"mean": 0.0, "std": 1.0}},
        feature_spec_hash=features.feature_spec_hash(datasets.TALKINGDATA),
    )


def test_known_values_get_their_ids_and_unseen_or_null_get_oov(pre):
    frame = pd.DataFrame({"app": ["12", "3", "999", None], "os": ["19", "19", "7", "19"],
                          "ip_clicks_1h": [0.0, 3.0, 1.0, 2.0], "hour_of_day": [0, 1, 2, 3]})
    cats, nums = pre.transform(frame)
    assert cats.dtype == np.int64 and nums.dtype == np.float32
    assert cats[:, 0].tolist() == [2, 1, OOV_INDEX, OOV_INDEX]
    assert cats[:, 1].tolist() == [1, 1, OOV_INDEX, 1]
    # log1p, then (x - mean) / std
    assert nums[1, 0] == pytest.approx((np.log1p(3.0) - 1.0) / 2.0)
    assert nums[0, 1] == pytest.approx(0.0)


def test_cardinalities_count_the_oov_bucket(pre):
    assert pre.cardinalities == [3, 2]


def test_round_trip_keeps_input_order_even_when_keys_are_sorted(pre):
    payload = json.loads(json.dumps(pre.to_dict(), sort_keys=True))
    back = Preprocessor.from_dict(payload)
    assert back.categorical_columns == ["app", "os"]
    assert back.numeric_columns == ["ip_clicks_1h", "hour_of_day"]
    frame = pd.DataFrame({"app": ["3"], "os": ["19"], "ip_clicks_1h": [5.0], "hour_of_day": [4.0]})
    np.testing.assert_array_equal(back.transform(frame)[0], pre.transform(frame)[0])


def test_missing_feature_column_is_named(pre):
    with pytest.raises(KeyError, match="hour_of_day"):
        pre.transform(pd.DataFrame({"app": ["3"], "os": ["19"], "ip_clicks_1h": [1.0]}))


def test_constant_column_gets_unit_std():
    stats = features.numeric_stats(log_sum=5.0, log_sq_sum=5.0, count=5)
    assert stats == {"mean": 1.0, "std": 1.0}


def test_feature_spec_hash_differs_between_datasets():
    assert features.feature_spec_hash(datasets.SYNTHETIC) != features.feature_spec_hash(datasets.TALKINGDATA)


def test_label_meaning_is_declared_per_dataset():
    assert datasets.TALKINGDATA.label == "is_attributed" and not datasets.TALKINGDATA.positive_is_fraud
    assert datasets.SYNTHETIC.label == "is_fraud" and datasets.SYNTHETIC.positive_is_fraud
    # The download time is known only after the label: never a feature.
    assert "attributed_time" in datasets.TALKINGDATA.withheld
    assert "attributed_time" not in features.numeric_features(datasets.TALKINGDATA)
    for oracle in datasets.SYNTHETIC.oracle:
        assert oracle not in features.numeric_features(datasets.SYNTHETIC)
        assert oracle not in datasets.SYNTHETIC.categorical


@pytest.fixture
def hashed(pre) -> Preprocessor:
    return Preprocessor.from_dict({**pre.to_dict(), "hash_buckets": {"app": 16}})


def test_unseen_values_of_a_hashed_column_get_stable_bucket_ids(hashed):
    frame = pd.DataFrame({"app": ["12", "999", "1000", None, "", "999"], "os": ["19", "7", "19", "19", "19", "19"],
                          "ip_clicks_1h": [0.0] * 6, "hour_of_day": [0] * 6})
    cats, _ = hashed.transform(frame)
    # Vocabulary ids first, then 16 hashed ids after the 2 known values and the OOV id.
    assert hashed.cardinalities == [3 + 16, 2]
    assert cats[0, 0] == 2
    assert cats[1, 0] == 3 + features.hash_bucket("999", 16) == cats[5, 0]
    assert 3 <= cats[2, 0] < 19
    assert cats[3, 0] == cats[4, 0] == OOV_INDEX
    # The column without buckets still sends unseen values to the OOV id.
    assert cats[1, 1] == OOV_INDEX
    # CRC-32, not Python's per-process salted hash: the same id in every process.
    assert features.hash_bucket("999", 16) == zlib.crc32(b"999") % 16


def test_online_encoder_hashes_like_the_batch_preprocessor(hashed):
    from jobs.online_features import InputEncoder

    values = ["12", "3", "999", "abc", None, "77"]
    frame = pd.DataFrame({"app": values, "os": ["19"] * 6, "ip_clicks_1h": [1.0] * 6, "hour_of_day": [3] * 6})
    batch, _ = hashed.transform(frame)
    online, _ = InputEncoder(hashed).encode({c: list(frame[c]) for c in frame.columns})
    assert np.array_equal(batch, online)


def test_preprocessors_written_before_hashing_load_without_buckets(pre):
    payload = pre.to_dict()
    del payload["hash_buckets"]
    assert Preprocessor.from_dict(payload).hash_buckets == {}
