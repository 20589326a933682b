"""Segment metrics of the evaluate stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from jobs import evaluate
from jobs.common import datasets

USER_AGENTS = [
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 14_2 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148", "mobile"),
    ("Mozilla/5.0 (Linux; Android 7.1; Pixel 490) AppleWebKit/537.36 Chrome/109.0 Mobile Safari/537.36", "mobile"),
    ("Mozilla/5.0 (iPad; CPU iPad OS 14_2_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148", "tablet"),
    ("Mozilla/5.0 (Linux; Android 9; SM-T510) AppleWebKit/537.36 Chrome/90.0 Safari/537.36", "tablet"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36", "desktop"),
    ("Mozilla/5.0 (X11; Linux i686; rv:1.9.6.20) Gecko/20100101 Firefox/3.6.18", "desktop"),
    ("okhttp/4.24.5", "automation"),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "automation"),
    ("Mozilla/5.0 (Linux; Android 10; CUBOT P40) AppleWebKit/537.36 Chrome/96.0 Mobile Safari/537.36", "mobile"),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/120.0 Safari/537.36", "automation"),
    ("", "unknown"),
    (None, "unknown"),
]


@pytest.mark.parametrize(("agent", "expected"), USER_AGENTS, ids=[e + str(i) for i, (_, e) in enumerate(USER_AGENTS)])
def test_device_class_of_a_user_agent(agent, expected):
    assert datasets.device_class(agent) == expected


def test_segments_are_the_largest_values_with_enough_rows():
    rng = np.random.default_rng(0)
    n = 3_000
    agents = np.where(rng.random(n) < 0.7, USER_AGENTS[0][0], USER_AGENTS[4][0]).astype(object)
    agents[:50] = "okhttp/4.24.5"  # too few rows for a segment of its own
    frame = pd.DataFrame({"user_agent": agents, "keyword_type": np.where(np.arange(n) % 2, "brand", "generic")})
    label = (rng.random(n) < 0.1).astype(np.int64)
    score = label * 0.4 + rng.random(n) * 0.6
    spec = datasets.SYNTHETIC
    by_class = evaluate.segment_metrics(evaluate.segment_values(frame, spec, datasets.DEVICE_CLASS), label, score)
    assert set(by_class) == {"mobile", "desktop"}
    mobile = (frame["user_agent"] == USER_AGENTS[0][0]).to_numpy()
    assert by_class["mobile"]["rows"] == int(mobile.sum())
    assert by_class["mobile"]["positives"] == int(label[mobile].sum())
    from sklearn.metrics import roc_auc_score

    assert by_class["mobile"]["auc"] == pytest.approx(roc_auc_score(label[mobile], score[mobile]))
    by_keyword = evaluate.segment_metrics(evaluate.segment_values(frame, spec, "keyword_type"), label, score)
    assert {k: v["rows"] for k, v in by_keyword.items()} == {"brand": 1_500, "generic": 1_500}


def test_every_dataset_breaks_metrics_down_by_a_device_segment():
    assert datasets.DEVICE_CLASS in datasets.SYNTHETIC.segments
    assert "device" in datasets.TALKINGDATA.segments
