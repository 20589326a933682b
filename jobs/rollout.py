"""Point the serving configuration at the champion's ONNX model and smoke-test it.

Looks up the version that holds ``--alias`` (``champion`` by default) in the MLflow
registry, copies its ONNX file and preprocessor into the serving model store
(``<home>/serving/models/<name>/v<version>/``), scores a handful of events through
onnxruntime and only then replaces the serving configuration file atomically, so a
server that reads it never sees a model that failed its smoke check.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np

from jobs.common import cli, datasets, settings, storage, tracking
from jobs.common.features import Preprocessor
from jobs.common.training import load_split

logger = logging.getLogger(__name__)

# The evaluate stage's validation-chosen threshold, as logged on the training run.
THRESHOLD_METRIC = "test_fraud_threshold"


def serving_config_uri() -> str:
    return os.environ.get(settings.SERVING_CONFIG_ENV_VAR) or storage.join(settings.home(), "serving", "current.json")


def serving_config(model_name: str, version: int, pre: Preprocessor, store: str, **extra) -> dict:
    """The serving configuration (the format ``jobs.serve`` reads) of a model whose
    ``model.onnx`` and ``preprocessor.json`` lie under ``store``; ``extra`` adds optional
    keys (alias, threshold, tensorrt_uri, checkpoint_uri, provenance)."""
    return {
        "model_name": model_name,
        "version": int(version),
        "dataset": pre.dataset,
        "onnx_uri": storage.join(store, "model.onnx"),
        "preprocessor_uri": storage.join(store, "preprocessor.json"),
        "feature_spec_hash": pre.feature_spec_hash,
        **extra,
    }


def smoke_score(onnx_path: str, pre: Preprocessor, features_uri: str, rows: int) -> list[float]:
    """Scores of the first ``rows`` test events; fails unless all are probabilities."""
    import onnxruntime as ort

    spec = datasets.get(pre.dataset)
    _, test = load_split(storage.join(features_uri, "test"), spec, pre)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    out = session.run(["probability"], {"categorical": test.categorical[:rows], "numeric": test.numeric[:rows]})[0]
    if not (np.all(np.isfinite(out)) and np.all((out >= 0) & (out <= 1))):
        raise RuntimeError(f"smoke check failed: scores outside [0, 1]: {out[:5]}")
    return [round(float(x), 6) for x in out]


def run(args) -> dict:
    import mlflow
    from mlflow import MlflowClient

    tracking.configure()
    client = MlflowClient()
    version = client.get_model_version_by_alias(args.model_name, args.alias)

    # Fetch the version's deployable files into the serving model store.
    store = storage.join(settings.home(), "serving", "models", args.model_name, f"v{version.version}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="onnx/model.onnx",
                                                         dst_path=tmp)
        pre_local = mlflow.artifacts.download_artifacts(run_id=version.run_id,
                                                        artifact_path="model/preprocessor.json", dst_path=tmp)
        pre = Preprocessor.from_dict(storage.read_json(pre_local))
        if pre.feature_spec_hash != version.tags.get(tracking.TAG_FEATURE_SPEC, pre.feature_spec_hash):
            raise RuntimeError(f"{args.model_name} v{version.version}: preprocessor does not match its feature spec")
        scores = smoke_score(onnx_local, pre, args.features, args.rows)
        files = [(onnx_local, "model.onnx"), (pre_local, "preprocessor.json")]
        # A TensorRT engine exists when export ran on a GPU; GPU servers load it.
        engines = [a.path for a in client.list_artifacts(version.run_id, "tensorrt") if a.path.endswith(".plan")]
        if engines:
            files.append((mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=engines[0],
                                                              dst_path=tmp), "model.plan"))
        for local, name in files:
            with open(local, "rb") as handle:
                storage.write_bytes(storage.join(store, name), handle.read())
    # The blocking threshold that evaluate chose on validation (on the fraud score).
    run_metrics = client.get_run(version.run_id).data.metrics
    threshold = run_metrics.get(THRESHOLD_METRIC)
    if threshold is not None:
        # "Block nothing" is chosen as a threshold just above 1; servers accept [0, 1].
        threshold = min(max(float(threshold), 0.0), 1.0)
    if threshold is None:
        logger.warning("%s v%s has no %s metric: servers fall back to their own threshold", args.model_name,
                       version.version, THRESHOLD_METRIC)
    logger.info("smoke check of %s v%s on %d events: scores %s", args.model_name, version.version, len(scores),
                scores[:5])

    # Switch the serving configuration in one atomic write.
    config_uri = args.serving_config or serving_config_uri()
    config = serving_config(
        args.model_name, int(version.version), pre, store,
        alias=args.alias,
        threshold=threshold,
        tensorrt_uri=storage.join(store, "model.plan") if engines else None,
        mlflow_run_id=version.run_id,
        updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        dag_run_id=args.run_id,
    )
    storage.write_json(config_uri, config)
    client.set_model_version_tag(args.model_name, version.version, "adfraud.live_since", config["updated_at"])
    logger.info("serving now points at %s v%s (%s)", args.model_name, version.version, config_uri)
    return {**config, "serving_config_uri": config_uri, "live_version": int(version.version),
            "smoke_scores": scores, "smoke_rows": len(scores)}


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("jobs.rollout", __doc__.split("\n\n")[0])
    p.add_argument("--model-name", required=True, help="registered model name, e.g. adfraud-synthetic")
    p.add_argument("--alias", default="champion", help="registry alias to serve")
    p.add_argument("--features", required=True, help="ETL output URI; test events feed the smoke check")
    p.add_argument("--rows", type=int, default=16, help="events scored by the smoke check")
    p.add_argument("--serving-config", default=None,
                   help=f"serving configuration URI (default ${settings.SERVING_CONFIG_ENV_VAR} or <home>/serving/current.json)")
    p.add_argument("--run-id", default="manual", help="orchestrator run id, recorded in the serving config")
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    cli.write_result(run(args), args.result_path)


if __name__ == "__main__":
    main()
