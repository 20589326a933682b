"""Dataset specs: the one place that says what each dataset's columns and label mean.

Ingest validates against a spec, the ETL builds features from its roles, evaluation
names its metrics after its label, and serving validates requests against it.

Two datasets are known:

* ``synthetic``: events from :mod:`jobs.generate`. The label ``is_fraud`` is 1 when the
  click came from a fraudulent mechanism (bot, click farm, device reset, ...). The
  generator also writes each event's true fraud probability and scenario; those are
  oracle columns, kept for measuring the Bayes-optimal AUC and never fed to a model.
* ``talkingdata``: TalkingData AdTracking click logs. The label ``is_attributed`` is 1
  when the click was followed by an app download. Attributed clicks are the *good*
  traffic: a fraud model on this data ranks clicks by their chance of being genuine,
  and ``attributed_time`` is withheld from features because it is known only after
  the download (it would leak the label).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    """One column of a dataset's raw layout.

    :param name: column name in the raw parquet layout.
    :param type: arrow type name: ``string``, ``int64``, ``int32``, ``int8``, ``float64`` or
        ``timestamp`` (microseconds, UTC).
    :param nullable: whether a missing value is allowed.
    :param min_value: smallest allowed value for numeric columns, if bounded.
    :param max_value: largest allowed value for numeric columns, if bounded.
    :param description: what the column holds.
    """

    name: str
    type: str
    nullable: bool = False
    min_value: float | None = None
    max_value: float | None = None
    description: str = ""

    def arrow_type(self) -> pa.DataType:
        if self.type == "timestamp":
            return pa.timestamp("us", tz="UTC")
        return pa.type_for_alias(self.type)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's raw layout, its label and the roles its columns play in features.

    :param name: dataset name, used in model names and MLflow tags.
    :param columns: the raw parquet layout, in order.
    :param label: the label column (0/1).
    :param label_meaning: what label 1 means, in words.
    :param positive_is_fraud: True when label 1 marks fraud; False when it marks genuine
        traffic (TalkingData), so fraud scores are ``1 - p(label)``.
    :param event_id: a unique, stable id per event; ties on the timestamp break on it.
    :param timestamp: the event time column.
    :param ip: the column that identifies the source address.
    :param device: the column that identifies the device.
    :param app: the column that identifies what was advertised (campaign or app).
    :param channel: the column that identifies where the ad ran (ad group or channel).
    :param agent: the column that identifies the client software (user agent or OS version).
    :param categorical: columns fed to the model as embedded ids.
    :param numeric: raw numeric columns fed to the model (beside the derived features).
    :param cost: the column holding a click's cost, if the dataset has one.
    :param segments: what test metrics are broken down by: feature-table columns, or
        ``device_class``, derived from the user agent (:func:`device_class`).
    :param oracle: columns produced with the data that no model may read.
    :param withheld: columns known only after the label, never used as features.
    """

    name: str
    columns: tuple[Column, ...]
    label: str
    label_meaning: str
    positive_is_fraud: bool
    event_id: str
    timestamp: str
    ip: str
    device: str
    app: str
    channel: str
    agent: str
    categorical: tuple[str, ...]
    numeric: tuple[str, ...] = ()
    cost: str | None = None
    segments: tuple[str, ...] = ()
    oracle: tuple[str, ...] = ()
    withheld: tuple[str, ...] = field(default_factory=tuple)

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"dataset {self.name!r} has no column {name!r}")

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow_type(), nullable=c.nullable) for c in self.columns])

    def fingerprint(self) -> str:
        """A short hash of the spec: changes whenever the layout or roles change."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Segment derived from the spec's user-agent column (synthetic events).
DEVICE_CLASS = "device_class"
# "bot" as a crawler's name ends ("Googlebot/2.1", "bingbot)"), not inside a phone's
# model name ("CUBOT P40").
_BOT = re.compile(r"bot(?:[/;)]|$)|\bbot\b")


def device_class(user_agent: str | None) -> str:
    """``mobile``, ``tablet``, ``desktop``, ``automation`` (HTTP libraries, headless
    browsers, crawlers) or ``unknown``, from a user-agent string."""
    ua = (user_agent or "").lower()
    if not ua:
        return "unknown"
    if any(k in ua for k in ("okhttp", "curl", "python", "java/", "go-http", "wget", "headless", "spider",
                             "crawler", "phantomjs", "selenium")) or _BOT.search(ua):
        return "automation"
    if "ipad" in ua or ("android" in ua and "mobile" not in ua) or "tablet" in ua:
        return "tablet"
    if any(k in ua for k in ("mobile", "iphone", "ipod", "android", "blackberry", "opera mini", "windows phone")):
        return "mobile"
    if any(k in ua for k in ("windows", "macintosh", "x11", "linux", "cros")):
        return "desktop"
    return "unknown"


SYNTHETIC = DatasetSpec(
    name="synthetic",
    columns=(
        Column("event_id", "string", description="unique event id"),
        Column("campaign_id", "string", description="advertised campaign"),
        Column("ad_group", "string", description="ad group inside the campaign"),
        Column("keyword_type", "string", description="bid keyword class: brand, generic, competitor, premium"),
        Column("click_time", "timestamp", description="click time, UTC"),
        Column("ip_address", "string", description="client IPv4 address"),
        Column("device_id", "string", description="device identifier reported by the SDK"),
        Column("user_agent", "string", description="HTTP user agent"),
        Column("click_cost", "float64", min_value=0.0, description="cost charged for the click, USD"),
        Column("is_fraud", "int8", min_value=0, max_value=1, description="1 = fraudulent click"),
        Column("fraud_probability", "float64", min_value=0.0, max_value=1.0,
               description="oracle: the probability the generator drew is_fraud with"),
        Column("scenario", "string", description="oracle: the traffic mechanism that made the click"),
    ),
    label="is_fraud",
    label_meaning="1 = the click was made by a fraudulent mechanism (bot, click farm, device reset, ...)",
    positive_is_fraud=True,
    event_id="event_id",
    timestamp="click_time",
    ip="ip_address",
    device="device_id",
    app="campaign_id",
    channel="ad_group",
    agent="user_agent",
    categorical=("campaign_id", "ad_group", "keyword_type", "user_agent", "ip_subnet"),
    numeric=("click_cost",),
    cost="click_cost",
    segments=("keyword_type", DEVICE_CLASS),
    oracle=("fraud_probability", "scenario"),
)

TALKINGDATA = DatasetSpec(
    name="talkingdata",
    columns=(
        Column("event_id", "int64", min_value=0, description="row number in the source file, from 0"),
        Column("ip", "int64", min_value=0, description="encoded client IP"),
        Column("app", "int32", min_value=0, description="encoded app advertised"),
        Column("device", "int32", min_value=0, description="encoded device type"),
        Column("os", "int32", min_value=0, description="encoded OS version"),
        Column("channel", "int32", min_value=0, description="encoded publisher channel"),
        Column("click_time", "timestamp", description="click time, UTC"),
        Column("attributed_time", "timestamp", nullable=True,
               description="time of the app download, if any; known only after the label"),
        Column("is_attributed", "int8", min_value=0, max_value=1, description="1 = the click led to a download"),
    ),
    label="is_attributed",
    label_meaning="1 = the click led to an app download (genuine interest); 0 = no download",
    positive_is_fraud=False,
    event_id="event_id",
    timestamp="click_time",
    ip="ip",
    device="device",
    app="app",
    channel="channel",
    agent="os",
    categorical=("app", "device", "os", "channel"),
    # TalkingData's `device` is already the device type (encoded), its own device class.
    segments=("app", "device"),
    withheld=("attributed_time",),
)

# Columns of a TalkingData CSV as published, in order.
TALKINGDATA_CSV_COLUMNS = ("ip", "app", "device", "os", "channel", "click_time", "attributed_time", "is_attributed")

DATASETS = {spec.name: spec for spec in (SYNTHETIC, TALKINGDATA)}


def get(name: str) -> DatasetSpec:
    """The spec called ``name``, or a clear error listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None
