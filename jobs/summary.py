"""The end-of-run summary a user reads first: rows, quality, registry, parity, drift."""

from __future__ import annotations

import logging
from typing import Any

from jobs.common import storage

logger = logging.getLogger(__name__)


def build_summary(results: dict[str, dict | None], source: str, run_id: str) -> dict[str, Any]:
    """Pick the headline figures out of every stage's JSON result."""
    data = results.get("generate") if source == "synthetic" else results.get("ingest")
    data = data or {}
    etl = results.get("etl") or {}
    evaluation = results.get("evaluate") or {}
    export = results.get("export") or {}
    register = results.get("register") or {}
    drift = results.get("drift") or {}
    rollout = results.get("rollout") or {}
    out: dict[str, Any] = {
        "run_id": run_id,
        "source": source,
        "rows": data.get("rows"),
        "rows_read": data.get("rows_read", data.get("rows")),
        "rows_quarantined": data.get("rows_quarantined", 0),
        "splits": {k: v.get("rows") for k, v in (etl.get("splits") or {}).items()},
        "test_auc": evaluation.get("test_auc"),
        "test_pr_auc": evaluation.get("test_pr_auc"),
        "test_positives": evaluation.get("test_positives"),
        "label_meaning": evaluation.get("label_meaning"),
        "model_name": register.get("model_name"),
        "model_version": register.get("version"),
        "aliases": register.get("aliases"),
        "promoted": register.get("promoted"),
        "gate_reason": register.get("gate_reason"),
        "champion_version": register.get("champion_version"),
        "live_version": rollout.get("live_version"),
        "onnx_max_abs_diff": (export.get("onnx_parity") or {}).get("max_abs_diff"),
        "onnx_parity_passed": (export.get("onnx_parity") or {}).get("passed"),
        "tensorrt": (export.get("tensorrt") or {}).get("reason", "built" if export.get("tensorrt") else None),
        "drift_status": drift.get("status"),
        "drift_share": drift.get("drift_share"),
        "drift_report": drift.get("report_html_uri"),
        "mlflow_run_id": (results.get("train") or {}).get("mlflow_run_id"),
    }
    if source == "synthetic":
        out["true_fraud_rate"] = data.get("fraud_rate")
        out["bayes_auc"] = data.get("bayes_auc")
        out["test_bayes_auc"] = evaluation.get("test_bayes_auc")
        out["auc_fraction_of_bayes"] = evaluation.get("auc_fraction_of_bayes")
        out["scenarios"] = {k: v.get("events") if isinstance(v, dict) else v
                            for k, v in (data.get("scenarios") or {}).items()}
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"adfraud retrain {summary['run_id']} ({summary['source']})"]
    keys = ["rows", "rows_quarantined", "splits", "true_fraud_rate", "bayes_auc", "test_auc", "test_pr_auc",
            "test_bayes_auc", "auc_fraction_of_bayes", "baseline_test_auc", "model_name", "model_version",
            "aliases", "gate_passed", "gate_reason", "review_decision", "reviewer", "auto_approved", "promoted",
            "champion_version", "live_version", "triggered_by", "trigger_drift_share", "trigger_drift_report", "onnx_max_abs_diff", "tensorrt", "drift_status", "drift_share",
            "drift_report", "mlflow_run_id"]
    for key in keys:
        if key in summary and summary[key] is not None:
            lines.append(f"  {key:<22} {_fmt(summary[key])}")
    return "\n".join(lines)


def log_summary(summary: dict[str, Any]) -> None:
    for line in format_summary(summary).splitlines():
        logger.info("%s", line)


def write_summary(summary: dict[str, Any], uri: str) -> None:
    storage.write_json(uri, summary)


def latest_summary(runs_uri: str) -> str:
    """The newest ``summary.json`` under a runs directory (local paths)."""
    import glob
    import os

    paths = glob.glob(os.path.join(storage.local_path(runs_uri), "*", "summary.json"))
    if not paths:
        raise FileNotFoundError(f"no summary.json under {runs_uri}")
    return max(paths, key=os.path.getmtime)


def main(argv: list[str] | None = None) -> None:
    import sys

    from jobs.common import cli

    p = cli.parser("jobs.summary", "Print the summary of a retraining run.")
    p.add_argument("--latest", metavar="RUNS_DIR", help="print the newest summary.json under RUNS_DIR")
    p.add_argument("--file", help="print this summary.json")
    args = p.parse_args(argv)
    if not (args.latest or args.file):
        cli.fail("give --latest RUNS_DIR or --file SUMMARY_JSON")
    path = args.file or latest_summary(args.latest)
    sys.stdout.write(format_summary(storage.read_json(path)) + f"\n  {'summary':<22} {path}\n")


if __name__ == "__main__":
    main()
