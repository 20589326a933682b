"""Threshold choice by money saved, and the metrics at a threshold."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.common import metrics


def test_savings_threshold_blocks_only_what_pays():
    # Two expensive frauds on top, then a legit click, then a cheap fraud, then legit.
    is_fraud = np.array([1, 1, 0, 1, 0])
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    cost = np.array([5.0, 4.0, 1.0, 0.2, 1.0])
    threshold, saved = metrics.choose_threshold_savings(is_fraud, score, cost, blocked_legit_loss=1.0)
    assert threshold == pytest.approx(0.8)
    assert saved == pytest.approx(9.0)
    assert metrics.savings_at(is_fraud, score, cost, 1.0, threshold) == pytest.approx(9.0)
    # With free false positives, blocking down to the cheap fraud pays more.
    threshold, saved = metrics.choose_threshold_savings(is_fraud, score, cost, blocked_legit_loss=0.0)
    assert threshold == pytest.approx(0.6) and saved == pytest.approx(9.2)


def test_ties_are_blocked_together():
    is_fraud = np.array([1, 0, 1])
    score = np.array([0.5, 0.5, 0.2])
    thresholds, savings = metrics.savings_curve(is_fraud, score, np.ones(3), 0.5)
    assert thresholds.tolist() == [0.5, 0.2]
    assert savings.tolist() == [0.5, 1.5]


def test_nothing_worth_blocking_blocks_nothing():
    threshold, saved = metrics.choose_threshold_savings(np.array([0, 0]), np.array([0.9, 0.1]), np.ones(2), 1.0)
    assert saved == 0.0 and threshold > 1.0


def test_at_threshold_confusion_matrix():
    out = metrics.at_threshold(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.3, 0.1]), 0.5)
    assert out["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 1}
    assert out["precision"] == 0.5 and out["recall"] == 0.5


def test_ranking_metrics_undefined_for_one_class():
    out = metrics.ranking_metrics(np.zeros(5), np.linspace(0, 1, 5))
    assert out["auc"] is None and out["pr_auc"] is None and out["rows"] == 5


def test_average_precision_se_matches_the_spread_over_fresh_samples():
    """The bootstrap error of one sample is close to the PR-AUC's spread over new samples
    of the same population: 15,000 rows, about 30 positives, like a small validation split."""
    rng = np.random.default_rng(0)

    def sample():
        y = (rng.random(15_000) < 0.002).astype(int)
        return y, rng.normal(size=len(y)) + 2.5 * y

    from sklearn.metrics import average_precision_score

    spread = np.std([average_precision_score(*sample()) for _ in range(100)])
    estimates = [metrics.average_precision_se(*sample(), resamples=100, seed=i) for i in range(5)]
    assert 0.6 * spread < np.median(estimates) < 1.5 * spread
    # More positives, smaller error.
    y = (rng.random(15_000) < 0.05).astype(int)
    assert metrics.average_precision_se(y, rng.normal(size=len(y)) + 2.5 * y) < 0.5 * spread


def test_average_precision_se_is_nan_for_one_class():
    assert np.isnan(metrics.average_precision_se(np.zeros(10), np.arange(10.0)))


def test_weighted_average_precision_with_unit_weights_is_sklearns_ties_included():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    y = (rng.random(5_000) < 0.01).astype(float)
    score = np.round(rng.normal(size=len(y)) + 2.0 * y, 1)  # many ties
    order = np.argsort(-score, kind="stable")
    group_end = np.r_[score[order][1:] != score[order][:-1], True]
    value = metrics._weighted_average_precision(y[order], group_end, np.ones(len(y)))
    assert value == pytest.approx(average_precision_score(y, score), rel=1e-12)
