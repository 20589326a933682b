"""Register the trained model in MLflow and run the promotion gate.

Every new version gets the alias ``challenger``. The gate then scores the current
``champion`` on the *same* test split as the challenger and moves ``champion`` only when
the challenger's AUC beats it by more than ``--min-auc-margin`` and its PR-AUC drops by
no more than ``--max-pr-auc-drop``. The first model of a registered name becomes
champion. Registry stages are never used: aliases only. Decisions and their reasons are
recorded as version tags.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

from jobs.common import cli, datasets, metrics, storage, tracking

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"

TAG_GATE = "adfraud.gate"
TAG_GATE_REASON = "adfraud.gate_reason"
TAG_TEST_AUC = "adfraud.test_auc"
TAG_TEST_PR_AUC = "adfraud.test_pr_auc"
TAG_PROMOTED_AT = "adfraud.promoted_at"
TAG_CODE_REVISION = "adfraud.code_revision"
TAG_ONNX_URI = "adfraud.onnx_artifact"


@dataclass(frozen=True)
class GatePolicy:
    """When a challenger may replace the champion.

    :param min_auc_margin: the challenger's test AUC must exceed the champion's by more
        than this (0 = strictly better).
    :param max_pr_auc_drop: the challenger's PR-AUC may be lower than the champion's by
        at most this much.
    """

    min_auc_margin: float = 0.0
    max_pr_auc_drop: float = 0.01

    def decide(self, challenger: dict, champion: dict | None) -> tuple[bool, str]:
        """(promote?, reason) for two metric dicts with ``auc`` and ``pr_auc``."""
        if champion is None:
            return True, "no champion yet: the first model becomes champion"
        if challenger["auc"] is None or champion["auc"] is None:
            return False, "AUC undefined on the test split (one class only)"
        if challenger["auc"] <= champion["auc"] + self.min_auc_margin:
            return False, (
                f"AUC {challenger['auc']:.4f} does not beat champion {champion['auc']:.4f} "
                f"by more than {self.min_auc_margin:g}"
            )
        drop = (champion["pr_auc"] or 0.0) - (challenger["pr_auc"] or 0.0)
        if drop > self.max_pr_auc_drop:
            return False, f"PR-AUC drops by {drop:.4f} > {self.max_pr_auc_drop:g} against the champion"
        return True, (
            f"AUC {challenger['auc']:.4f} beats champion {champion['auc']:.4f}; PR-AUC change {-drop:+.4f}"
        )


def code_revision() -> str:
    """The git revision of the code, from ``ADFRAUD_CODE_REVISION`` (images) or git."""
    explicit = os.environ.get("ADFRAUD_CODE_REVISION")
    if explicit:
        return explicit
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def score_version_on(client, name: str, version, features_uri: str, feature_spec_hash: str) -> dict | None:
    """Test metrics of a registered version on ``features_uri``'s test split.

    Returns None when the version was trained on other features (it cannot be scored on
    this table); the caller treats that as "no comparable champion".
    """
    from jobs.evaluate import load_model, score_split

    import mlflow

    if version.tags.get(tracking.TAG_FEATURE_SPEC) != feature_spec_hash:
        logger.warning("champion v%s has feature spec %s, not %s: not comparable", version.version,
                       version.tags.get(tracking.TAG_FEATURE_SPEC), feature_spec_hash)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="model", dst_path=tmp)
        net, pre = load_model(local)
        _, label, score = score_split(net, pre, storage.join(features_uri, "test"))
    return metrics.ranking_metrics(label, score)


def run(args) -> dict:
    import mlflow
    from mlflow import MlflowClient

    tracking.configure()
    client = MlflowClient()
    evaluation = storage.read_json(args.metrics)
    spec = datasets.get(evaluation["dataset"])
    name = tracking.model_name(spec.name)
    run_info = client.get_run(args.mlflow_run_id)
    feature_hash = run_info.data.tags.get(tracking.TAG_FEATURE_SPEC, "")

    # Log the model in MLflow's PyTorch format and register a new version.
    from jobs.evaluate import load_model

    from jobs.common.model import FraudProbability

    net, _ = load_model(args.model)
    # Pickle format: pt2 wants a single-tensor signature and the net takes two inputs.
    # The pickled class lives in jobs.common.model, installed in every image.
    with mlflow.start_run(run_id=args.mlflow_run_id):
        info = mlflow.pytorch.log_model(
            FraudProbability(net).eval(), name="pytorch-model", registered_model_name=name,
            serialization_format="pickle", await_registration_for=60,
        )
    version = client.get_model_version(name, str(info.registered_model_version))
    challenger = {"auc": evaluation["test_auc"], "pr_auc": evaluation["test_pr_auc"]}
    tags = {
        tracking.TAG_DAG_RUN_ID: args.run_id,
        tracking.TAG_DATASET: spec.name,
        tracking.TAG_FEATURE_SPEC: feature_hash,
        tracking.TAG_DATA_URI: run_info.data.tags.get(tracking.TAG_DATA_URI, ""),
        tracking.TAG_BACKEND: run_info.data.tags.get(tracking.TAG_BACKEND, ""),
        TAG_CODE_REVISION: code_revision(),
        TAG_TEST_AUC: f"{challenger['auc']}",
        TAG_TEST_PR_AUC: f"{challenger['pr_auc']}",
        TAG_ONNX_URI: f"runs:/{args.mlflow_run_id}/onnx/model.onnx",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    logger.info("registered %s version %s as %s", name, version.version, CHALLENGER)

    # Gate against the champion, scored on this run's test split.
    policy = GatePolicy(args.min_auc_margin, args.max_pr_auc_drop)
    champion_version = current_alias(client, name, CHAMPION)
    champion_metrics = None
    if champion_version is not None and champion_version.version != version.version:
        champion_metrics = score_version_on(client, name, champion_version, args.features, feature_hash)
        if champion_metrics is None:
            champion_version = None
    promote, reason = policy.decide(challenger, champion_metrics)
    client.set_model_version_tag(name, version.version, TAG_GATE, "passed" if promote else "failed")
    client.set_model_version_tag(name, version.version, TAG_GATE_REASON, reason)
    logger.info("gate %s: %s", "passed" if promote else "failed", reason)

    # Move the champion alias only if nobody moved it since we read it.
    if promote:
        fresh = current_alias(client, name, CHAMPION)
        before = champion_version.version if champion_version else None
        now = fresh.version if fresh else None
        if now != before:
            promote, reason = False, f"champion moved from v{before} to v{now} during the gate; re-run to compare"
            client.set_model_version_tag(name, version.version, TAG_GATE_REASON, reason)
            logger.warning("%s", reason)
        else:
            client.set_registered_model_alias(name, CHAMPION, version.version)
            client.set_model_version_tag(name, version.version, TAG_PROMOTED_AT, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            logger.info("%s version %s is now %s", name, version.version, CHAMPION)

    aliases = [CHALLENGER] + ([CHAMPION] if promote else [])
    champion_now = current_alias(client, name, CHAMPION)
    return {
        "model_name": name,
        "version": int(version.version),
        "aliases": aliases,
        "promoted": promote,
        "gate_reason": reason,
        "challenger_metrics": challenger,
        "champion_metrics": champion_metrics,
        "previous_champion_version": int(champion_version.version) if champion_version else None,
        "champion_version": int(champion_now.version) if champion_now else None,
        "mlflow_run_id": args.mlflow_run_id,
        "tracking_uri": mlflow.get_tracking_uri(),
    }


def current_alias(client, name: str, alias: str):
    """The version holding ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("jobs.register", __doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model URI written by train")
    p.add_argument("--features", required=True, help="ETL output URI; the champion is scored on its test split")
    p.add_argument("--metrics", required=True, help="metrics.json written by evaluate")
    p.add_argument("--mlflow-run-id", required=True, help="the training run that holds the model artifacts")
    p.add_argument("--run-id", default="manual", help="orchestrator run id, recorded as a version tag")
    p.add_argument("--min-auc-margin", type=float, default=0.0, help="AUC the challenger must add over the champion")
    p.add_argument("--max-pr-auc-drop", type=float, default=0.01, help="largest PR-AUC loss the gate accepts")
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    cli.write_result(run(args), args.result_path)


if __name__ == "__main__":
    main()
