"""User errors end a stage with one line and exit status 2; bugs keep their traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    ("train-missing-features", ["jobs.train", "--features", "/nonexistent/f", "--output", "/tmp/unused"],
     "/nonexistent/f/preprocessor.json not found"),
    ("train-bad-hidden", ["jobs.train", "--features", "/nonexistent/f", "--output", "/tmp/unused", "--hidden", "abc"],
     "bad hyper-parameters"),
    ("evaluate-missing-model", ["jobs.evaluate", "--model", "/nonexistent/m", "--features", "/nonexistent/f",
                                "--output", "/tmp/unused"], "/nonexistent/m/model.pt"),
    ("rollout-unknown-model", ["jobs.rollout", "--model-name", "nope", "--features", "/nonexistent/f"],
     "Registered Model with name=nope not found"),
]


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_errors_are_one_line(stage_home, tmp_path, argv, message):
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "ADFRAUD_XCOM_PATH": str(tmp_path / "r.json")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
