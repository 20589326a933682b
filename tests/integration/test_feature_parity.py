"""Training/serving parity: the online features and scores equal the batch ones.

A small model is built end to end once per module: the first 20k rows of the TalkingData
sample in the raw layout, ``jobs.etl`` (Spark), one epoch of ``training.fit``, ONNX
export. Then every event is replayed in time order through the online feature store and
compared with the ETL's feature table, and the test split's scores from online features
with the batch scores. ``jobs.score`` (Spark again) scores the same events plus a block
of events crowded onto tie and window boundaries, without label columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from jobs.common import features, storage
from jobs.common.datasets import TALKINGDATA
from jobs.common.features import Preprocessor
from jobs.online_features import (
    DEFAULT_LATENESS_S,
    FeaturePlan,
    InputEncoder,
    MemoryFeatureStore,
    OnlineFeatures,
)
from tests.unit.test_online_features import running_redis, tie_heavy_events

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CSV = REPO.parent / "shared" / "data" / "talkingdata" / "train_sample.csv"
ROWS = 20_000
SPEC = TALKINGDATA
DERIVED = features.derived_numeric(SPEC)
# Tie-heavy events for the score stage: ids, IPs and times clear of the sample's.
TIE_EVENTS = 1_500
TIE_ID_OFFSET = 10**8
TIE_IP_OFFSET = 10**9
TIE_SHIFT_US = 365 * 86_400 * 1_000_000


def raw_sample(rows: int) -> pa.Table:
    """The first ``rows`` of the sample in the raw layout (event_id = row number)."""
    frame = pd.read_csv(SAMPLE_CSV, nrows=rows)
    frame.insert(0, "event_id", np.arange(len(frame), dtype=np.int64))
    for column in ("click_time", "attributed_time"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return pa.Table.from_pandas(frame, schema=SPEC.arrow_schema(), preserve_index=False)


def ort_scores(onnx_path: str, cats: np.ndarray, nums: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    return session.run(["probability"], {"categorical": cats, "numeric": nums})[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """Raw events, the ETL's splits, a one-epoch model and its ONNX file and serving config."""
    if not SAMPLE_CSV.exists():
        pytest.skip(f"{SAMPLE_CSV} is not there")
    from jobs import etl
    from jobs.common.model import predict_proba
    from jobs.common.training import TrainConfig, fit, load_split
    from jobs.export import export_onnx

    root = tmp_path_factory.mktemp("parity")
    raw = raw_sample(ROWS)
    raw_uri = str(root / "raw")
    storage.write_table(raw, raw_uri)
    features_uri = str(root / "features")
    etl_result = etl.run(raw_uri, features_uri, SPEC, partitions=4)

    pre = Preprocessor.from_dict(storage.read_json(etl_result["preprocessor_uri"]))
    _, train = load_split(etl_result["train_uri"], SPEC, pre)
    _, validation = load_split(etl_result["validation_uri"], SPEC, pre)
    test_frame, test = load_split(etl_result["test_uri"], SPEC, pre)
    net, _ = fit(
        TrainConfig(epochs=1, hidden=[32, 16], batch_size=512), pre, train, validation, num_threads=1
    )
    onnx_path = str(root / "model.onnx")
    export_onnx(net, test.categorical.shape[1], test.numeric.shape[1], onnx_path)
    config = {
        "model_name": "adfraud-talkingdata",
        "version": 1,
        "dataset": SPEC.name,
        "onnx_uri": onnx_path,
        "preprocessor_uri": etl_result["preprocessor_uri"],
        "feature_spec_hash": pre.feature_spec_hash,
    }
    config_path = root / "serving.json"
    config_path.write_text(json.dumps(config))
    batch = pd.concat([storage.read_table(etl_result[f"{s}_uri"]).to_pandas() for s in etl.SPLITS])
    return {
        "root": root,
        "raw": raw,
        "raw_uri": raw_uri,
        "pre": pre,
        "onnx": onnx_path,
        "config": str(config_path),
        "batch_features": batch.set_index(SPEC.event_id).sort_index(),
        "test_frame": test_frame,
        "test": test,
        "torch_test_scores": predict_proba(net, test.categorical, test.numeric),
    }


def replay(pipeline: dict, store) -> pd.DataFrame:
    online = OnlineFeatures(SPEC, store)
    return pd.DataFrame(online.replay(pipeline["raw"])).set_index(SPEC.event_id).sort_index()


@pytest.fixture(params=["memory", "redis"])
def store(request, tmp_path):
    plan = FeaturePlan.build(DEFAULT_LATENESS_S)
    if request.param == "memory":
        yield MemoryFeatureStore(plan)
        return
    from jobs.online_features import RedisFeatureStore

    with running_redis(tmp_path / "redis") as url:
        redis_store = RedisFeatureStore(url, plan, "parity")
        yield redis_store
        redis_store.close()


def test_online_features_equal_the_etl(pipeline, store):
    """Every event replayed in time order gets the ETL's features: max |diff| = 0."""
    online = replay(pipeline, store)
    batch = pipeline["batch_features"]
    assert list(online.index) == list(batch.index) and len(online) == ROWS
    diffs = {c: float(np.max(np.abs(online[c].to_numpy(float) - batch[c].to_numpy(float)))) for c in DERIVED}
    print(f"\n[{store.name}] max |online - etl| per feature over {ROWS} events: {diffs}")
    assert max(diffs.values()) == 0.0, diffs
    for column in SPEC.categorical:
        assert (online[column].astype("string") == batch[column].astype("string")).all(), column


def test_online_scores_equal_batch_scores_on_the_test_split(pipeline):
    """Test-split scores from online features (list encoder, ONNX) equal the batch path's
    (ETL features, Preprocessor.transform, ONNX) and PyTorch's within export tolerance."""
    online = replay(pipeline, MemoryFeatureStore(FeaturePlan.build(DEFAULT_LATENESS_S)))
    test_ids = pipeline["test_frame"][SPEC.event_id].to_numpy()
    rows = online.loc[test_ids].reset_index()
    cats, nums = InputEncoder(pipeline["pre"]).encode({c: rows[c].tolist() for c in rows.columns})
    np.testing.assert_array_equal(cats, pipeline["test"].categorical)
    assert nums.tobytes() == pipeline["test"].numeric.tobytes()
    online_scores = ort_scores(pipeline["onnx"], cats, nums)
    batch_scores = ort_scores(pipeline["onnx"], pipeline["test"].categorical, pipeline["test"].numeric)
    vs_batch = float(np.max(np.abs(online_scores - batch_scores)))
    vs_torch = float(np.max(np.abs(online_scores - pipeline["torch_test_scores"])))
    print(
        f"\nscores on {len(rows)} test events: max |online onnx - batch onnx| = {vs_batch:.3g}, "
        f"max |online onnx - batch torch| = {vs_torch:.3g}"
    )
    assert vs_batch == 0.0
    assert vs_torch < 1e-5


def test_score_stage_matches_online_scoring(pipeline):
    """``jobs.score`` on unlabelled events (the sample plus tie-heavy ones): its Spark
    features equal the online ones event for event, and its scores the online scores."""
    from jobs import score

    raw = pipeline["raw"].drop_columns([SPEC.label, *SPEC.withheld])
    ties = pd.DataFrame(tie_heavy_events(TIE_EVENTS, seed=21))
    ties["event_id"] += TIE_ID_OFFSET
    ties["ip"] += TIE_IP_OFFSET
    ties["click_time"] = pd.to_datetime(ties["click_time"] + TIE_SHIFT_US, unit="us", utc=True)
    schema = pa.schema([f for f in SPEC.arrow_schema() if f.name in raw.column_names])
    raw = pa.concat_tables(
        [raw, pa.Table.from_pandas(ties[raw.column_names], schema=schema, preserve_index=False)]
    )
    root = pipeline["root"]
    storage.write_table(raw, str(root / "unlabelled"))

    result = score.run(
        pipeline["config"], str(root / "unlabelled"), str(root / "scores"), include_features=True
    )
    assert result["rows"] == raw.num_rows and "fraud_auc" not in result
    scored = storage.read_table(str(root / "scores")).to_pandas().set_index(SPEC.event_id).sort_index()

    online = OnlineFeatures(SPEC, MemoryFeatureStore(FeaturePlan.build(DEFAULT_LATENESS_S)))
    columns = online.replay(raw)
    cats, nums = InputEncoder(pipeline["pre"]).encode(columns)
    expected = (
        pd.DataFrame(
            {
                SPEC.event_id: columns[SPEC.event_id],
                "probability": ort_scores(pipeline["onnx"], cats, nums),
                **{c: columns[c] for c in DERIVED},
            }
        )
        .set_index(SPEC.event_id)
        .sort_index()
    )
    feature_diff = max(
        float(np.max(np.abs(scored[c].to_numpy(float) - expected[c].to_numpy(float)))) for c in DERIVED
    )
    score_diff = float(np.max(np.abs(scored["probability"].to_numpy() - expected["probability"].to_numpy())))
    print(
        f"\nscore stage on {raw.num_rows} events ({TIE_EVENTS} tie-heavy): max feature diff {feature_diff}, "
        f"max score diff {score_diff:.3g}"
    )
    assert feature_diff == 0.0 and score_diff == 0.0
    np.testing.assert_allclose(scored["fraud_score"], 1.0 - scored["probability"], atol=1e-6)
    assert (scored["flagged"] == (scored["fraud_score"] >= result["threshold"])).all()
