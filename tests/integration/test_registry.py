"""The registry end to end: the real ``jobs.register`` and ``jobs.promote`` commands, run as
concurrent processes against one SQLite MLflow store, on small hand-built models.

Expected behaviour: two registrations at the same moment get distinct versions; two
approvals racing for ``champion`` leave exactly one winner and the loser tagged; a worse
model fails the gate, stays ``challenger`` and cannot be approved; rollback returns to
the previous approved champion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL_NAME = "adfraud-synthetic"
TEST_ROWS = 400
STAGE_TIMEOUT_S = 300


def build_features(root: Path, seed: int = 0):
    """A test split in the ETL's layout and a preprocessor for it."""
    from jobs.common import datasets, features

    spec = datasets.get("synthetic")
    rng = np.random.default_rng(seed)
    numeric = features.numeric_features(spec)
    frame = pd.DataFrame({name: rng.lognormal(1.0, 0.7, TEST_ROWS) for name in numeric})
    for column in spec.categorical:
        frame[column] = rng.choice([f"{column}-{i}" for i in range(4)], TEST_ROWS)
    frame[spec.event_id] = [f"e{i:05d}" for i in range(TEST_ROWS)]
    frame[spec.timestamp] = pd.date_range("2026-01-01", periods=TEST_ROWS, freq="min", tz="UTC")
    pre = features.Preprocessor(
        dataset=spec.name,
        categorical={c: sorted(frame[c].unique()) for c in spec.categorical},
        numeric={c: {"mean": 1.0, "std": 0.7} for c in numeric},
        feature_spec_hash=features.feature_spec_hash(spec),
    )
    return spec, frame, pre


def save_model(directory: Path, pre, seed: int):
    """A small FraudNet with seeded random weights, saved the way train saves it."""
    import torch

    from jobs.common.model import FraudNet, ModelConfig, save_checkpoint

    torch.manual_seed(seed)
    net = FraudNet(ModelConfig(cardinalities=pre.cardinalities, n_numeric=len(pre.numeric), hidden=[8]))
    directory.mkdir(parents=True)
    save_checkpoint(net, str(directory / "model.pt"))
    (directory / "preprocessor.json").write_text(json.dumps(pre.to_dict()))
    return net


def scores(net, pre, frame) -> np.ndarray:
    from jobs.common.model import predict_proba

    return predict_proba(net, *pre.transform(frame))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """ADFRAUD_HOME with a test split whose labels the ``good`` model ranks perfectly,
    and four models: ``good`` and three random ones."""
    import mlflow

    from jobs.common import metrics, storage, tracking

    root = tmp_path_factory.mktemp("registry")
    home = root / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADFRAUD_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        spec, frame, pre = build_features(root)
        nets = {name: save_model(root / "models" / name, pre, seed)
                for name, seed in (("good", 1), ("random_a", 2), ("random_b", 3), ("random_c", 4))}
        good = scores(nets["good"], pre, frame)
        frame[spec.label] = (good >= np.quantile(good, 0.9)).astype("int8")
        features_uri = root / "features"
        (features_uri / "test").mkdir(parents=True)
        frame.to_parquet(features_uri / "test" / "part-00000.parquet", index=False)

        # One training run per model, tagged the way train tags it, with its evaluation.
        tracking.configure()
        runs = {}
        for name, net in nets.items():
            with mlflow.start_run(run_name=name, tags={
                tracking.TAG_FEATURE_SPEC: pre.feature_spec_hash, tracking.TAG_DATA_URI: str(features_uri),
                tracking.TAG_BACKEND: "torch", tracking.TAG_DATASET: "synthetic",
            }) as run:
                mlflow.log_artifacts(str(root / "models" / name), artifact_path="model")
            measured = metrics.ranking_metrics(frame[spec.label].to_numpy(), scores(net, pre, frame))
            metrics_uri = root / "models" / name / "metrics.json"
            storage.write_json(str(metrics_uri), {"dataset": "synthetic", "test_auc": measured["auc"],
                                                  "test_pr_auc": measured["pr_auc"]})
            runs[name] = {"run_id": run.info.run_id, "model": str(root / "models" / name),
                          "metrics": str(metrics_uri), "auc": measured["auc"]}
        yield {"root": root, "home": home, "features": str(features_uri), "runs": runs}


def stage_command(world, module: str, *args: str, name: str) -> tuple[list[str], dict, Path]:
    result = world["root"] / f"{name}.json"
    env = {**os.environ, "ADFRAUD_HOME": str(world["home"]), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return [sys.executable, "-m", module, *args, "--result-path", str(result)], env, result


def run_concurrently(commands: list[tuple[list[str], dict, Path]]) -> list[dict | subprocess.CompletedProcess]:
    """Start every command at once; the JSON result of each, or the failed process."""
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for cmd, env, _ in commands]
    out = []
    try:
        for proc, (_, _, result) in zip(procs, commands, strict=True):
            log, _ = proc.communicate(timeout=STAGE_TIMEOUT_S)
            out.append(json.loads(result.read_text()) if proc.returncode == 0 else
                       subprocess.CompletedProcess(proc.args, proc.returncode, log))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return out


def register(world, model: str, run_id: str, margin: str = "0.0"):
    info = world["runs"][model]
    return stage_command(world, "jobs.register", "--model", info["model"], "--features", world["features"],
                         "--metrics", info["metrics"], "--mlflow-run-id", info["run_id"], "--run-id", run_id,
                         "--min-auc-margin", margin, name=f"register-{model}")


def approve(world, version: int, reviewer: str, expected: str):
    return stage_command(world, "jobs.promote", "--model-name", MODEL_NAME, "--version", str(version),
                         "--decision", "approve", "--reviewer", reviewer, "--expected-champion", expected,
                         name=f"approve-{version}-{reviewer}")


def client_for(world):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{world['home']}/mlflow.db")
    return MlflowClient()


def ok(result) -> dict:
    assert isinstance(result, dict), f"exit {result.returncode}:\n{result.stdout[-3000:]}"
    return result


def test_the_registry_loop(world):
    from jobs import promote
    from jobs.register import CHALLENGER, CHAMPION, current_alias

    client = client_for(world)

    # Two registrations at the same moment: distinct versions, both gated, one challenger.
    first = [ok(r) for r in run_concurrently([register(world, "random_a", "run-a"),
                                              register(world, "random_b", "run-b")])]
    versions = sorted(r["version"] for r in first)
    assert versions == [1, 2]
    assert all(r["gate_passed"] and r["champion_version_at_gate"] is None for r in first)
    assert int(current_alias(client, MODEL_NAME, CHALLENGER).version) in versions
    assert current_alias(client, MODEL_NAME, CHAMPION) is None, "register must not move champion"
    for r in first:
        tags = client.get_model_version(MODEL_NAME, str(r["version"])).tags
        assert tags["adfraud.gate"] == "passed" and tags["adfraud.dag_run_id"] in ("run-a", "run-b")
        assert tags["adfraud.data_uri"] == world["features"] and tags["adfraud.training_backend"] == "torch"

    # Both approved at once against "no champion": exactly one wins, the other is told why.
    decisions = [ok(r) for r in run_concurrently([approve(world, 1, "alice", "none"),
                                                  approve(world, 2, "bob", "none")])]
    winners = [d for d in decisions if d["champion_moved"]]
    assert len(winners) == 1, decisions
    winner = winners[0]["version"]
    loser = 3 - winner
    assert int(current_alias(client, MODEL_NAME, CHAMPION).version) == winner
    loser_tags = client.get_model_version(MODEL_NAME, str(loser)).tags
    assert f"but the champion is now v{winner}" in loser_tags[promote.TAG_PROMOTION]
    assert promote.TAG_APPROVED_AT not in loser_tags

    # The good model beats the random champion on the same test split and is approved.
    good = ok(run_concurrently([register(world, "good", "run-good")])[0])
    assert good["version"] == 3 and good["gate_passed"] is True
    # Concurrent registration hands out versions in either order: find the winner's model by its run.
    winner_run = client.get_model_version(MODEL_NAME, str(winner)).tags["adfraud.dag_run_id"]
    assert good["champion_metrics"]["auc"] == pytest.approx(
        world["runs"]["random_a" if winner_run == "run-a" else "random_b"]["auc"])
    ok(run_concurrently([approve(world, 3, "carol", str(winner))])[0])
    assert int(current_alias(client, MODEL_NAME, CHAMPION).version) == 3

    # A worse model fails the gate (the champion is rescored: AUC 1.0), stays challenger,
    # and an approval of it is refused.
    worse = ok(run_concurrently([register(world, "random_c", "run-c")])[0])
    assert worse["gate_passed"] is False and worse["champion_metrics"]["auc"] == pytest.approx(1.0)
    assert "does not beat champion 1.0000" in worse["gate_reason"]
    assert int(current_alias(client, MODEL_NAME, CHALLENGER).version) == worse["version"] == 4
    refused = run_concurrently([approve(world, 4, "mallory", "3")])[0]
    assert isinstance(refused, subprocess.CompletedProcess) and refused.returncode == 2
    assert "a failed challenger is never promoted" in refused.stdout
    assert int(current_alias(client, MODEL_NAME, CHAMPION).version) == 3

    # Rollback: back to the race's winner, then nothing earlier is left.
    back = ok(run_concurrently([stage_command(world, "jobs.promote", "--rollback", "--model-name", MODEL_NAME,
                                              "--reviewer", "oncall", name="rollback-1")])[0])
    assert back["champion_version"] == winner and back["rolled_back_version"] == 3
    assert back["data_uri"] == world["features"]
    assert int(current_alias(client, MODEL_NAME, CHAMPION).version) == winner
    assert client.get_model_version(MODEL_NAME, "3").tags[promote.TAG_ROLLED_BACK_BY] == "oncall"
    empty = run_concurrently([stage_command(world, "jobs.promote", "--rollback", "--model-name", MODEL_NAME,
                                            name="rollback-2")])[0]
    assert isinstance(empty, subprocess.CompletedProcess) and empty.returncode == 2
    assert f"no approved version before champion v{winner}" in empty.stdout


def test_concurrent_version_creation_from_threads_gives_distinct_versions(world):
    """MLflow numbers versions in the store: eight threads registering at once get 1..8."""
    client = client_for(world)
    name = "adfraud-threads"
    client.create_registered_model(name)
    run_id = world["runs"]["good"]["run_id"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        created = list(pool.map(lambda _: client.create_model_version(name, f"runs:/{run_id}/model", run_id),
                                range(8)))
    assert sorted(int(v.version) for v in created) == list(range(1, 9))
