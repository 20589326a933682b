"""Register the trained model in MLflow and run the promotion gate.

Every new version gets the alias ``challenger`` and tags that trace it to its inputs:
the DAG run, the code revision, the data snapshot (feature table URI), the feature-spec
hash, the training backend, its own test metrics and the LightGBM baseline's. The gate
then scores the current ``champion`` on the *same* test split as the challenger: it
passes when the challenger's AUC beats the champion's by more than ``--min-auc-margin``
and its PR-AUC drops by no more than ``--max-pr-auc-drop``; the first model of a
registered name passes. The outcome and its reason are version tags, and a challenger
that fails stays ``challenger``.

Register never moves ``champion``: :mod:`jobs.promote` does that after the review, and
only if the champion is still the version this gate compared against (reported as
``champion_version_at_gate``). Registry stages are never used: aliases only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass

from jobs.common import cli, datasets, metrics, storage, tracking

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"

TAG_GATE = "adfraud.gate"
TAG_GATE_REASON = "adfraud.gate_reason"
TAG_TEST_AUC = "adfraud.test_auc"
TAG_TEST_PR_AUC = "adfraud.test_pr_auc"
TAG_CODE_REVISION = "adfraud.code_revision"
TAG_ONNX_URI = "adfraud.onnx_artifact"
TAG_BASELINE_AUC = "adfraud.baseline_test_auc"
TAG_BASELINE_PR_AUC = "adfraud.baseline_test_pr_auc"
TAG_BASELINE_METRICS = "adfraud.baseline_metrics_uri"
# The drift check that started this retrain (asset-triggered runs only); the report
# tag also goes on the training run so the MLflow run links to its report.
TAG_DRIFT_REPORT = "adfraud.drift_report"
TAG_DRIFT_SHARE = "adfraud.drift_share"
TAG_DRIFT_RUN_ID = "adfraud.drift_mlflow_run_id"

GATE_PASSED = "passed"
GATE_FAILED = "failed"

# Seconds to wait for MLflow to finish creating a model version.
REGISTRATION_WAIT_S = 60


@dataclass(frozen=True)
class GatePolicy:
    """When a challenger may replace the champion.

    :param min_auc_margin: the challenger's test AUC must exceed the champion's by more
        than this (0 = strictly better; a negative margin lets a slightly worse model
        through, which only tests should do).
    :param max_pr_auc_drop: the challenger's PR-AUC may be lower than the champion's by
        at most this much.
    """

    min_auc_margin: float = 0.0
    max_pr_auc_drop: float = 0.01

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_auc_margin <= 1.0:
            raise ValueError(f"min_auc_margin must be in [-1, 1], got {self.min_auc_margin}")
        if not 0.0 <= self.max_pr_auc_drop <= 1.0:
            raise ValueError(f"max_pr_auc_drop must be in [0, 1], got {self.max_pr_auc_drop}")

    def decide(self, challenger: dict, champion: dict | None) -> tuple[bool, str]:
        """(passed?, reason) for two metric dicts with ``auc`` and ``pr_auc``."""
        if challenger["auc"] is None:
            return False, "challenger AUC undefined on the test split (one class only)"
        if champion is None:
            return True, "no comparable champion yet: the first model passes"
        if champion["auc"] is None:
            return False, "champion AUC undefined on the test split (one class only)"
        if challenger["auc"] <= champion["auc"] + self.min_auc_margin:
            return False, (
                f"AUC {challenger['auc']:.4f} does not beat champion {champion['auc']:.4f} "
                f"by more than {self.min_auc_margin:g}"
            )
        drop = (champion["pr_auc"] or 0.0) - (challenger["pr_auc"] or 0.0)
        if drop > self.max_pr_auc_drop:
            return False, f"PR-AUC drops by {drop:.4f} > {self.max_pr_auc_drop:g} against the champion"
        return True, (
            f"AUC {challenger['auc']:.4f} beats champion {champion['auc']:.4f} "
            f"(margin {self.min_auc_margin:g}); PR-AUC change {-drop:+.4f}"
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


def current_alias(client, name: str, alias: str):
    """The version holding ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def score_version_on(client, name: str, version, features_uri: str, feature_spec_hash: str) -> dict | None:
    """Test metrics of a registered version on ``features_uri``'s test split.

    Returns None when the version was trained on other features (it cannot be scored on
    this table); the caller treats that as "no comparable champion".
    """
    import mlflow

    from jobs.evaluate import load_model, score_split

    if version.tags.get(tracking.TAG_FEATURE_SPEC) != feature_spec_hash:
        logger.warning("champion v%s has feature spec %s, not %s: not comparable", version.version,
                       version.tags.get(tracking.TAG_FEATURE_SPEC), feature_spec_hash)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="model", dst_path=tmp)
        net, pre = load_model(local)
        _, label, score = score_split(net, pre, storage.join(features_uri, "test"))
    return metrics.ranking_metrics(label, score)


def baseline_metrics(uri: str | None) -> dict | None:
    """``test_auc`` / ``test_pr_auc`` of the baseline's metrics JSON, or None without one."""
    if not uri:
        return None
    payload = storage.read_json(uri)
    return {"auc": payload.get("test_auc"), "pr_auc": payload.get("test_pr_auc"), "metrics_uri": uri}


def drift_trigger(args) -> dict | None:
    """The drift check that triggered this run, from the ``--drift-*`` flags (None if none)."""
    if not args.drift_report:
        return None
    return {"report_uri": args.drift_report, "drift_share": args.drift_share, "mlflow_run_id": args.drift_run_id}


def version_tags(args, spec_name: str, run_tags: dict, challenger: dict, baseline: dict | None,
                 trigger: dict | None) -> dict[str, str]:
    """Every tag a new version carries (MLflow tags are strings)."""
    tags = {
        tracking.TAG_DAG_RUN_ID: args.run_id,
        tracking.TAG_DATASET: spec_name,
        tracking.TAG_FEATURE_SPEC: run_tags.get(tracking.TAG_FEATURE_SPEC, ""),
        tracking.TAG_DATA_URI: run_tags.get(tracking.TAG_DATA_URI, ""),
        tracking.TAG_BACKEND: run_tags.get(tracking.TAG_BACKEND, ""),
        TAG_CODE_REVISION: code_revision(),
        TAG_TEST_AUC: f"{challenger['auc']}",
        TAG_TEST_PR_AUC: f"{challenger['pr_auc']}",
        TAG_ONNX_URI: f"runs:/{args.mlflow_run_id}/onnx/model.onnx",
    }
    if baseline:
        tags[TAG_BASELINE_AUC] = f"{baseline['auc']}"
        tags[TAG_BASELINE_PR_AUC] = f"{baseline['pr_auc']}"
        tags[TAG_BASELINE_METRICS] = baseline["metrics_uri"]
    if trigger:
        tags[TAG_DRIFT_REPORT] = trigger["report_uri"]
        tags[TAG_DRIFT_SHARE] = f"{trigger['drift_share']}"
        tags[TAG_DRIFT_RUN_ID] = trigger["mlflow_run_id"] or ""
    return tags


def run(args) -> dict:
    import mlflow
    from mlflow import MlflowClient

    from jobs.common.model import FraudProbability
    from jobs.evaluate import load_model

    tracking.configure()
    client = MlflowClient()
    policy = GatePolicy(args.min_auc_margin, args.max_pr_auc_drop)
    evaluation = storage.read_json(args.metrics)
    spec = datasets.get(evaluation["dataset"])
    name = tracking.model_name(spec.name)
    run_info = client.get_run(args.mlflow_run_id)
    run_tags = run_info.data.tags
    feature_hash = run_tags.get(tracking.TAG_FEATURE_SPEC, "")
    challenger = {"auc": evaluation["test_auc"], "pr_auc": evaluation["test_pr_auc"]}
    baseline = baseline_metrics(args.baseline_metrics)
    trigger = drift_trigger(args)

    # Log the model in MLflow's PyTorch format and register a new version. Concurrent
    # registrations get distinct version numbers from the registry itself.
    net, _ = load_model(args.model)
    # Pickle format: pt2 wants a single-tensor signature and the net takes two inputs.
    # The pickled class lives in jobs.common.model, installed in every image.
    with mlflow.start_run(run_id=args.mlflow_run_id):
        info = mlflow.pytorch.log_model(
            FraudProbability(net).eval(), name="pytorch-model", registered_model_name=name,
            serialization_format="pickle", await_registration_for=REGISTRATION_WAIT_S,
        )
        if trigger:
            mlflow.set_tags({TAG_DRIFT_REPORT: trigger["report_uri"], TAG_DRIFT_SHARE: f"{trigger['drift_share']}",
                             TAG_DRIFT_RUN_ID: trigger["mlflow_run_id"] or ""})
    version = client.get_model_version(name, str(info.registered_model_version))
    for key, value in version_tags(args, spec.name, run_tags, challenger, baseline, trigger).items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    logger.info("registered %s version %s as %s (test AUC %s, baseline AUC %s)", name, version.version,
                CHALLENGER, challenger["auc"], baseline["auc"] if baseline else "n/a")

    # Gate against the champion, scored on this run's test split.
    champion_version = current_alias(client, name, CHAMPION)
    champion_metrics = None
    if champion_version is not None:
        champion_metrics = score_version_on(client, name, champion_version, args.features, feature_hash)
    passed, reason = policy.decide(challenger, champion_metrics)
    client.set_model_version_tag(name, version.version, TAG_GATE, GATE_PASSED if passed else GATE_FAILED)
    client.set_model_version_tag(name, version.version, TAG_GATE_REASON, reason)
    if passed:
        logger.info("gate passed for %s v%s: %s", name, version.version, reason)
    else:
        logger.warning("gate failed for %s v%s, it stays %s: %s", name, version.version, CHALLENGER, reason)

    at_gate = int(champion_version.version) if champion_version else None
    return {
        "model_name": name,
        "version": int(version.version),
        "aliases": [CHALLENGER],
        "gate_passed": passed,
        "gate_reason": reason,
        "gate_policy": {"min_auc_margin": policy.min_auc_margin, "max_pr_auc_drop": policy.max_pr_auc_drop},
        "challenger_metrics": challenger,
        "champion_metrics": champion_metrics,
        "baseline_metrics": baseline,
        "drift_trigger": trigger,
        "champion_version_at_gate": at_gate,
        "champion_version": at_gate,
        "mlflow_run_id": args.mlflow_run_id,
        "experiment_id": run_info.info.experiment_id,
        "tracking_uri": mlflow.get_tracking_uri(),
    }


def optional_float(value: str) -> float | None:
    """A float flag that a template may render empty (no value)."""
    return float(value) if value.strip() not in ("", "None") else None


def optional_str(value: str) -> str | None:
    """A string flag that a template may render empty or ``None`` (no value)."""
    return value if value.strip() not in ("", "None") else None


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("jobs.register", __doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model URI written by train")
    p.add_argument("--features", required=True, help="ETL output URI; the champion is scored on its test split")
    p.add_argument("--metrics", required=True, help="metrics.json written by evaluate")
    p.add_argument("--mlflow-run-id", required=True, help="the training run that holds the model artifacts")
    p.add_argument("--run-id", default="manual", help="orchestrator run id, recorded as a version tag")
    p.add_argument("--baseline-metrics", type=optional_str, default=None,
                   help="metrics JSON of the baseline stage (test_auc, test_pr_auc), recorded as version tags")
    p.add_argument("--min-auc-margin", type=float, default=0.0, help="AUC the challenger must add over the champion")
    p.add_argument("--max-pr-auc-drop", type=float, default=0.01, help="largest PR-AUC loss the gate accepts")
    p.add_argument("--drift-report", type=optional_str, default=None,
                   help="report URI of the drift check that triggered this run (tagged on the run and version)")
    p.add_argument("--drift-share", type=optional_float, default=None, help="its share of drifted columns")
    p.add_argument("--drift-run-id", type=optional_str, default=None, help="its MLflow run id")
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    try:
        GatePolicy(args.min_auc_margin, args.max_pr_auc_drop)
    except ValueError as exc:
        cli.fail(str(exc))
    cli.write_result(run(args), args.result_path)


if __name__ == "__main__":
    main()
