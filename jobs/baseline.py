"""A gradient-boosting baseline on the same features and split as the neural model.

LightGBM with the categorical ids as native categorical features and the raw numeric
features, early-stopped on validation average precision. Its test metrics are logged
beside the neural model's in the same MLflow run, so a reviewer sees at a glance
whether the network earns its keep, and the registry records them on the version.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np

from jobs.common import cli, datasets, metrics, storage, tracking
from jobs.common.features import Preprocessor
from jobs.common.training import load_split

logger = logging.getLogger(__name__)

DEFAULT_PARAMS = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_child_samples": 20,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.9,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_cat_to_onehot": 8,
    "cat_smooth": 10.0,
    "verbose": -1,
    "deterministic": True,
    "force_col_wise": True,
}


def matrix(frame, pre: Preprocessor) -> tuple[np.ndarray, list[str]]:
    """Categorical ids then raw numeric features (trees need no scaling)."""
    cats, _ = pre.transform(frame)
    nums = np.column_stack([frame[c].to_numpy(dtype=np.float64) for c in pre.numeric_columns])
    return np.column_stack([cats.astype(np.float64), nums]), pre.categorical_columns + pre.numeric_columns


def run(args) -> dict:
    import lightgbm as lgb
    import mlflow

    started = time.monotonic()
    pre = Preprocessor.from_dict(storage.read_json(storage.join(args.features, "preprocessor.json")))
    spec = datasets.get(pre.dataset)
    splits = {}
    for name in ("train", "validation", "test"):
        frame, arrays = load_split(storage.join(args.features, name), spec, pre)
        x, columns = matrix(frame, pre)
        splits[name] = (x, arrays.label.astype(np.int64))

    # Fit with early stopping on validation average precision.
    x_train, y_train = splits["train"]
    pos = max(int(y_train.sum()), 1)
    params = {**DEFAULT_PARAMS, "seed": args.seed, "num_threads": os.cpu_count() or 1,
              "scale_pos_weight": (len(y_train) - pos) / pos if args.balanced else 1.0,
              "metric": "average_precision"}
    cat_idx = list(range(len(pre.categorical_columns)))
    train_set = lgb.Dataset(x_train, y_train, feature_name=columns, categorical_feature=cat_idx, free_raw_data=False)
    val_set = lgb.Dataset(*splits["validation"], reference=train_set, categorical_feature=cat_idx)
    booster = lgb.train(
        params, train_set, num_boost_round=args.rounds, valid_sets=[val_set],
        callbacks=[lgb.early_stopping(args.early_stopping_rounds, verbose=False)],
    )
    logger.info("LightGBM: %d rounds (best %d)", booster.current_iteration(), booster.best_iteration)

    # Test metrics, on the same rows as the neural model's.
    scores = {name: booster.predict(x, num_iteration=booster.best_iteration) for name, (x, _) in splits.items()}
    test = metrics.ranking_metrics(splits["test"][1], scores["test"])
    validation = metrics.ranking_metrics(splits["validation"][1], scores["validation"])
    importance = dict(zip(columns, booster.feature_importance("gain").round(1).tolist(), strict=True))
    result = {
        "dataset": spec.name,
        "model": "lightgbm",
        "test_auc": test["auc"],
        "test_pr_auc": test["pr_auc"],
        "test_brier": test["brier"],
        "validation_auc": validation["auc"],
        "validation_pr_auc": validation["pr_auc"],
        "best_iteration": booster.best_iteration,
        "feature_importance_gain": dict(sorted(importance.items(), key=lambda kv: -kv[1])),
    }
    logger.info("baseline test AUC %.4f, PR-AUC %.4f", test["auc"] or float("nan"), test["pr_auc"] or float("nan"))

    # Model, metrics and MLflow.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lightgbm.txt")
        booster.save_model(path, num_iteration=booster.best_iteration)
        with open(path, "rb") as handle:
            storage.write_bytes(storage.join(args.output, "lightgbm.txt"), handle.read())
        storage.write_json(storage.join(args.output, "metrics.json"), result)
        if args.mlflow_run_id:
            tracking.configure()
            with mlflow.start_run(run_id=args.mlflow_run_id):
                mlflow.log_metrics({f"baseline_{k}": v for k, v in result.items()
                                    if isinstance(v, float) and v is not None})
                mlflow.log_artifact(path, artifact_path="baseline")
    return {**result, "metrics_uri": storage.join(args.output, "metrics.json"),
            "model_uri": storage.join(args.output, "lightgbm.txt"), "mlflow_run_id": args.mlflow_run_id,
            "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("jobs.baseline", __doc__.split("\n\n")[0])
    p.add_argument("--features", required=True, help="ETL output URI (train/, validation/, test/, preprocessor.json)")
    p.add_argument("--output", required=True, help="URI for lightgbm.txt and metrics.json")
    p.add_argument("--mlflow-run-id", default=None, help="MLflow run to log the baseline's metrics to")
    p.add_argument("--rounds", type=int, default=1000, help="maximum boosting rounds")
    p.add_argument("--early-stopping-rounds", type=int, default=50, help="rounds without validation gain")
    p.add_argument("--balanced", action="store_true", help="weight positives by negatives / positives")
    p.add_argument("--seed", type=int, default=7, help="LightGBM seed")
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    cli.write_result(run(args), args.result_path)


if __name__ == "__main__":
    main()
