"""The drift check on real batches: a clean day of traffic is no drift, a drifted one is.

The reference is a week of synthetic events through the Spark ETL; each batch is the
next day from the same generator (same seed: the same campaigns, IPs and devices),
featurized on its own as the drift DAG does, and compared by ``jobs.drift``.
"""

from __future__ import annotations

import json

import pytest

from jobs import drift
from tests.conftest import run_stage

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# The same traffic rate on both sides: per-IP window counts scale with it.
EVENTS_PER_DAY = 10_000


def stage(tmp_path, module: str, *args: str) -> dict:
    result = tmp_path / f"{module}.json"
    proc = run_stage(module, *args, result=result)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text())


def features(tmp_path, name: str, *generate_args: str) -> str:
    raw, out = str(tmp_path / f"{name}-raw"), str(tmp_path / f"{name}-features")
    stage(tmp_path, "jobs.generate", "--output", raw, "--seed", "7", *generate_args)
    stage(tmp_path, "jobs.etl", "--input", raw, "--output", out, "--dataset", "synthetic")
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("reference")
    return features(tmp, "week", "--rows", str(7 * EVENTS_PER_DAY), "--days", "7",
                    "--start", "2026-11-01T00:00:00Z") + "/train"


def check(tmp_path, reference: str, batch: str) -> dict:
    splits = [f"{batch}/{s}" for s in ("train", "validation", "test")]
    return stage(tmp_path, "jobs.drift", "--reference", reference, "--current", *splits, "--dataset", "synthetic",
                 "--output", str(tmp_path / "report"))


@pytest.mark.parametrize(("drift_option", "expected"), [("none", False), ("all", True)], ids=["clean", "drifted"])
def test_the_next_day_drifts_only_when_traffic_changed(reference, tmp_path, drift_option, expected):
    batch = features(tmp_path, "day", "--rows", str(EVENTS_PER_DAY), "--days", "1", "--start", "2026-11-08T00:00:00Z",
                     "--drift", drift_option)
    result = check(tmp_path, reference, batch)
    assert result["status"] == drift.STATUS_OK
    assert result["drift_detected"] is expected, result
    if expected:
        # The cost inflation and the new campaigns are what moved.
        assert result["drift_share"] >= drift.DEFAULT_THRESHOLD
    else:
        # A day is a small sample: one column past Evidently's 0.1 distance is chance.
        assert result["drifted_columns"] <= 1 and result["drift_share"] < drift.DEFAULT_THRESHOLD
