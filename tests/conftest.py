"""Shared fixtures: where the shared data lives, and a clean stage environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "talkingdata"
TALKINGDATA_SAMPLE = SHARED_DATA / "train_sample.csv"
TALKINGDATA_RESAVED = SHARED_DATA / "train_sample_resaved.csv"

# Upper bound on one stage process started by a test (generate, ETL, a training run).
STAGE_TIMEOUT_S = 600

# The DAG imports the runtime switch the way Airflow does: plugins/ on sys.path.
if str(REPO_ROOT / "plugins") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "plugins"))


@pytest.fixture(scope="session")
def talkingdata_sample() -> Path:
    if not TALKINGDATA_SAMPLE.exists():
        pytest.skip(f"TalkingData sample not found at {TALKINGDATA_SAMPLE}")
    return TALKINGDATA_SAMPLE


@pytest.fixture
def stage_home(tmp_path, monkeypatch) -> Path:
    """An empty ADFRAUD_HOME (data root and MLflow store) for one test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("ADFRAUD_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    return home


def run_stage(module: str, *args: str, result: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args> --result-path <result>`` from the repository root."""
    cmd = [sys.executable, "-m", module, *args, "--result-path", str(result)]
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S)
