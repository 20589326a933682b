"""The drift stage on small feature tables, with a real Evidently run and MLflow store.

Expected behaviour: too few rows never signal drift; columns constant on both sides are
left out so the drift share stays defined; a shifted table drifts and the same
distribution does not; the reference can be the champion's training split.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from jobs import drift
from jobs.common import datasets, features

# Evidently's correlation widgets divide by a zero std on constant columns; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SPEC = datasets.get("synthetic")
NUMERIC = features.numeric_features(SPEC)
# What the check compares: inputs whose distribution does not depend on history length.
MONITORED = features.drift_numeric(SPEC)
HISTORY_DEPENDENT = [c for c in NUMERIC if c not in MONITORED]
CATEGORICAL = list(SPEC.categorical)
CAMPAIGNS = [f"cmp-{i:04d}" for i in range(8)]


def feature_table(rows: int, seed: int, shift: float = 0.0, constant: dict | None = None) -> pd.DataFrame:
    """A feature table with the model's input columns; ``shift`` moves every numeric column
    by that many standard deviations and swaps the campaign mix."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({name: rng.lognormal(mean=1.0 + shift, sigma=0.5, size=rows) for name in NUMERIC})
    campaigns = CAMPAIGNS[4:] if shift else CAMPAIGNS[:4]
    frame["campaign_id"] = rng.choice(campaigns, size=rows)
    frame["ad_group"] = rng.choice(["ag-1", "ag-2", "ag-3"], size=rows)
    frame["keyword_type"] = rng.choice(["brand", "generic", "competitor", "premium"], size=rows)
    frame["user_agent"] = rng.choice(["ua-a", "ua-b"], size=rows)
    frame["ip_subnet"] = rng.choice(["10.0.0", "10.0.1"], size=rows)
    for name, value in (constant or {}).items():
        frame[name] = value
    return frame


def write(frame: pd.DataFrame, path) -> str:
    path.mkdir(parents=True)
    frame.to_parquet(path / "part-00000.parquet", index=False)
    return str(path)


def run_drift(tmp_path, *args: str) -> dict:
    result_path = tmp_path / "result.json"
    drift.main([*args, "--dataset", "synthetic", "--output", str(tmp_path / "report"),
                "--result-path", str(result_path), "--run-id", "test"])
    return json.loads(result_path.read_text())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One ADFRAUD_HOME (and SQLite MLflow store) for the module: creating a store is slow."""
    home = tmp_path_factory.mktemp("drift-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADFRAUD_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield home


@pytest.fixture
def reference(tmp_path) -> str:
    return write(feature_table(800, seed=1), tmp_path / "reference")


def test_too_few_current_rows_is_insufficient_data_and_never_drift(store, tmp_path, reference):
    current = write(feature_table(120, seed=2, shift=3.0), tmp_path / "current")
    result = run_drift(tmp_path, "--reference", reference, "--current", current, "--min-rows", "500")
    assert result["status"] == drift.STATUS_INSUFFICIENT
    assert result["drift_detected"] is False and result["drift_share"] is None
    assert result["current_rows"] == 120 and result["reference_rows"] == 800
    assert result["report_html_uri"] is None and not (tmp_path / "report").exists()


def test_too_few_reference_rows_is_insufficient_data(store, tmp_path):
    small = write(feature_table(300, seed=1), tmp_path / "reference")
    current = write(feature_table(800, seed=2, shift=3.0), tmp_path / "current")
    result = run_drift(tmp_path, "--reference", small, "--current", current, "--min-rows", "500")
    assert result["status"] == drift.STATUS_INSUFFICIENT and result["drift_detected"] is False


def test_same_distribution_does_not_drift(store, tmp_path):
    """Batches of a realistic size (over 1,000 rows: Evidently's distance tests, not
    p-values, which flag 5% of identical columns by chance)."""
    reference = write(feature_table(2_000, seed=1), tmp_path / "reference")
    current = write(feature_table(2_000, seed=2), tmp_path / "current")
    result = run_drift(tmp_path, "--reference", reference, "--current", current)
    assert result["status"] == drift.STATUS_OK
    assert result["columns_tested"] == len(MONITORED) + len(CATEGORICAL)
    assert result["history_dependent_columns"] == HISTORY_DEPENDENT
    assert result["drift_share"] < drift.DEFAULT_THRESHOLD and result["drift_detected"] is False
    assert (tmp_path / "report" / "drift_report.html").stat().st_size > 10_000


def test_shifted_features_drift_and_reports_go_to_mlflow(store, tmp_path, reference):
    import mlflow

    current = write(feature_table(800, seed=2, shift=1.0), tmp_path / "current")
    result = run_drift(tmp_path, "--reference", reference, "--current", current, "--threshold", "0.5")
    assert result["drift_detected"] is True
    # Every numeric column moved and the campaign mix changed.
    assert result["drifted_columns"] >= len(MONITORED) + 1
    assert result["drift_share"] == pytest.approx(result["drifted_columns"] / result["columns_tested"])
    json_report = json.loads((tmp_path / "report" / "drift_report.json").read_text())
    assert drift.drift_share(json_report)[1] == pytest.approx(result["drift_share"])
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.data.metrics["drift_share"] == pytest.approx(result["drift_share"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "drift")}
    assert artifacts == {"drift/drift_report.html", "drift/drift_report.json"}


def test_constant_columns_are_left_out_and_the_share_stays_defined(store, tmp_path):
    constant = {"click_cost": 0.25, "hour_of_day": 3.0, "keyword_type": "brand"}
    ref = write(feature_table(800, seed=1, constant=constant), tmp_path / "reference")
    cur = write(feature_table(800, seed=2, constant=constant), tmp_path / "current")
    result = run_drift(tmp_path, "--reference", ref, "--current", cur)
    assert sorted(result["constant_columns"]) == sorted(constant)
    assert result["columns_tested"] == len(MONITORED) + len(CATEGORICAL) - len(constant)
    assert math.isfinite(result["drift_share"]) and 0.0 <= result["drift_share"] < drift.DEFAULT_THRESHOLD


def test_every_column_constant_gives_share_zero_without_a_report(store, tmp_path):
    constant = {name: 1.0 for name in NUMERIC} | {name: "x" for name in CATEGORICAL}
    ref = write(feature_table(600, seed=1, constant=constant), tmp_path / "reference")
    cur = write(feature_table(600, seed=2, constant=constant), tmp_path / "current")
    result = run_drift(tmp_path, "--reference", ref, "--current", cur)
    assert result["status"] == drift.STATUS_OK
    assert result["drift_share"] == 0.0 and result["columns_tested"] == 0 and result["drift_detected"] is False
    assert len(result["constant_columns"]) == len(MONITORED) + len(CATEGORICAL)


def test_a_column_constant_on_each_side_at_different_values_drifts(store, tmp_path):
    """Constant per side is not constant overall: it is tested, and the share is defined."""
    ref = write(feature_table(800, seed=1, constant={"click_cost": 0.25}), tmp_path / "reference")
    cur = write(feature_table(800, seed=2, constant={"click_cost": 0.75}), tmp_path / "current")
    result = run_drift(tmp_path, "--reference", ref, "--current", cur)
    assert result["constant_columns"] == []
    assert result["drifted_columns"] >= 1 and math.isfinite(result["drift_share"])


def test_several_current_tables_are_read_as_one(store, tmp_path, reference):
    parts = [write(feature_table(300, seed=s), tmp_path / f"current-{s}") for s in (2, 3)]
    result = run_drift(tmp_path, "--reference", reference, "--current", *parts, "--min-rows", "500")
    assert result["current_rows"] == 600 and result["status"] == drift.STATUS_OK


def test_reference_model_uses_the_champions_training_split(store, tmp_path):
    from mlflow import MlflowClient

    from jobs.common import tracking

    features_uri = tmp_path / "features"
    write(feature_table(800, seed=1), features_uri / "train")
    tracking.configure()
    client = MlflowClient()
    client.create_registered_model("adfraud-drift-reference")
    version = client.create_model_version("adfraud-drift-reference", source=str(tmp_path),
                                          tags={tracking.TAG_DATA_URI: str(features_uri)})
    client.set_registered_model_alias("adfraud-drift-reference", "champion", version.version)
    current = write(feature_table(800, seed=2, shift=1.0), tmp_path / "current")

    result = run_drift(tmp_path, "--reference-model", "adfraud-drift-reference", "--current", current)
    assert result["reference_uri"] == str(features_uri / "train")
    assert result["reference_version"] == int(version.version)
    assert result["drift_detected"] is True


def test_no_champion_means_no_reference_and_no_drift(store, tmp_path):
    current = write(feature_table(800, seed=2, shift=1.0), tmp_path / "current")
    result = run_drift(tmp_path, "--reference-model", "adfraud-never-registered", "--current", current)
    assert result["status"] == drift.STATUS_NO_REFERENCE
    assert result["drift_detected"] is False and result["reference_uri"] is None


def test_threshold_outside_the_unit_interval_is_refused(store, tmp_path, reference, capsys):
    with pytest.raises(SystemExit) as info:
        drift.main(["--reference", reference, "--current", reference, "--dataset", "synthetic",
                    "--output", str(tmp_path / "out"), "--threshold", "1.5"])
    assert info.value.code == 2
    assert "--threshold must be in (0, 1]" in capsys.readouterr().err


def test_history_dependent_features_do_not_count_as_drift(store, tmp_path):
    """Gaps, distinct counts so far and day windows restart with a batch's history: moving
    only them, by a lot, is no drift."""
    reference = write(feature_table(2_000, seed=1), tmp_path / "reference")
    current = feature_table(2_000, seed=2)
    for name in HISTORY_DEPENDENT:
        current[name] = current[name] * 50.0
    result = run_drift(tmp_path, "--reference", reference, "--current", write(current, tmp_path / "current"))
    assert {"ip_secs_since_prev", "ip_distinct_apps", "ip_clicks_1d"} <= set(HISTORY_DEPENDENT)
    assert result["drifted_columns"] == 0 and result["drift_detected"] is False
