"""Tune's choice between the defaults' trial and the best trial."""

from __future__ import annotations

from jobs.tune import METRIC, select

DEFAULTS = {"lr": 1e-3, "hidden": "128,64"}


def trial(value, se, **config):
    return {"config": {"seed": 7, **DEFAULTS, **config}, METRIC: value, "se": se, "epochs": 3}


def test_defaults_stay_when_the_best_is_within_one_standard_error():
    trials = [trial(0.228, 0.08), trial(0.254, 0.09, lr=5e-3), trial(0.150, 0.07, hidden="64,32")]
    chosen, selection = select(trials, DEFAULTS)
    assert chosen is trials[0]
    assert selection["chosen"] == "defaults"
    assert selection["margin"] == 0.09 and selection["best_value"] == 0.254


def test_a_trial_beyond_one_standard_error_replaces_the_defaults():
    trials = [trial(0.20, 0.03), trial(0.31, 0.04, lr=5e-3)]
    chosen, selection = select(trials, DEFAULTS)
    assert chosen is trials[1] and selection["chosen"] == "best"


def test_the_best_is_taken_when_the_defaults_trial_failed_or_is_the_best():
    failed = {"config": {"seed": 7, **DEFAULTS}, "error": "boom"}
    chosen, selection = select([failed, trial(0.2, 0.1, lr=5e-3)], DEFAULTS)
    assert chosen["config"]["lr"] == 5e-3 and selection["why"] == "defaults' trial did not finish"
    trials = [trial(0.3, 0.1), trial(0.2, 0.1, lr=5e-3)]
    chosen, selection = select(trials, DEFAULTS)
    assert chosen is trials[0] and selection["chosen"] == "best"
