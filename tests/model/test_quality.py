"""Minimum quality on real clicks: the neural model against the LightGBM baseline.

The TalkingData sample's test split (the last 15% of clicks by time) has 35 attributed
clicks, so one seed's AUC moves by about as much as the gap between the two model
families. Both models are therefore trained with the same five seeds on the same ETL
output, as ``bench/bench_quality.py`` reports them: the means are compared, and each
seed's pair.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from tests.conftest import run_stage

pytestmark = [pytest.mark.slow]

SEEDS = (7, 17, 27, 37, 47)


@pytest.fixture(scope="module")
def talkingdata_features(tmp_path_factory, talkingdata_sample) -> str:
    """The sample through ingest and the Spark ETL, once for the module."""
    tmp = tmp_path_factory.mktemp("quality")
    for cmd in (
        ["jobs.ingest", "--input", str(talkingdata_sample), "--output", str(tmp / "raw")],
        ["jobs.etl", "--input", str(tmp / "raw"), "--output", str(tmp / "features"), "--dataset", "talkingdata"],
    ):
        proc = run_stage(*cmd, result=tmp / "r.json")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return str(tmp / "features")


@pytest.fixture(scope="module")
def scores(talkingdata_features, tmp_path_factory) -> dict[str, list[dict]]:
    """Test and validation metrics of both models for every seed."""
    from jobs import baseline
    from jobs.common import datasets, metrics, storage
    from jobs.common.features import Preprocessor
    from jobs.common.model import predict_proba
    from jobs.common.training import TrainConfig, fit, load_split

    pre = Preprocessor.from_dict(storage.read_json(storage.join(talkingdata_features, "preprocessor.json")))
    spec = datasets.get(pre.dataset)
    splits = {name: load_split(storage.join(talkingdata_features, name), spec, pre)[1]
              for name in ("train", "validation", "test")}
    out = {"neural": [], "lightgbm": []}
    for seed in SEEDS:
        net, _ = fit(TrainConfig(seed=seed), pre, splits["train"], splits["validation"], num_threads=2)
        row = {}
        for name in ("validation", "test"):
            m = metrics.ranking_metrics(splits[name].label, predict_proba(net, splits[name].categorical,
                                                                          splits[name].numeric))
            row.update({f"{name}_auc": m["auc"], f"{name}_pr_auc": m["pr_auc"]})
        out["neural"].append(row)
        args = argparse.Namespace(features=talkingdata_features, output=str(tmp_path_factory.mktemp(f"gbdt{seed}")),
                                  seed=seed, rounds=1000, early_stopping_rounds=50, balanced=False,
                                  mlflow_run_id=None)
        out["lightgbm"].append(baseline.run(args))
    return out


def mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def test_test_split_has_the_35_attributed_clicks(talkingdata_features):
    from jobs.common import storage

    test = storage.read_table(storage.join(talkingdata_features, "test")).to_pandas()
    assert len(test) == 15_000
    assert int(test["is_attributed"].sum()) == 35


def test_neural_model_ranks_at_least_as_well_as_lightgbm(scores):
    """Mean test AUC and PR-AUC over the seeds: the network's are at least LightGBM's."""
    neural, gbdt = scores["neural"], scores["lightgbm"]
    assert mean(neural, "test_auc") >= mean(gbdt, "test_auc")
    assert mean(neural, "test_pr_auc") >= mean(gbdt, "test_pr_auc")
    # Not by luck of one seed: every network is above the 0.99 floor...
    assert min(r["test_auc"] for r in neural) >= 0.99
    # ...and at least LightGBM's with the same seed, as in one DAG run, on at least 4 of the
    # 5 seeds (all 5 when this was written; the closest margin was 0.0004, half a click).
    wins = [seed for seed, n, g in zip(SEEDS, neural, gbdt, strict=True) if n["test_auc"] >= g["test_auc"]]
    assert len(wins) >= 4, f"the network wins only with seeds {wins}"


def test_neural_model_is_better_on_the_validation_split(scores):
    """Validation (the 15% before the test split) is harder for both; the network leads there."""
    assert mean(scores["neural"], "validation_auc") > mean(scores["lightgbm"], "validation_auc") + 0.005
