"""Evaluate a trained model on the test split, with a threshold chosen on validation.

Reports AUC-ROC, PR-AUC and Brier score on the test split, precision, recall and the
confusion matrix at the validation-chosen threshold, metrics per segment, and (on
synthetic data) the generator's Bayes-optimal AUC on the same rows. ROC, PR and
reliability curves go to a PNG; everything is logged to the training run in MLflow.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import pandas as pd

from jobs.common import cli, datasets, metrics, storage, tracking
from jobs.common.features import Preprocessor
from jobs.common.model import load_checkpoint, predict_proba
from jobs.common.training import load_split

logger = logging.getLogger(__name__)

# Segments with fewer rows than this are not reported on their own.
MIN_SEGMENT_ROWS = 200
MAX_SEGMENTS = 10


def load_model(model_uri: str):
    """The network and preprocessor saved by ``train`` under ``model_uri``."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.pt")
        with open(local, "wb") as handle:
            handle.write(storage.read_bytes(storage.join(model_uri, "model.pt")))
        net, _ = load_checkpoint(local)
    pre = Preprocessor.from_dict(storage.read_json(storage.join(model_uri, "preprocessor.json")))
    return net, pre


def score_split(net, pre: Preprocessor, uri: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    spec = datasets.get(pre.dataset)
    frame, arrays = load_split(uri, spec, pre)
    return frame, arrays.label.astype(np.int64), predict_proba(net, arrays.categorical, arrays.numeric)


def segment_values(frame: pd.DataFrame, spec: datasets.DatasetSpec, segment: str) -> pd.Series:
    """The value of ``segment`` for every row: a column, or the derived device class."""
    if segment == datasets.DEVICE_CLASS:
        return frame[spec.agent].map(datasets.device_class).astype("string")
    return frame[segment].astype("string")


def segment_metrics(values: pd.Series, label: np.ndarray, score: np.ndarray) -> dict:
    """Ranking metrics of the :data:`MAX_SEGMENTS` largest values with enough rows."""
    out = {}
    for value, rows in values.value_counts().iloc[:MAX_SEGMENTS].items():
        if rows < MIN_SEGMENT_ROWS:
            continue
        mask = (values == value).to_numpy()
        out[str(value)] = metrics.ranking_metrics(label[mask], score[mask])
    return out


def run(
    model_uri: str,
    features_uri: str,
    output_uri: str,
    mlflow_run_id: str | None,
    objective: str = "savings",
    blocked_legit_loss: float = 0.5,
    default_click_cost: float = 1.0,
) -> dict:
    import mlflow

    net, pre = load_model(model_uri)
    spec = datasets.get(pre.dataset)

    # Ranking metrics on the dataset's own label.
    val_frame, val_label, val_score = score_split(net, pre, storage.join(features_uri, "validation"))
    test_frame, test_label, test_score = score_split(net, pre, storage.join(features_uri, "test"))
    test = metrics.ranking_metrics(test_label, test_score)
    validation = metrics.ranking_metrics(val_label, val_score)

    # Blocking decisions are about fraud: flip the label where 1 means genuine traffic.
    def fraud_view(frame, label, score):
        is_fraud = label if spec.positive_is_fraud else 1 - label
        fraud_score = score if spec.positive_is_fraud else 1.0 - score
        cost = frame[spec.cost].to_numpy(dtype=np.float64) if spec.cost else np.full(len(label), default_click_cost)
        return is_fraud, fraud_score, cost

    v_fraud, v_score, v_cost = fraud_view(val_frame, val_label, val_score)
    t_fraud, t_score, t_cost = fraud_view(test_frame, test_label, test_score)
    if objective == "savings":
        threshold, _ = metrics.choose_threshold_savings(v_fraud, v_score, v_cost, blocked_legit_loss)
    else:
        threshold = metrics.choose_threshold(v_fraud, v_score)
    at = metrics.at_threshold(t_fraud, t_score, threshold)
    best_possible = float(t_cost[t_fraud.astype(bool)].sum())
    savings = metrics.savings_at(t_fraud, t_score, t_cost, blocked_legit_loss, threshold)
    result = {
        "dataset": spec.name,
        "label": spec.label,
        "label_meaning": spec.label_meaning,
        "test_auc": test["auc"],
        "test_pr_auc": test["pr_auc"],
        "test_brier": test["brier"],
        "test_rows": test["rows"],
        "test_positives": test["positives"],
        "validation_auc": validation["auc"],
        "validation_pr_auc": validation["pr_auc"],
        "threshold_objective": objective,
        "blocked_legit_loss": blocked_legit_loss,
        "test_savings": savings,
        "test_savings_best_possible": best_possible,
        "test_savings_fraction": savings / best_possible if best_possible else None,
        **{f"test_fraud_{k}": v for k, v in at.items()},
    }
    if "fraud_probability" in test_frame.columns:
        bayes = metrics.ranking_metrics(test_label, test_frame["fraud_probability"].to_numpy())
        result["test_bayes_auc"] = bayes["auc"]
        if bayes["auc"] and test["auc"]:
            result["auc_fraction_of_bayes"] = test["auc"] / bayes["auc"]
    result["segments"] = {
        segment: segment_metrics(segment_values(test_frame, spec, segment), test_label, test_score)
        for segment in spec.segments
    }
    for segment, table in result["segments"].items():
        logger.info("test AUC by %s: %s", segment, ", ".join(
            f"{value} {m['auc']:.3f} ({m['positives']}/{m['rows']})" if m["auc"] is not None
            else f"{value} n/a ({m['positives']}/{m['rows']})" for value, m in table.items()))
    logger.info(
        "test AUC %.4f, PR-AUC %.4f on %d rows (%d positive); blocking fraud score >= %.4f: precision %.3f, "
        "recall %.3f, saves %.2f of %.2f",
        test["auc"] or float("nan"), test["pr_auc"] or float("nan"), test["rows"], test["positives"],
        threshold, at["precision"], at["recall"], savings, best_possible,
    )

    # Scores, metrics and plots to the output URI and MLflow.
    scores = pd.DataFrame({spec.event_id: test_frame[spec.event_id], "label": test_label, "score": test_score})
    import pyarrow as pa

    storage.write_table(pa.Table.from_pandas(scores, preserve_index=False), storage.join(output_uri, "test_scores"))
    storage.write_json(storage.join(output_uri, "metrics.json"), result)
    with tempfile.TemporaryDirectory() as tmp:
        plot = os.path.join(tmp, "test_curves.png")
        metrics.plot_curves(test_label, test_score, f"{spec.name}: test split ({spec.label})", plot)
        with open(plot, "rb") as handle:
            storage.write_bytes(storage.join(output_uri, "test_curves.png"), handle.read())
        if mlflow_run_id:
            tracking.configure()
            with mlflow.start_run(run_id=mlflow_run_id):
                flat = {k: v for k, v in result.items() if isinstance(v, (int, float)) and v is not None}
                flat.update({f"test_fraud_{k}": v for k, v in at["confusion_matrix"].items()})
                mlflow.log_metrics({k: float(v) for k, v in flat.items()})
                mlflow.log_artifact(plot, artifact_path="evaluation")
                mlflow.log_dict(result, "evaluation/metrics.json")
    result.update({
        "metrics_uri": storage.join(output_uri, "metrics.json"),
        "plot_uri": storage.join(output_uri, "test_curves.png"),
        "scores_uri": storage.join(output_uri, "test_scores"),
        "model_uri": model_uri,
        "features_uri": features_uri,
        "mlflow_run_id": mlflow_run_id,
    })
    return result


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("jobs.evaluate", __doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model URI written by train (model.pt, preprocessor.json)")
    p.add_argument("--features", required=True, help="ETL output URI (validation/, test/)")
    p.add_argument("--output", required=True, help="URI for metrics.json, test_scores/ and plots")
    p.add_argument("--mlflow-run-id", default=None, help="MLflow run to log to (the training run)")
    p.add_argument("--threshold-objective", choices=("savings", "f1"), default="savings",
                   help="how the blocking threshold is chosen on validation: money saved, or F1 on fraud")
    p.add_argument("--blocked-legit-loss", type=float, default=0.5,
                   help="money lost per blocked legitimate click (same unit as click costs)")
    p.add_argument("--default-click-cost", type=float, default=1.0,
                   help="cost of a click for datasets that carry none (TalkingData)")
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    if args.blocked_legit_loss < 0:
        cli.fail("--blocked-legit-loss must be >= 0")
    result = run(args.model, args.features, args.output, args.mlflow_run_id, args.threshold_objective,
                 args.blocked_legit_loss, args.default_click_cost)
    cli.write_result(result, args.result_path)


if __name__ == "__main__":
    main()
