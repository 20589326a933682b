"""Batch scoring: raw events in, the served model's scores out, features from the Spark ETL.

``python -m jobs.score --model-config <serving config> --input <raw events> --output <scores>``
computes the features with :func:`jobs.etl.build_features` (the definitions the model
was trained on), then streams them through the preprocessor and onnxruntime in chunks
and writes a parquet dataset, in event order::

    <event_id>, <timestamp>, probability, fraud_score, flagged, model_version [, <label>] [, features]

``probability`` is the model's probability of the dataset's label 1, ``fraud_score`` the
probability of fraud (``1 - probability`` where label 1 marks genuine traffic) and
``flagged`` is ``fraud_score >= threshold`` (``--threshold``, else the configuration's,
else ``ADFRAUD_SERVING_THRESHOLD``, else 0.5). The input needs the raw columns that
features are made of; the label, oracle and withheld columns may be absent (new,
unlabelled events). With a label, the result reports AUC and PR-AUC.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from typing import Any

import numpy as np

from jobs.common import cli, features, storage
from jobs.common.datasets import DatasetSpec

logger = logging.getLogger(__name__)

# Rows per onnxruntime call and per output part file.
DEFAULT_BATCH_ROWS = 65_536

OUTPUT_COLUMNS = ("probability", "fraud_score", "flagged", "model_version")


def _add_missing_optional_columns(raw, spec: DatasetSpec):
    """Null label, oracle and withheld columns where the input has none: build_features
    carries them through but computes nothing from them."""
    from pyspark.sql import functions as F

    optional = {spec.label, *spec.oracle, *spec.withheld}
    missing = [c for c in spec.column_names if c not in raw.columns]
    required = [c for c in missing if c not in optional]
    if required:
        raise ValueError(f"not a {spec.name} raw layout: missing columns {required}")
    for name in missing:
        column = spec.column(name)
        spark_type = (
            "timestamp"
            if column.type == "timestamp"
            else {"int8": "tinyint", "int32": "int", "int64": "bigint", "float64": "double"}.get(
                column.type, column.type
            )
        )
        raw = raw.withColumn(name, F.lit(None).cast(spark_type))
    return raw, spec.label not in missing


def _onnx_session(onnx_bytes: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def run(
    config_uri: str,
    input_uri: str,
    output_uri: str,
    threshold: float | None = None,
    include_features: bool = False,
    partitions: int | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    threads: int = 0,
) -> dict[str, Any]:
    """Score the raw events at ``input_uri`` with the model of ``config_uri``; returns the
    stage result. See the module docstring for the output layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.common import spark as spark_session
    from jobs.etl import build_features
    from jobs.serve import read_model_files, resolve_threshold

    started = time.monotonic()
    config, spec, pre, onnx_bytes = read_model_files(config_uri)
    threshold = resolve_threshold(config, threshold)
    version = str(config["version"])
    session = _onnx_session(onnx_bytes, threads)

    # Features with the ETL's Spark code, written once in event order.
    features_tmp = storage.temp_sibling(output_uri) + "-features"
    model_columns = [*pre.categorical_columns, *pre.numeric_columns]
    spark = spark_session.session("adfraud-score", shuffle_partitions=partitions)
    try:
        raw = spark.read.parquet(input_uri.replace("file://", ""))
        raw, labelled = _add_missing_optional_columns(raw, spec)
        rows_in = raw.count()
        if rows_in == 0:
            raise ValueError(f"{input_uri}: no events")
        logger.info("read %d %s events from %s", rows_in, spec.name, input_uri)
        keep = [spec.event_id, spec.timestamp, *([spec.label] if labelled else [])]
        keep += [c for c in (features.derived_numeric(spec) if include_features else []) if c not in keep]
        keep += [c for c in model_columns if c not in keep]
        build_features(raw, spec).orderBy("_okey").select(*keep).write.mode("overwrite").parquet(
            features_tmp.replace("file://", "")
        )
    finally:
        spark.stop()

    # Score in chunks, in order, into a temporary dataset published whole.
    fs, feats_path = storage.filesystem(features_tmp)
    parts = sorted(
        p for p in fs.find(feats_path) if p.endswith(".parquet") and "/." not in p and "/_" not in p
    )
    out_tmp = storage.temp_sibling(output_uri)
    out_fs, out_path = storage.filesystem(out_tmp)
    out_fs.makedirs(out_path, exist_ok=True)
    rows, flagged_total, scoring_s = 0, 0, 0.0
    labels: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    index = 0
    try:
        for part in parts:
            with fs.open(part, "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows):
                    frame = batch.to_pandas()
                    tick = time.perf_counter()
                    cats, nums = pre.transform(frame)
                    probability = session.run(["probability"], {"categorical": cats, "numeric": nums})[0]
                    scoring_s += time.perf_counter() - tick
                    fraud = probability if spec.positive_is_fraud else (1.0 - probability).astype(np.float32)
                    flagged = fraud >= threshold
                    columns = {
                        spec.event_id: batch.column(spec.event_id),
                        spec.timestamp: batch.column(spec.timestamp),
                        "probability": pa.array(probability, pa.float32()),
                        "fraud_score": pa.array(fraud, pa.float32()),
                        "flagged": pa.array(flagged),
                        "model_version": pa.array([version] * len(frame)),
                    }
                    if labelled:
                        columns[spec.label] = batch.column(spec.label)
                        labels.append(frame[spec.label].to_numpy())
                        scores.append(fraud)
                    if include_features:
                        for name in [*features.derived_numeric(spec), *model_columns]:
                            columns.setdefault(name, batch.column(name))
                    pq.write_table(
                        pa.table(columns),
                        posixpath.join(out_path, f"part-{index:05d}.parquet"),
                        filesystem=out_fs,
                    )
                    index += 1
                    rows += len(frame)
                    flagged_total += int(flagged.sum())
        storage.replace_dir(out_tmp, output_uri)
    finally:
        fs.rm(feats_path, recursive=True)
        if out_fs.exists(out_path):
            out_fs.rm(out_path, recursive=True)
    if rows != rows_in:
        raise RuntimeError(f"scoring lost events: {rows_in} in, {rows} out")
    logger.info(
        "scored %d events with %s v%s: %d flagged at %.4f (%.0f rows/s)",
        rows,
        config["model_name"],
        version,
        flagged_total,
        threshold,
        rows / scoring_s if scoring_s else float("nan"),
    )

    result: dict[str, Any] = {
        "dataset": spec.name,
        "model_name": config["model_name"],
        "model_version": version,
        "feature_spec_hash": pre.feature_spec_hash,
        "input_uri": input_uri,
        "scores_uri": output_uri,
        "rows": rows,
        "flagged": flagged_total,
        "flagged_fraction": flagged_total / rows,
        "threshold": threshold,
        "scoring_rows_per_s": round(rows / scoring_s, 1) if scoring_s else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    if labelled:
        from jobs.common import metrics

        label = np.concatenate(labels).astype(np.int64)
        fraud_label = label if spec.positive_is_fraud else 1 - label
        ranking = metrics.ranking_metrics(fraud_label, np.concatenate(scores))
        result.update(
            {
                "fraud_auc": ranking["auc"],
                "fraud_pr_auc": ranking["pr_auc"],
                "fraud_positives": ranking["positives"],
            }
        )
    return result


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("jobs.score", __doc__.split("\n\n")[0])
    p.add_argument("--model-config", required=True, help="serving configuration URI (as written by rollout)")
    p.add_argument(
        "--input", required=True, help="raw events: parquet dataset URI in the dataset's raw layout"
    )
    p.add_argument("--output", required=True, help="URI of the scores parquet dataset to write")
    p.add_argument("--threshold", type=float, default=None, help="fraud-score threshold for 'flagged'")
    p.add_argument(
        "--include-features", action="store_true", help="write the feature columns beside the scores"
    )
    p.add_argument(
        "--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, help="rows per model call and part file"
    )
    p.add_argument(
        "--partitions", type=int, default=None, help="Spark shuffle partitions (default 2 x cores)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime threads (0 = all cores; 1 is faster where the cores are shared)",
    )
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    try:
        result = run(
            args.model_config,
            args.input,
            args.output,
            args.threshold,
            args.include_features,
            args.partitions,
            args.batch_rows,
            args.threads,
        )
    except (ValueError, FileNotFoundError) as exc:
        cli.fail(str(exc))
    cli.write_result(result, args.result_path)


if __name__ == "__main__":
    main()
