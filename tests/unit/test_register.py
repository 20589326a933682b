"""The promotion gate: a worse model is never promoted."""

from __future__ import annotations

import pytest

from jobs.register import GatePolicy

CASES = [
    ("first-model", {"auc": 0.8, "pr_auc": 0.2}, None, True),
    ("better-auc-same-pr", {"auc": 0.95, "pr_auc": 0.5}, {"auc": 0.94, "pr_auc": 0.5}, True),
    ("equal-auc", {"auc": 0.94, "pr_auc": 0.6}, {"auc": 0.94, "pr_auc": 0.5}, False),
    ("worse-auc", {"auc": 0.90, "pr_auc": 0.9}, {"auc": 0.94, "pr_auc": 0.5}, False),
    ("pr-auc-regression", {"auc": 0.96, "pr_auc": 0.40}, {"auc": 0.94, "pr_auc": 0.50}, False),
    ("pr-auc-within-tolerance", {"auc": 0.96, "pr_auc": 0.495}, {"auc": 0.94, "pr_auc": 0.50}, True),
    ("undefined-auc", {"auc": None, "pr_auc": None}, {"auc": 0.94, "pr_auc": 0.5}, False),
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
