"""The feature list and the preprocessing every stage shares after the ETL.

The ETL (:mod:`jobs.etl`) computes the windowed features named here from a dataset
spec's roles; training, evaluation, export and serving turn a feature table into model
inputs with :class:`Preprocessor`, whose vocabularies and scalers are learned on the
training split only and persisted as JSON beside the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from jobs.common.datasets import DatasetSpec

# Windowed counts: (feature name, entity roles, window length in seconds).
WINDOW_COUNTS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("ip_clicks_1m", ("ip",), 60),
    ("ip_clicks_1h", ("ip",), 3_600),
    ("ip_clicks_1d", ("ip",), 86_400),
    ("ip_device_clicks_1h", ("ip", "device"), 3_600),
    ("ip_app_clicks_1h", ("ip", "app"), 3_600),
    ("ip_channel_clicks_1d", ("ip", "channel"), 86_400),
    # The same device and client software behind one address: close to one user.
    ("ip_device_agent_clicks_1d", ("ip", "device", "agent"), 86_400),
    ("ip_app_agent_clicks_1d", ("ip", "app", "agent"), 86_400),
)

# Seconds since the previous click of the same entity; absent history reads as this.
GAP_FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ip_secs_since_prev", ("ip",)),
    ("ip_device_secs_since_prev", ("ip", "device")),
    ("ip_app_secs_since_prev", ("ip", "app")),
    ("ip_device_agent_secs_since_prev", ("ip", "device", "agent")),
)
NO_PREVIOUS_CLICK_S = 7 * 86_400

# Distinct values of a role seen so far from the same IP.
DISTINCT_FEATURES: tuple[tuple[str, str], ...] = (
    ("ip_distinct_devices", "device"),
    ("ip_distinct_apps", "app"),
    ("ip_distinct_channels", "channel"),
)

CALENDAR_FEATURES = ("hour_of_day",)

# Categorical vocabularies keep at most this many values, each seen at least
# MIN_VOCAB_COUNT times in the training split; the rest share the out-of-vocabulary id 0.
MAX_VOCAB_SIZE = 5_000
MIN_VOCAB_COUNT = 2
OOV_INDEX = 0
# A column with more distinct training values than MAX_VOCAB_SIZE (client IPs, device ids
# at scale) also gets this many hashed ids: a value outside its vocabulary shares an id
# with the values of the same CRC-32 bucket instead of the single OOV id.
HASH_BUCKETS = 4_096


def hash_bucket(value: str, buckets: int) -> int:
    """Bucket of a value's string form: CRC-32, stable across processes and machines
    (Python's ``hash`` of a string is salted per process)."""
    return zlib.crc32(value.encode("utf-8")) % buckets


def derived_numeric(spec: DatasetSpec) -> list[str]:
    """Names of the numeric features the ETL derives, in model input order."""
    names = [name for name, _, _ in WINDOW_COUNTS]
    names += [name for name, _ in GAP_FEATURES]
    names += [name for name, _ in DISTINCT_FEATURES]
    names += list(CALENDAR_FEATURES)
    return names


# Drift is watched on inputs whose distribution does not depend on how much history
# preceded an event: windows up to this long (a batch's first hour aside), the calendar
# and raw numbers. Gaps ("no previous click" reads as 7 days), distinct counts "so far"
# and day windows are left out: a batch featurized on its own restarts them, and a
# growing history shifts them, so they drift even when traffic does not (measured on a
# clean day of synthetic events: 7 of those 11 columns drift, none of the others).
DRIFT_MAX_WINDOW_S = 3_600


def drift_numeric(spec: DatasetSpec) -> list[str]:
    """The numeric features the drift check compares, in model input order."""
    names = [name for name, _, window in WINDOW_COUNTS if window <= DRIFT_MAX_WINDOW_S]
    return names + list(CALENDAR_FEATURES) + list(spec.numeric)


def numeric_features(spec: DatasetSpec) -> list[str]:
    """All numeric model inputs: derived features, then the spec's raw numeric columns."""
    return derived_numeric(spec) + list(spec.numeric)


def categorical_features(spec: DatasetSpec) -> list[str]:
    return list(spec.categorical)


def feature_spec_hash(spec: DatasetSpec) -> str:
    """A hash of everything that defines the model inputs: two models with the same hash
    can be scored on the same feature table."""
    blob = json.dumps(
        {
            "dataset": spec.fingerprint(),
            "windows": WINDOW_COUNTS,
            "gaps": GAP_FEATURES,
            "distinct": DISTINCT_FEATURES,
            "calendar": CALENDAR_FEATURES,
            "no_previous_click_s": NO_PREVIOUS_CLICK_S,
            # How ids are assigned: a server with another scheme must not pass the check.
            "vocabulary": {"max_size": MAX_VOCAB_SIZE, "min_count": MIN_VOCAB_COUNT, "hash": "crc32",
                           "hash_buckets": HASH_BUCKETS},
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Preprocessor:
    """Turns a feature table into the model's two inputs: categorical ids and numbers.

    Categorical values map to ``1..K`` by vocabulary; null or empty maps to
    :data:`OOV_INDEX`, and so does anything unseen, unless the column has hash buckets:
    then an unseen value maps to ``K + 1 + hash_bucket(value, B)``. Numeric features go through ``log1p`` (all are non-negative counts,
    gaps or costs) and are standardized with the training split's mean and std.

    :param dataset: the dataset spec name.
    :param categorical: column name -> vocabulary (values as strings, in id order from 1).
    :param numeric: column name -> {"mean": ..., "std": ...} of ``log1p(value)``.
    :param feature_spec_hash: :func:`feature_spec_hash` of the spec it was fitted for.
    :param hash_buckets: column -> number of hashed ids after its vocabulary (absent = none).
    """

    dataset: str
    categorical: dict[str, list[str]]
    numeric: dict[str, dict[str, float]]
    feature_spec_hash: str
    hash_buckets: dict[str, int] = field(default_factory=dict)
    _index: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def categorical_columns(self) -> list[str]:
        return list(self.categorical)

    @property
    def numeric_columns(self) -> list[str]:
        return list(self.numeric)

    @property
    def cardinalities(self) -> list[int]:
        """Embedding table sizes, the OOV id included."""
        return [len(vocab) + 1 + self.hash_buckets.get(c, 0) for c, vocab in self.categorical.items()]

    def category_id(self, column: str, value: str) -> int:
        """The id of one value's string form (``""`` stands for null)."""
        found = self._lookup(column).get(value)
        if found is not None:
            return found
        buckets = self.hash_buckets.get(column, 0)
        if not buckets or value == "":
            return OOV_INDEX
        return len(self.categorical[column]) + 1 + hash_bucket(value, buckets)

    def _lookup(self, column: str) -> dict[str, int]:
        if column not in self._index:
            self._index[column] = {value: i + 1 for i, value in enumerate(self.categorical[column])}
        return self._index[column]

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs for ``frame``: int64 ``[n, n_categorical]`` and float32 ``[n, n_numeric]``."""
        missing = [c for c in [*self.categorical, *self.numeric] if c not in frame.columns]
        if missing:
            raise KeyError(f"feature table lacks columns {missing}")
        cats = np.empty((len(frame), len(self.categorical)), dtype=np.int64)
        for j, column in enumerate(self.categorical):
            lookup = self._lookup(column)
            values = frame[column].astype("string").fillna("")
            ids = values.map(lookup)
            if self.hash_buckets.get(column):
                unseen = ids.isna() & (values != "")
                ids[unseen] = values[unseen].map(lambda v, c=column: self.category_id(c, v))
            cats[:, j] = ids.fillna(OOV_INDEX).to_numpy(dtype=np.int64)
        nums = np.empty((len(frame), len(self.numeric)), dtype=np.float32)
        for j, (column, stats) in enumerate(self.numeric.items()):
            raw = pd.to_numeric(frame[column], errors="coerce").astype("float64").fillna(0.0).to_numpy()
            nums[:, j] = (np.log1p(np.clip(raw, 0.0, None)) - stats["mean"]) / stats["std"]
        return cats, nums

    def to_dict(self) -> dict[str, Any]:
        # Input order is explicit: JSON writers may sort object keys.
        return {
            "dataset": self.dataset,
            "categorical": self.categorical,
            "categorical_order": list(self.categorical),
            "numeric": self.numeric,
            "numeric_order": list(self.numeric),
            "feature_spec_hash": self.feature_spec_hash,
            "hash_buckets": self.hash_buckets,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Preprocessor:
        cat_order = payload.get("categorical_order") or list(payload["categorical"])
        num_order = payload.get("numeric_order") or list(payload["numeric"])
        return cls(
            dataset=payload["dataset"],
            categorical={k: list(payload["categorical"][k]) for k in cat_order},
            numeric={k: dict(payload["numeric"][k]) for k in num_order},
            feature_spec_hash=payload["feature_spec_hash"],
            hash_buckets={k: int(v) for k, v in payload.get("hash_buckets", {}).items()},
        )


def numeric_stats(log_sum: float, log_sq_sum: float, count: int) -> dict[str, float]:
    """Mean and std of ``log1p(x)`` from running sums; a constant column gets std 1."""
    mean = log_sum / count if count else 0.0
    var = max(log_sq_sum / count - mean * mean, 0.0) if count else 0.0
    std = math.sqrt(var)
    return {"mean": mean, "std": std if std > 1e-9 else 1.0}
