"""The promotion gate: a worse model is never promoted; every version carries its lineage tags."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from jobs import register
from jobs.common import tracking
from jobs.register import GatePolicy

CASES = [
    ("first-model", {"auc": 0.8, "pr_auc": 0.2}, None, True),
    ("first-model-undefined-auc", {"auc": None, "pr_auc": None}, None, False),
    ("better-auc-same-pr", {"auc": 0.95, "pr_auc": 0.5}, {"auc": 0.94, "pr_auc": 0.5}, True),
    ("equal-auc", {"auc": 0.94, "pr_auc": 0.6}, {"auc": 0.94, "pr_auc": 0.5}, False),
    ("worse-auc", {"auc": 0.90, "pr_auc": 0.9}, {"auc": 0.94, "pr_auc": 0.5}, False),
    ("pr-auc-regression", {"auc": 0.96, "pr_auc": 0.40}, {"auc": 0.94, "pr_auc": 0.50}, False),
    ("pr-auc-within-tolerance", {"auc": 0.96, "pr_auc": 0.495}, {"auc": 0.94, "pr_auc": 0.50}, True),
    ("undefined-auc", {"auc": None, "pr_auc": None}, {"auc": 0.94, "pr_auc": 0.5}, False),
    ("champion-undefined-auc", {"auc": 0.9, "pr_auc": 0.5}, {"auc": None, "pr_auc": None}, False),
]


@pytest.mark.parametrize(("challenger", "champion", "promote"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_gate_decisions(challenger, champion, promote):
    decided, reason = GatePolicy(min_auc_margin=0.0, max_pr_auc_drop=0.01).decide(challenger, champion)
    assert decided is promote
    assert reason


def test_margin_is_required_over_the_champion():
    policy = GatePolicy(min_auc_margin=0.01, max_pr_auc_drop=0.01)
    assert policy.decide({"auc": 0.945, "pr_auc": 0.5}, {"auc": 0.94, "pr_auc": 0.5})[0] is False
    assert policy.decide({"auc": 0.951, "pr_auc": 0.5}, {"auc": 0.94, "pr_auc": 0.5})[0] is True
    assert "by more than 0.01" in policy.decide({"auc": 0.945, "pr_auc": 0.5}, {"auc": 0.94, "pr_auc": 0.5})[1]


AUCS = [0.5, 0.7, 0.9, 0.93, 0.95, 0.99]
PR_AUCS = [0.1, 0.4, 0.8]
POLICIES = [GatePolicy(0.0, 0.01), GatePolicy(0.005, 0.0), GatePolicy(0.02, 0.05)]


@pytest.mark.parametrize("policy", POLICIES, ids=[f"margin{p.min_auc_margin}-drop{p.max_pr_auc_drop}" for p in POLICIES])
def test_a_worse_model_never_passes(policy):
    """Over a grid of metric pairs: lower-or-equal AUC (plus margin) or a PR-AUC loss beyond
    the tolerance never passes, and everything else does."""
    for c_auc, c_pr, k_auc, k_pr in itertools.product(AUCS, PR_AUCS, AUCS, PR_AUCS):
        passed, reason = policy.decide({"auc": c_auc, "pr_auc": c_pr}, {"auc": k_auc, "pr_auc": k_pr})
        worse = c_auc <= k_auc + policy.min_auc_margin or (k_pr - c_pr) > policy.max_pr_auc_drop
        assert passed is not worse, (c_auc, c_pr, k_auc, k_pr, reason)


def test_negative_margin_lets_a_slightly_worse_model_through():
    """Tests use a negative margin so the gate passes deterministically."""
    passed, reason = GatePolicy(min_auc_margin=-1.0, max_pr_auc_drop=1.0).decide(
        {"auc": 0.70, "pr_auc": 0.10}, {"auc": 0.90, "pr_auc": 0.60})
    assert passed is True and "margin -1" in reason


@pytest.mark.parametrize(("margin", "drop", "message"), [(1.5, 0.01, "min_auc_margin"), (0.0, -0.1, "max_pr_auc_drop")],
                         ids=["margin-above-one", "negative-drop"])
def test_policy_out_of_range_is_refused(margin, drop, message):
    with pytest.raises(ValueError, match=message):
        GatePolicy(margin, drop)


def test_cli_refuses_an_out_of_range_policy(capsys):
    with pytest.raises(SystemExit) as info:
        register.main(["--model", "m", "--features", "f", "--metrics", "x.json", "--mlflow-run-id", "r",
                       "--max-pr-auc-drop", "2"])
    assert info.value.code == 2
    assert "max_pr_auc_drop must be in [0, 1], got 2.0" in capsys.readouterr().err


def test_version_tags_carry_lineage_baseline_and_trigger(monkeypatch):
    monkeypatch.setenv("ADFRAUD_CODE_REVISION", "0123abcd")
    args = SimpleNamespace(run_id="manual__2026-01-01", mlflow_run_id="run42")
    run_tags = {tracking.TAG_FEATURE_SPEC: "f00d", tracking.TAG_DATA_URI: "/runs/r/features",
                tracking.TAG_BACKEND: "torch"}
    baseline = {"auc": 0.93, "pr_auc": 0.61, "metrics_uri": "/runs/r/baseline/metrics.json"}
    trigger = {"report_uri": "/drift/d/report/drift_report.html", "drift_share": 0.42, "mlflow_run_id": "drift7"}
    tags = register.version_tags(args, "synthetic", run_tags, {"auc": 0.95, "pr_auc": 0.7}, baseline, trigger)
    assert tags == {
        tracking.TAG_DAG_RUN_ID: "manual__2026-01-01",
        tracking.TAG_DATASET: "synthetic",
        tracking.TAG_FEATURE_SPEC: "f00d",
        tracking.TAG_DATA_URI: "/runs/r/features",
        tracking.TAG_BACKEND: "torch",
        register.TAG_CODE_REVISION: "0123abcd",
        register.TAG_TEST_AUC: "0.95",
        register.TAG_TEST_PR_AUC: "0.7",
        register.TAG_ONNX_URI: "runs:/run42/onnx/model.onnx",
        register.TAG_BASELINE_AUC: "0.93",
        register.TAG_BASELINE_PR_AUC: "0.61",
        register.TAG_BASELINE_METRICS: "/runs/r/baseline/metrics.json",
        register.TAG_DRIFT_REPORT: "/drift/d/report/drift_report.html",
        register.TAG_DRIFT_SHARE: "0.42",
        register.TAG_DRIFT_RUN_ID: "drift7",
    }


def test_version_tags_without_baseline_or_trigger():
    args = SimpleNamespace(run_id="r", mlflow_run_id="m")
    tags = register.version_tags(args, "synthetic", {}, {"auc": 0.9, "pr_auc": 0.5}, None, None)
    assert register.TAG_BASELINE_AUC not in tags and register.TAG_DRIFT_REPORT not in tags


def test_baseline_metrics_are_read_from_the_stage_json(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"test_auc": 0.912, "test_pr_auc": 0.55, "rounds": 120}')
    assert register.baseline_metrics(str(path)) == {"auc": 0.912, "pr_auc": 0.55, "metrics_uri": str(path)}
    assert register.baseline_metrics(None) is None


@pytest.mark.parametrize(("text", "value"), [("", None), ("None", None), ("0.25", 0.25)],
                         ids=["empty", "none", "number"])
def test_template_rendered_optional_flags(text, value):
    """The DAG renders a missing drift trigger as '' or 'None': both mean no value."""
    assert register.optional_float(text) == value
    assert register.optional_str(text) == (None if value is None else text)
