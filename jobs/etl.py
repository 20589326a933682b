"""Feature ETL on PySpark: windowed features that look only at the past, then a time split.

Reads a dataset's raw parquet layout (from ``generate`` or ``ingest``), computes the
features named in :mod:`jobs.common.features` from the spec's entity roles, splits by
time into train / validation / test (70 / 15 / 15 by default), fits the preprocessor
(vocabularies and scalers) on the training split only and writes::

    <output>/train/  <output>/validation/  <output>/test/   parquet
    <output>/preprocessor.json                              vocabularies and scalers

Every event is ordered by ``(click_time, event_id)``: ties on the timestamp break on
the event id, so the features do not depend on how Spark partitions the data.
"""

from __future__ import annotations

import logging
import time

from jobs.common import cli, datasets, features, storage
from jobs.common.datasets import DatasetSpec

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")

# Order key = event time in milliseconds * TIE_SLOTS + tie rank within that millisecond.
TIE_SLOTS = 1 << 20
MS_PER_S = 1_000


def build_features(raw, spec: DatasetSpec):
    """The feature table of a raw events DataFrame (one row per event, none dropped)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    roles = {"ip": spec.ip, "device": spec.device, "app": spec.app, "channel": spec.channel, "agent": spec.agent}
    ts = spec.timestamp

    # Total order: time in ms, then event id among events of the same millisecond.
    df = raw.withColumn("_ts_ms", F.floor(F.unix_micros(F.col(ts)) / 1_000).cast("long"))
    df = df.withColumn("_ts_s", F.unix_micros(F.col(ts)).cast("double") / 1e6)
    tie = Window.partitionBy("_ts_ms").orderBy(F.col(spec.event_id))
    df = df.withColumn("_okey", F.col("_ts_ms") * TIE_SLOTS + (F.row_number().over(tie) - 1))

    # Derived categoricals.
    if "ip_subnet" in spec.categorical:
        df = df.withColumn("ip_subnet", F.substring_index(F.col(spec.ip), ".", 3))

    # Windowed counts, the current event included.
    for name, entity, window_s in features.WINDOW_COUNTS:
        cols = [roles[r] for r in entity]
        w = Window.partitionBy(*cols).orderBy("_okey").rangeBetween(-window_s * MS_PER_S * TIE_SLOTS, 0)
        df = df.withColumn(name, F.count(F.lit(1)).over(w).cast("double"))

    # Seconds since the previous click of the same entity.
    for name, entity in features.GAP_FEATURES:
        cols = [roles[r] for r in entity]
        w = Window.partitionBy(*cols).orderBy("_okey")
        gap = F.col("_ts_s") - F.lag("_ts_s").over(w)
        df = df.withColumn(name, F.coalesce(gap, F.lit(float(features.NO_PREVIOUS_CLICK_S))))

    # Distinct values seen so far from the same IP: a running sum of first sightings.
    for name, role in features.DISTINCT_FEATURES:
        first = Window.partitionBy(roles["ip"], roles[role]).orderBy("_okey")
        flag = f"_first_{role}"
        df = df.withColumn(flag, (F.row_number().over(first) == 1).cast("double"))
        running = (
            Window.partitionBy(roles["ip"]).orderBy("_okey").rowsBetween(Window.unboundedPreceding, 0)
        )
        df = df.withColumn(name, F.sum(flag).over(running)).drop(flag)

    df = df.withColumn("hour_of_day", F.hour(F.col(ts)).cast("double"))

    # The label and oracle columns pass through when present (batch scoring has none).
    keep = [spec.event_id, ts] + ([spec.label] if spec.label in df.columns else []) + ["_okey"]
    keep += [c for c in spec.categorical if c not in keep]
    keep += features.derived_numeric(spec)
    keep += [c for c in spec.numeric if c not in keep]
    for extra in (*spec.segments, spec.cost, *spec.oracle):
        if extra and extra not in keep and extra in df.columns:
            keep.append(extra)
    out = df.select(*keep)
    for column in spec.categorical:
        out = out.withColumn(column, F.col(column).cast("string"))
    return out


def split_bounds(df, fractions: tuple[float, float]) -> tuple[int, int]:
    """Order-key cut points for a time split (exact quantiles; ties go to the earlier split)."""
    q = df.approxQuantile("_okey", list(fractions), 0.0)
    return int(q[0]), int(q[1])


def fit_preprocessor(train, spec: DatasetSpec):
    """Vocabularies and scalers from the training split only."""
    from pyspark.sql import functions as F

    vocab: dict[str, list[str]] = {}
    buckets: dict[str, int] = {}
    # Approximate (HyperLogLog++, deterministic for the same data): only the cap is compared.
    distinct = train.agg(*[F.approx_count_distinct(c).alias(c) for c in spec.categorical]).collect()[0]
    for column in spec.categorical:
        if distinct[column] > features.MAX_VOCAB_SIZE:
            buckets[column] = features.HASH_BUCKETS
        rows = (
            train.where(F.col(column).isNotNull())
            .groupBy(column)
            .count()
            .where(F.col("count") >= features.MIN_VOCAB_COUNT)
            .orderBy(F.desc("count"), F.asc(column))
            .limit(features.MAX_VOCAB_SIZE)
            .collect()
        )
        vocab[column] = [r[column] for r in rows]
    numeric_cols = features.numeric_features(spec)
    aggs = []
    for column in numeric_cols:
        logged = F.log1p(F.greatest(F.coalesce(F.col(column).cast("double"), F.lit(0.0)), F.lit(0.0)))
        aggs += [F.sum(logged).alias(f"{column}__s"), F.sum(logged * logged).alias(f"{column}__q")]
    row = train.agg(F.count(F.lit(1)).alias("__n"), *aggs).collect()[0]
    numeric = {c: features.numeric_stats(row[f"{c}__s"] or 0.0, row[f"{c}__q"] or 0.0, row["__n"]) for c in numeric_cols}
    return features.Preprocessor(
        dataset=spec.name,
        categorical=vocab,
        numeric=numeric,
        feature_spec_hash=features.feature_spec_hash(spec),
        hash_buckets=buckets,
    )


def run(raw_uri: str, output_uri: str, spec: DatasetSpec, fractions=(0.70, 0.85), partitions=None) -> dict:
    from pyspark.sql import functions as F

    from jobs.common import spark as spark_session

    started = time.monotonic()
    spark = spark_session.session("adfraud-etl", shuffle_partitions=partitions)
    try:
        # Read and check the raw layout.
        raw = spark.read.parquet(raw_uri.replace("file://", ""))
        missing = [c for c in spec.column_names if c not in raw.columns]
        if missing:
            raise ValueError(f"{raw_uri}: not a {spec.name} raw layout, missing columns {missing}")
        rows_in = raw.count()
        if rows_in == 0:
            raise ValueError(f"{raw_uri}: no events")
        logger.info("read %d %s events from %s", rows_in, spec.name, raw_uri)

        # Features, then the time split.
        feats = build_features(raw, spec).cache()
        lo, hi = split_bounds(feats, fractions)
        split_col = F.when(F.col("_okey") <= lo, "train").when(F.col("_okey") <= hi, "validation").otherwise("test")
        feats = feats.withColumn("_split", split_col)

        # Write each split atomically, ordered by time.
        tmp = storage.temp_sibling(output_uri)
        counts: dict[str, dict[str, int]] = {}
        for name in SPLITS:
            part = feats.where(F.col("_split") == name).drop("_split")
            part.orderBy("_okey").drop("_okey").write.mode("overwrite").parquet(
                storage.join(tmp, name).replace("file://", "")
            )
            stats = part.agg(F.count(F.lit(1)).alias("n"), F.sum(F.col(spec.label)).alias("pos")).collect()[0]
            counts[name] = {"rows": int(stats["n"]), "positives": int(stats["pos"] or 0)}
            logger.info("split %s: %d rows, %d positives", name, counts[name]["rows"], counts[name]["positives"])
        rows_out = sum(c["rows"] for c in counts.values())
        if rows_out != rows_in:
            raise RuntimeError(f"ETL lost events: {rows_in} in, {rows_out} out")

        # The preprocessor, fitted on the training split only.
        pre = fit_preprocessor(feats.where(F.col("_split") == "train"), spec)
        storage.write_json(storage.join(tmp, "preprocessor.json"), pre.to_dict())
        storage.replace_dir(tmp, output_uri)
    finally:
        spark.stop()

    result = {
        "dataset": spec.name,
        "features_uri": output_uri,
        "preprocessor_uri": storage.join(output_uri, "preprocessor.json"),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "splits": counts,
        "feature_spec_hash": pre.feature_spec_hash,
        "numeric_features": pre.numeric_columns,
        "categorical_features": pre.categorical_columns,
        "vocabulary_sizes": {k: len(v) for k, v in pre.categorical.items()},
        "hash_buckets": pre.hash_buckets,
        "seconds": round(time.monotonic() - started, 1),
    }
    for name in SPLITS:
        result[f"{name}_uri"] = storage.join(output_uri, name)
    if spec.oracle:
        result["bayes_auc_by_split"] = oracle_auc(output_uri, spec)
    return result


def oracle_auc(features_uri: str, spec: DatasetSpec) -> dict[str, float | None]:
    """The Bayes-optimal AUC per split from the generator's oracle probability."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, float | None] = {}
    for name in SPLITS:
        table = storage.read_table(storage.join(features_uri, name), columns=[spec.label, "fraud_probability"])
        y = table.column(spec.label).to_numpy()
        p = table.column("fraud_probability").to_numpy()
        out[name] = round(float(roc_auc_score(y, p)), 6) if 0 < y.sum() < len(y) else None
    return out


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("jobs.etl", __doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="raw events: parquet dataset URI from generate or ingest")
    p.add_argument("--output", required=True, help="output URI for the split feature tables")
    p.add_argument("--dataset", required=True, choices=sorted(datasets.DATASETS), help="dataset spec of the input")
    p.add_argument("--train-fraction", type=float, default=0.70, help="earliest share of events for training")
    p.add_argument("--validation-fraction", type=float, default=0.15, help="next share for validation")
    p.add_argument("--partitions", type=int, default=None, help="Spark shuffle partitions (default 2 x cores)")
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    hi = args.train_fraction + args.validation_fraction
    if not (0 < args.train_fraction < hi < 1):
        cli.fail("--train-fraction and --validation-fraction must leave a non-empty test split")
    try:
        result = run(args.input, args.output, datasets.get(args.dataset), (args.train_fraction, hi), args.partitions)
    except (ValueError, FileNotFoundError) as exc:
        cli.fail(str(exc))
    cli.write_result(result, args.result_path)


if __name__ == "__main__":
    main()
