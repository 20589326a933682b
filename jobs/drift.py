"""Data drift of the newest events against the training reference, with Evidently.

Compares the model's input features of ``--current`` (one or more feature tables, for
example the newest split, or every split of the newest events' features) with
``--reference`` (a training split) or, with ``--reference-model``, with the training
split of that registered model's champion (its ``adfraud.data_uri`` tag + ``/train``),
using Evidently's ``DataDriftPreset``. Compared are the inputs whose distribution does not
depend on how much history preceded an event (:func:`jobs.common.features.drift_numeric`,
the categorical ids). The champion's scores are not compared: they depend on the
history-dependent inputs too, so a batch featurized on its own would shift them. Writes the report as HTML and JSON, logs both to
MLflow and says whether the share of drifted columns passed ``--threshold``. With fewer
than ``--min-rows`` rows on either side it reports ``insufficient_data``, and without a
champion ``no_reference``; neither ever signals drift. Columns constant in both inputs
cannot drift and are left out of the test (and listed), so the drift share is always
defined.
"""

from __future__ import annotations

import logging
import os
import tempfile

import pandas as pd

from jobs.common import cli, datasets, features, storage, tracking

logger = logging.getLogger(__name__)

STATUS_OK = "ok"

# Share of compared columns that must drift: 2 of the 9 compared on synthetic events.
DEFAULT_THRESHOLD = 0.2
STATUS_INSUFFICIENT = "insufficient_data"
STATUS_NO_REFERENCE = "no_reference"

# Categorical columns with more distinct values than this are compared by their
# frequency ranks' coverage only (Evidently would build huge tables otherwise).
MAX_CATEGORICAL_CARDINALITY = 200


def load_features(uris: str | list[str], columns: list[str], sample_rows: int, seed: int) -> pd.DataFrame:
    """The model-input columns of one or more feature tables, at most ``sample_rows`` rows."""
    uris = [uris] if isinstance(uris, str) else uris
    frame = pd.concat([storage.read_table(uri).to_pandas() for uri in uris], ignore_index=True)
    present = [c for c in columns if c in frame.columns]
    missing = [c for c in columns if c not in frame.columns]
    if len(missing) > len(columns) // 2:
        raise ValueError(f"{', '.join(uris)}: not a feature table (missing {len(missing)} of {len(columns)} "
                         f"model inputs, e.g. {missing[:3]}); pass the etl stage's output")
    frame = frame[present]
    if len(frame) > sample_rows:
        frame = frame.sample(n=sample_rows, random_state=seed).sort_index()
    return frame.reset_index(drop=True)


def champion_reference(model_name: str) -> tuple[str | None, int | None]:
    """(training split URI, version) of ``model_name``'s champion; (None, None) without one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.configure()
    try:
        version = MlflowClient().get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None, None
    data_uri = version.tags.get(tracking.TAG_DATA_URI)
    if not data_uri:
        raise ValueError(f"{model_name} champion v{version.version} has no {tracking.TAG_DATA_URI} tag")
    return storage.join(data_uri, "train"), int(version.version)


def no_signal(result: dict, status: str) -> dict:
    """A result that never triggers a retrain."""
    return {**result, "status": status, "drift_detected": False, "drift_share": None,
            "report_html_uri": None, "report_json_uri": None, "mlflow_run_id": None}


def drift_share(snapshot_dict: dict) -> tuple[int, float]:
    """(drifted column count, share) from an Evidently snapshot's dict."""
    for metric in snapshot_dict.get("metrics", []):
        name = str(metric.get("metric_name", "")) + str(metric.get("config", {}).get("type", ""))
        if "DriftedColumnsCount" in name:
            value = metric["value"]
            return int(value["count"]), float(value["share"])
    raise ValueError("the Evidently report has no DriftedColumnsCount metric")


def run(args) -> dict:
    import mlflow
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    spec = datasets.get(args.dataset)
    inputs = features.numeric_features(spec)
    numeric = features.drift_numeric(spec)
    categorical = list(spec.categorical)
    result: dict = {
        "dataset": spec.name,
        "reference_uri": args.reference,
        "reference_model": args.reference_model,
        "reference_version": None,
        "current_uri": args.current[0] if len(args.current) == 1 else args.current,
        "threshold": args.threshold,
        "min_rows": args.min_rows,
        "history_dependent_columns": [c for c in inputs if c not in numeric],
    }

    # The reference: given, or the champion's training split.
    reference_uri = args.reference
    if reference_uri is None:
        reference_uri, result["reference_version"] = champion_reference(args.reference_model)
        result["reference_uri"] = reference_uri
        if reference_uri is None:
            logger.warning("%s has no champion yet: nothing to compare the newest events with",
                           args.reference_model)
            return no_signal({**result, "reference_rows": 0, "current_rows": None}, STATUS_NO_REFERENCE)
        logger.info("reference: %s champion v%s, %s", args.reference_model, result["reference_version"],
                    reference_uri)
    reference = load_features(reference_uri, inputs + categorical, args.sample_rows, args.seed)
    current = load_features(args.current, inputs + categorical, args.sample_rows, args.seed)
    result.update(reference_rows=len(reference), current_rows=len(current))

    # Too little data: say so and never trigger.
    if len(current) < args.min_rows or len(reference) < args.min_rows:
        logger.warning("insufficient data for drift: %d current, %d reference rows (need %d)",
                       len(current), len(reference), args.min_rows)
        return no_signal(result, STATUS_INSUFFICIENT)

    # Columns constant on both sides cannot drift and make some tests undefined.
    both = pd.concat([reference, current], ignore_index=True)
    constant = [c for c in numeric + categorical if c in both.columns and both[c].nunique(dropna=False) <= 1]
    high_card = [c for c in categorical if c in both.columns and both[c].nunique() > MAX_CATEGORICAL_CARDINALITY]
    num_cols = [c for c in numeric if c in both.columns and c not in constant]
    cat_cols = [c for c in categorical if c in both.columns and c not in constant and c not in high_card]
    if not num_cols and not cat_cols:
        return {**result, "status": STATUS_OK, "drift_detected": False, "drift_share": 0.0, "drifted_columns": 0,
                "columns_tested": 0, "constant_columns": constant, "skipped_high_cardinality": high_card,
                "report_html_uri": None,
                "report_json_uri": None, "mlflow_run_id": None}
    definition = DataDefinition(numerical_columns=num_cols, categorical_columns=cat_cols)
    ref_ds = Dataset.from_pandas(reference[num_cols + cat_cols], data_definition=definition)
    cur_ds = Dataset.from_pandas(current[num_cols + cat_cols], data_definition=definition)
    snapshot = Report([DataDriftPreset(drift_share=args.threshold)]).run(current_data=cur_ds, reference_data=ref_ds)
    drifted, share = drift_share(snapshot.dict())
    detected = share >= args.threshold
    logger.info("drift: %d of %d columns drifted (share %.3f, threshold %.3f) -> %s", drifted,
                len(num_cols) + len(cat_cols), share, args.threshold, "DRIFT" if detected else "no drift")

    # Reports to the output URI and MLflow.
    with tempfile.TemporaryDirectory() as tmp:
        html, js = os.path.join(tmp, "drift_report.html"), os.path.join(tmp, "drift_report.json")
        snapshot.save_html(html)
        snapshot.save_json(js)
        for path in (html, js):
            with open(path, "rb") as handle:
                storage.write_bytes(storage.join(args.output, os.path.basename(path)), handle.read())
        tracking.configure()
        with mlflow.start_run(
            run_name=f"drift-{spec.name}",
            tags={
                tracking.TAG_DAG_RUN_ID: args.run_id, tracking.TAG_DATASET: spec.name, tracking.TAG_STAGE: "drift",
                "adfraud.drift_detected": str(detected).lower(),
                "adfraud.reference_version": str(result["reference_version"] or ""),
            },
        ) as run:
            mlflow.log_metrics({"drift_share": share, "drifted_columns": drifted})
            mlflow.log_params({"threshold": args.threshold, "reference": reference_uri[:500],
                               "current": ",".join(args.current)[:500]})
            mlflow.log_artifact(html, artifact_path="drift")
            mlflow.log_artifact(js, artifact_path="drift")
    return {
        **result,
        "status": STATUS_OK,
        "drift_detected": detected,
        "drift_share": share,
        "drifted_columns": drifted,
        "columns_tested": len(num_cols) + len(cat_cols),
        "constant_columns": constant,
        "skipped_high_cardinality": high_card,
        "report_html_uri": storage.join(args.output, "drift_report.html"),
        "report_json_uri": storage.join(args.output, "drift_report.json"),
        "mlflow_run_id": run.info.run_id,
    }


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("jobs.drift", __doc__.split("\n\n")[0])
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--reference", help="feature table URI of the training reference")
    ref.add_argument("--reference-model", help="registered model name: compare with its champion's training split")
    p.add_argument("--current", required=True, nargs="+",
                   help="feature table URI(s) of the newest events; several are read as one table")
    p.add_argument("--dataset", required=True, choices=sorted(datasets.DATASETS), help="dataset spec")
    p.add_argument("--output", required=True, help="URI for drift_report.html and drift_report.json")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="share of drifted columns that counts as drift")
    p.add_argument("--min-rows", type=int, default=500, help="fewer current rows than this: insufficient data")
    p.add_argument("--sample-rows", type=int, default=50_000, help="rows sampled from each side at most")
    p.add_argument("--seed", type=int, default=7, help="sampling seed")
    p.add_argument("--run-id", default="manual", help="orchestrator run id, recorded as an MLflow tag")
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    if not 0 < args.threshold <= 1:
        cli.fail("--threshold must be in (0, 1]")
    try:
        result = run(args)
    except FileNotFoundError as exc:
        cli.fail(f"not found: {exc}")
    except ValueError as exc:
        cli.fail(str(exc))
    cli.write_result(result, args.result_path)


if __name__ == "__main__":
    main()
