"""Unit tests of ``jobs.generate``: options, scenario table, helpers, formatting and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from jobs import generate
from jobs.common import storage

REPO = Path(__file__).resolve().parents[2]
# Logging is configured by main(); tests keep pytest's own handlers instead.
CONFIGURE_LOGGING = "jobs.generate.cli.configure_logging"
WRITE_TABLE = "jobs.generate.pq.write_table"
FLAGS = ("--output", "--rows", "--seed", "--start", "--days", "--part-rows", "--drift", "--smoke-test",
         "--result-path", "--verbose")


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setattr(CONFIGURE_LOGGING, lambda verbose=False: None)


def test_help_exits_zero_and_lists_every_flag():
    """``python -m jobs.generate --help`` exits 0 and documents each flag and drift option."""
    command = [sys.executable, "-m", "jobs.generate", "--help"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in FLAGS:
        assert flag in done.stdout, flag
    for drift in generate.DRIFTS:
        assert drift in done.stdout, drift


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T00:00:00Z", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T05:30:00+02:00", datetime(2026, 11, 1, 3, 30, tzinfo=UTC)),
        ("2026-11-01 12:00", datetime(2026, 11, 1, 12, tzinfo=UTC)),
    ],
    ids=["date", "zulu", "offset", "naive_is_utc"],
)
def test_parse_start(value: str, expected: datetime):
    """--start accepts ISO dates and date-times; offsets are converted and naive means UTC."""
    assert generate.parse_start(value) == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rows": 0}, "rows must be at least 1"),
        ({"part_rows": 0}, "part_rows must be at least 1"),
        ({"days": 0}, "days must be positive"),
        ({"seed": -1}, "seed must be in"),
        ({"drift": "sideways"}, "unknown drift 'sideways'"),
    ],
    ids=["rows", "part_rows", "days", "seed", "drift"],
)
def test_config_rejects_bad_options(overrides: dict, message: str):
    with pytest.raises(ValueError, match=message):
        generate.GenerateConfig(output="x", **overrides)


def test_bad_start_fails_with_one_line(tmp_path: Path, quiet, capsys):
    """An unparseable --start stops with exit code 2 and a message naming the value."""
    with pytest.raises(SystemExit) as info:
        generate.main(["--output", str(tmp_path / "o"), "--start", "yesterday"])
    assert info.value.code == 2
    assert "--start 'yesterday' is not an ISO date" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_scenario_shares_sum_to_one_for_every_drift():
    """Organic takes what the other scenarios leave; fraud_mix and new_bot change the table."""
    base = {s.name: s.share for s in generate.scenarios_for(generate.Drift.parse("none"))}
    for name in generate.DRIFTS:
        scenarios = generate.scenarios_for(generate.Drift.parse(name))
        assert sum(s.share for s in scenarios) == pytest.approx(1.0)
        assert all(0 < s.share < 1 for s in scenarios)
    mix = {s.name: s.share for s in generate.scenarios_for(generate.Drift.parse("fraud_mix"))}
    for scenario, factor in generate.FRAUD_MIX_MULTIPLIERS.items():
        assert mix[scenario] == pytest.approx(base[scenario] * factor)
    assert "new_bot" in {s.name for s in generate.scenarios_for(generate.Drift.parse("new_bot"))}
    assert "new_bot" not in base


def test_scenario_table_documents_each_mechanism():
    """Every scenario has a description, a known identity and profile, and a fraud range on its side."""
    names = [s.name for s in (*generate.SCENARIOS, generate.NEW_BOT)]
    assert len(set(names)) == len(names)
    for s in (*generate.SCENARIOS, generate.NEW_BOT):
        assert s.description and s.identity in generate._IDENTITIES and s.hours in generate._PROFILES
        low, high = s.fraud_probability
        assert 0 <= low < high <= 1
        assert (low >= 0.4) if s.fraud else (high <= 0.05), s.name
    fraud_share = sum(s.share for s in generate.SCENARIOS if s.fraud)
    assert 0.04 < fraud_share < 0.12


def test_drift_parse_and_describe():
    every = generate.Drift.parse("all")
    assert every.new_campaigns and every.fraud_mix and every.cost_inflation and every.new_bot
    only = generate.Drift.parse("cost_inflation")
    assert only.cost_inflation and not (only.new_campaigns or only.fraud_mix or only.new_bot)
    assert generate.Drift.parse("none").describe() == {
        "name": "none",
        "description": "no drift: the reference traffic mix",
        "changes": [],
    }
    assert "x1.4" in only.describe()["description"]


@pytest.mark.parametrize("total", [1, 7, 9, 10, 1_000, 123_457])
def test_allocate_is_exact(total: int):
    """Event counts per scenario add up exactly and, when possible, give every scenario one."""
    shares = np.array([s.share for s in generate.scenarios_for(generate.Drift.parse("new_bot"))])
    counts = generate._allocate(total, shares)
    assert counts.sum() == total and (counts >= 0).all()
    if total >= len(shares):
        assert (counts >= 1).all()
    if total >= 100_000:
        np.testing.assert_allclose(counts / total, shares, atol=1e-4)


@pytest.mark.parametrize("name", ["organic", "bot_burst", "stealth_bot"])
def test_episode_sizes_sum_exactly(name: str):
    scenario = next(s for s in generate.SCENARIOS if s.name == name)
    rng = np.random.default_rng(0)
    for total in (1, 17, 5_000):
        sizes = generate._episode_sizes(rng, scenario, total)
        assert sizes.sum() == total
        assert sizes.min() >= 1 and sizes.max() <= scenario.clicks_max


def test_grouped_auc_equals_sklearn_with_ties():
    """The AUC from per-score counts is sklearn's AUC of the expanded events, ties included."""
    rng = np.random.default_rng(1)
    score = rng.choice([0.1, 0.2, 0.5, 0.9], size=40)  # repeated scores across groups
    positives = rng.integers(0, 5, 40).astype(float)
    negatives = rng.integers(0, 50, 40).astype(float)
    groups = zip(positives.astype(int), negatives.astype(int), strict=True)
    labels = np.concatenate([np.r_[np.ones(p), np.zeros(n)] for p, n in groups])
    scores = np.repeat(score, (positives + negatives).astype(int))
    assert generate.grouped_auc(score, positives, negatives) == pytest.approx(roc_auc_score(labels, scores))
    assert generate.grouped_auc(score, np.zeros(40), negatives) is None


def test_hasher_is_deterministic_and_seeded():
    keys = np.arange(1000)
    a, b, c = generate._Hasher(7), generate._Hasher(7), generate._Hasher(8)
    np.testing.assert_array_equal(a("s", "f", keys), b("s", "f", keys))
    assert (a("s", "f", keys) != c("s", "f", keys)).mean() > 0.99
    assert (a("s", "f", keys) != a("s", "g", keys)).mean() > 0.99
    u = generate._unit(a("s", "f", np.arange(100_000)))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_formatter_strings():
    """Event ids are zero-padded and time-ordered as strings; addresses and device ids well formed."""
    fmt = generate._Formatter(42)
    ids = fmt.event_ids(999_998, 3).to_pylist()
    assert ids == ["ev-42-000000999998", "ev-42-000000999999", "ev-42-000001000000"]
    ips = np.array([0x01020304, 0xFFFFFFFE, 0x0A000001, 0x01020304], dtype=np.uint32)
    formatted = fmt.ip_addresses(ips)
    assert formatted.to_pylist() == ["1.2.3.4", "255.255.255.254", "10.0.0.1", "1.2.3.4"]
    devices = fmt.device_ids(np.array([5, 6, 5], dtype=np.uint64)).to_pylist()
    assert devices[0] == devices[2] != devices[1]
    assert [len(part) for part in devices[0].split("-")] == [8, 4, 4, 4, 12]
    assert devices == generate._Formatter(1).device_ids(np.array([5, 6, 5], dtype=np.uint64)).to_pylist()


def test_rerun_replaces_the_output(tmp_path: Path, quiet):
    """A second run to the same URI replaces the whole dataset and leaves no temporary folder."""
    output = tmp_path / "raw"
    first = ["--rows", "3000", "--part-rows", "1000", "--result-path", str(tmp_path / "r1")]
    generate.main(["--output", str(output), *first])
    assert len(list(output.glob("part-*.parquet"))) == 3
    generate.main(["--output", str(output), "--rows", "2000", "--result-path", str(tmp_path / "r2")])
    assert [p.name for p in output.glob("part-*.parquet")] == ["part-00000.parquet"]
    assert storage.read_table(str(output)).num_rows == 2000
    assert json.loads((tmp_path / "r2").read_text())["rows"] == 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1", "r2", "raw"]


def test_failed_write_publishes_nothing(tmp_path: Path, quiet, monkeypatch):
    """When writing a part fails, the output is not created and the temporary folder is removed."""
    calls = []

    def failing(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise OSError("disk full")
        return pq.write_table(table, where, **kwargs)

    monkeypatch.setattr(WRITE_TABLE, failing)
    with pytest.raises(OSError, match="disk full"):
        generate.main(["--output", str(tmp_path / "raw"), "--rows", "3000", "--part-rows", "1000",
                       "--result-path", str(tmp_path / "r")])
    assert list(tmp_path.iterdir()) == []


def test_short_window_and_tiny_runs(tmp_path: Path, quiet):
    """A one-event run and a 15-minute window keep every click inside the window."""
    result = generate.generate(generate.GenerateConfig(output=str(tmp_path / "one"), rows=1))
    assert result["rows"] == 1 and result["bayes_auc"] is None
    start = generate.parse_start("2026-06-30T23:50:00Z")
    config = generate.GenerateConfig(output=str(tmp_path / "short"), rows=4000, days=15 / 1440, start=start)
    result = generate.generate(config)
    times = storage.read_table(str(tmp_path / "short"))["click_time"].to_pylist()
    assert min(times) >= config.start and max(times) < config.end
    assert result["end"] == "2026-07-01T00:05:00Z"
