"""The retraining DAG runs end to end through Airflow, on synthetic and real clicks.

Each test runs ``airflow dags test`` in a fresh AIRFLOW_HOME and ADFRAUD_HOME: every task
is a real stage (Spark, Ray Tune, torchrun, MLflow, onnxruntime, Evidently).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DAG_RUN_TIMEOUT_S = 900


def run_dag(tmp_path: Path, conf: dict) -> dict:
    """Run the DAG once and return its summary.json."""
    home = tmp_path / "home"
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "ADFRAUD_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    })
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "run_dag.sh"), json.dumps(conf)],
        env=env, capture_output=True, text=True, timeout=DAG_RUN_TIMEOUT_S, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = list((home / "runs").glob("*/summary.json"))
    assert len(summaries) == 1, summaries
    summary = json.loads(summaries[0].read_text())
    summary["_home"] = str(home)
    summary["_stdout"] = proc.stdout
    return summary


def assert_registered(summary: dict, model_name: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{summary['_home']}/mlflow.db")
    client = MlflowClient()
    champion = client.get_model_version_by_alias(model_name, "champion")
    challenger = client.get_model_version_by_alias(model_name, "challenger")
    assert int(champion.version) == int(challenger.version) == summary["model_version"] == 1
    assert champion.tags["adfraud.gate"] == "passed"
    assert champion.tags["adfraud.dag_run_id"] == summary["run_id"]
    artifacts = {a.path for a in client.list_artifacts(champion.run_id, "onnx")}
    assert "onnx/model.onnx" in artifacts


def test_dag_on_small_synthetic_data(tmp_path):
    summary = run_dag(tmp_path, {"rows": 20_000, "trials": 2, "tune_epochs": 1, "epochs": 3, "seed": 11})
    assert summary["source"] == "synthetic"
    assert summary["rows"] == 20_000
    assert sum(summary["splits"].values()) == 20_000
    assert 0.01 < summary["true_fraud_rate"] < 0.2
    assert summary["test_auc"] > 0.85
    assert summary["test_auc"] <= summary["test_bayes_auc"] + 0.02
    assert summary["aliases"] == ["challenger", "champion"]
    assert summary["auto_approved"] is True
    assert summary["live_version"] == 1
    assert summary["onnx_parity_passed"] is True and summary["onnx_max_abs_diff"] <= 1e-5
    assert summary["drift_status"] == "ok"
    report = Path(summary["drift_report"])
    assert report.exists() and report.stat().st_size > 10_000
    assert "test_auc" in summary["_stdout"]
    assert_registered(summary, "adfraud-synthetic")
    serving = json.loads((Path(summary["_home"]) / "serving" / "current.json").read_text())
    assert serving["version"] == 1 and Path(serving["onnx_uri"]).exists()
    # The server blocks at the threshold evaluate chose on validation; no GPU, no engine.
    evaluation = json.loads(next((Path(summary["_home"]) / "runs").glob("*/evaluation/metrics.json")).read_text())
    assert serving["threshold"] == pytest.approx(evaluation["test_fraud_threshold"])
    assert serving["tensorrt_uri"] is None
    assert set(evaluation["segments"]) == {"keyword_type", "device_class"}


def test_dag_on_talkingdata_sample(tmp_path, talkingdata_sample):
    """The real sample: test AUC on the last 15% of clicks by time is at least 0.95."""
    summary = run_dag(tmp_path, {"source": "talkingdata", "input_path": str(talkingdata_sample),
                                 "trials": 2, "tune_epochs": 2, "epochs": 6})
    assert summary["rows"] == 100_000
    assert summary["rows_quarantined"] == 0
    assert summary["splits"]["test"] == 15_000
    assert summary["test_positives"] == 35
    assert summary["test_auc"] >= 0.95
    assert_registered(summary, "adfraud-talkingdata")
