"""
# Ad-click fraud model: retraining

Builds a new fraud model from the newest click events, registers it as `challenger`, and
moves `champion` only when it beats the current champion on the same test data **and**
a reviewer approves.

Runs nightly at 02:00 UTC **or** when `adfraud_drift` reports drift (the `adfraud_drift`
asset), one run at a time; `record_trigger` notes the drift share and report of the
event that started a run.

`generate` (synthetic events) **or** `ingest` (a TalkingData AdTracking CSV) →
`etl` (PySpark, past-only windowed features, time split 70/15/15) →
`tune` (Ray Tune, ASHA) → `train` (PyTorch, torch.distributed or Horovod) →
`evaluate`, `export` (ONNX, TensorRT on GPUs), `baseline` (LightGBM) →
`register` (MLflow registry: new version = `challenger`, promotion gate against the
champion) → `review` → `promote` → `rollout` (serving config → champion, only when the
champion moved); `drift` (Evidently) compares the newest split with the training reference.

**Review.** When the gate passes, `review` waits in **Required actions** with the
challenger's metrics beside the champion's and links to MLflow: *Approve* moves
`champion`, *Reject* keeps it (both are recorded as version tags). With `auto_approve`
on (default from `ADFRAUD_AUTO_APPROVE`) a passing challenger is approved at once. A
failed gate skips the review; an unanswered review rejects after 20 hours.

Every stage is `python -m jobs.<stage>`; `ADFRAUD_RUNTIME` picks whether it runs as a
local process (default) or as a KubernetesPodOperator pod. Trigger with **Trigger DAG
w/ config** to choose the data source, size, epochs, trials and the gate. Scheduled and
drift-triggered runs use the param defaults, which a deployment may set in a JSON file
named by `ADFRAUD_RETRAIN_DEFAULTS`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime, timedelta

from adfraud_engines import spark_stage, train_task, tune_task
from adfraud_runtime import DRIFT_ASSET, Resources, ReviewOperator, StageSpec, stage
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param, TriggerRule, task

from jobs import promote
from jobs.common import settings

logger = logging.getLogger(__name__)

DATA_ROOT = settings.home()

# Nightly retrain, UTC.
NIGHTLY_CRON = "0 2 * * *"

# A JSON file of param defaults for this deployment, e.g. {"rows": 50000, "epochs": 4}:
# scheduled and asset-triggered runs have no conf, so they run with the defaults.
PARAM_DEFAULTS_ENV_VAR = "ADFRAUD_RETRAIN_DEFAULTS"

# An unanswered review takes its default (Reject) after this, before the next nightly run.
REVIEW_TIMEOUT = timedelta(hours=20)

DEFAULTS = {
    "source": "synthetic",
    "input_path": "",
    "rows": 200_000,
    "epochs": 8,
    "members": 8,
    "trials": 4,
    "tune_epochs": 3,
    "workers": 2,
    "backend": "torch",
    "seed": 7,
    "min_auc_margin": 0.0,
    "max_pr_auc_drop": 0.01,
    "auto_approve": promote.auto_approve_default(),
}


def param_defaults(base: dict, path: str | None) -> dict:
    """``base`` updated from the JSON file at ``path`` (None: unchanged); unknown keys are an error."""
    if not path:
        return dict(base)
    with open(path) as handle:
        overrides = json.load(handle)
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(f"{PARAM_DEFAULTS_ENV_VAR}={path}: unknown params {unknown}; known: {sorted(base)}")
    return {**base, **overrides}


def run_dir(run_id: str) -> str:
    """Where one DAG run writes its outputs: ``<ADFRAUD_HOME>/runs/<run id>``."""
    return f"{DATA_ROOT}/runs/{re.sub(r'[^A-Za-z0-9_.-]+', '_', run_id)}"


def pull(task_id: str, key: str) -> str:
    """A template reading ``key`` of an upstream stage's JSON result."""
    return f"{{{{ ti.xcom_pull(task_ids='{task_id}')['{key}'] }}}}"


RUN = "{{ run_dir(run_id) }}"
RAW_URI = (
    "{{ (ti.xcom_pull(task_ids='generate') if params.source == 'synthetic' "
    "else ti.xcom_pull(task_ids='ingest'))['raw_uri'] }}"
)
FEATURES = pull("etl", "features_uri")
MODEL = pull("train", "model_uri")
MLFLOW_RUN = pull("train", "mlflow_run_id")
REGISTER = "ti.xcom_pull(task_ids='register')"
D = param_defaults(DEFAULTS, os.environ.get(PARAM_DEFAULTS_ENV_VAR))

with DAG(
    dag_id="adfraud_retrain",
    description="Retrain, evaluate, gate, review and roll out the ad-click fraud model",
    doc_md=__doc__,
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(NIGHTLY_CRON, timezone="UTC"), assets=DRIFT_ASSET),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["adfraud", "ml", "retraining"],
    default_args={"retries": 0, "retry_delay": timedelta(minutes=5)},
    user_defined_macros={"run_dir": run_dir, "review_subject": promote.review_subject,
                         "review_body": promote.review_body},
    params={
        "source": Param(D["source"], type="string", enum=["synthetic", "talkingdata"],
                        description="synthetic events from the generator, or a TalkingData CSV"),
        "input_path": Param(D["input_path"], type="string",
                            description="TalkingData CSV path or URI (source = talkingdata)"),
        "rows": Param(D["rows"], type="integer", minimum=1_000, maximum=100_000_000,
                      description="synthetic events to generate"),
        "epochs": Param(D["epochs"], type="integer", minimum=1, maximum=200, description="maximum training epochs"),
        "members": Param(D["members"], type="integer", minimum=1, maximum=32,
                         description="networks in the trained deep ensemble, one seed each"),
        "trials": Param(D["trials"], type="integer", minimum=1, maximum=256, description="Ray Tune trials"),
        "tune_epochs": Param(D["tune_epochs"], type="integer", minimum=1, maximum=50,
                             description="epochs of the longest trial"),
        "workers": Param(D["workers"], type="integer", minimum=1, maximum=64, description="training processes"),
        "backend": Param(D["backend"], type="string", enum=["torch", "horovod"], description="training backend"),
        "seed": Param(D["seed"], type="integer", minimum=0, description="seed of data generation, search and training"),
        "min_auc_margin": Param(D["min_auc_margin"], type="number", minimum=-1, maximum=1,
                                description="gate: test AUC the challenger must add over the champion"),
        "max_pr_auc_drop": Param(D["max_pr_auc_drop"], type="number", minimum=0, maximum=1,
                                 description="gate: largest test PR-AUC loss against the champion"),
        "auto_approve": Param(D["auto_approve"], type="boolean",
                              description="approve a challenger that passed the gate without a reviewer"),
    },
) as dag:

    @task
    def record_trigger(dag_run=None, triggering_asset_events=None) -> dict:
        """Which drift event started this run, if any: its drift share, report and MLflow run."""
        run_type = getattr(dag_run.run_type, "value", dag_run.run_type)
        out = {"triggered_by": str(run_type), "drift_share": None, "report_uri": None, "mlflow_run_id": None,
               "source_run_id": None, "events": 0}
        events = list(triggering_asset_events.get(DRIFT_ASSET, [])) if triggering_asset_events else []
        if not events:
            logger.info("run %s is %s, not started by a drift event", dag_run.run_id, run_type)
            return out
        latest = max(events, key=lambda event: event.timestamp)
        extra = latest.extra or {}
        out.update(drift_share=extra.get("drift_share"), report_uri=extra.get("report_uri"),
                   mlflow_run_id=extra.get("mlflow_run_id"), source_run_id=latest.source_run_id,
                   events=len(events))
        logger.info("started by drift in %s: share %s, report %s (%d queued events)", latest.source_run_id,
                    out["drift_share"], out["report_uri"], len(events))
        return out

    @task.branch
    def choose_source(params=None) -> str:
        """Run ``generate`` for synthetic data, ``ingest`` for a TalkingData file."""
        return "generate" if params["source"] == "synthetic" else "ingest"

    generate = stage(StageSpec("generate", [
        "--output", f"{RUN}/raw", "--rows", "{{ params.rows }}", "--seed", "{{ params.seed }}",
    ], Resources(cpu="2", memory="4Gi")))

    ingest = stage(StageSpec("ingest", [
        "--input", "{{ params.input_path }}", "--output", f"{RUN}/raw",
    ], Resources(cpu="1", memory="4Gi")))

    # On a cluster: Spark executors as pods, tuning as a RayJob or on a RayCluster, and
    # multi-node Horovod as an MPIJob (plugins/adfraud_engines.py); locally, processes.
    etl = spark_stage(StageSpec("etl", [
        "--input", RAW_URI, "--output", f"{RUN}/features", "--dataset", "{{ params.source }}",
    ], Resources(cpu="2", memory="8Gi")), trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)

    tune = tune_task(StageSpec("tune", [
        "--features", FEATURES, "--output", f"{RUN}/tune", "--trials", "{{ params.trials }}",
        "--max-epochs", "{{ params.tune_epochs }}", "--seed", "{{ params.seed }}", "--run-id", "{{ run_id }}",
    ], Resources(cpu="2", memory="8Gi", image="tuner")), result_uri=f"{RUN}/results/tune.json")

    train = train_task(StageSpec("train", [
        "--features", FEATURES, "--output", f"{RUN}/model", "--params", pull("tune", "best_config_uri"),
        "--epochs", "{{ params.epochs }}", "--members", "{{ params.members }}", "--workers", "{{ params.workers }}",
        "--backend", "{{ params.backend }}", "--seed", "{{ params.seed }}", "--run-id", "{{ run_id }}",
    ], Resources(cpu="4", memory="16Gi", gpu=1, image="trainer-gpu")), result_uri=f"{RUN}/results/train.json")

    evaluate = stage(StageSpec("evaluate", [
        "--model", MODEL, "--features", FEATURES, "--output", f"{RUN}/evaluation", "--mlflow-run-id", MLFLOW_RUN,
    ], Resources(cpu="1", memory="4Gi")))

    export = stage(StageSpec("export", [
        "--model", MODEL, "--features", FEATURES, "--output", f"{RUN}/export", "--mlflow-run-id", MLFLOW_RUN,
    ], Resources(cpu="1", memory="4Gi", gpu=1, image="trainer-gpu")))

    baseline = stage(StageSpec("baseline", [
        "--features", FEATURES, "--output", f"{RUN}/baseline", "--mlflow-run-id", MLFLOW_RUN,
    ], Resources(cpu="2", memory="8Gi")))

    register = stage(StageSpec("register", [
        "--model", MODEL, "--features", FEATURES, "--metrics", pull("evaluate", "metrics_uri"),
        "--baseline-metrics", pull("baseline", "metrics_uri"),
        "--mlflow-run-id", MLFLOW_RUN, "--run-id", "{{ run_id }}",
        "--min-auc-margin", "{{ params.min_auc_margin }}", "--max-pr-auc-drop", "{{ params.max_pr_auc_drop }}",
        "--drift-report", pull("record_trigger", "report_uri"),
        "--drift-share", pull("record_trigger", "drift_share"),
        "--drift-run-id", pull("record_trigger", "mlflow_run_id"),
    ], Resources(cpu="1", memory="4Gi")))

    review = ReviewOperator(
        task_id="review",
        subject=f"{{{{ review_subject({REGISTER}) }}}}",
        body=f"{{{{ review_body({REGISTER}) }}}}",
        gate_passed=pull("register", "gate_passed"),
        auto_approve="{{ params.auto_approve }}",
        defaults=ReviewOperator.REJECT,
        response_timeout=REVIEW_TIMEOUT,
    )

    promotion = stage(StageSpec("promote", [
        "--model-name", pull("register", "model_name"), "--version", pull("register", "version"),
        "--decision", pull("review", "decision"), "--reviewer", pull("review", "reviewer"),
        "--reviewed-at", pull("review", "reviewed_at"), "--auto-approved", pull("review", "auto_approved"),
        "--expected-champion", f"{{{{ {REGISTER}['champion_version_at_gate'] or 'none' }}}}",
        "--run-id", "{{ run_id }}",
    ], Resources(cpu="1", memory="2Gi")))

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def check_champion_moved(ti=None) -> bool:
        """Roll out only when ``promote`` moved the champion."""
        result = ti.xcom_pull(task_ids="promote")
        logger.info("champion %s: %s", "moved" if result["champion_moved"] else "unchanged", result["reason"])
        return bool(result["champion_moved"])

    drift = stage(StageSpec("drift", [
        "--reference", pull("etl", "train_uri"), "--current", pull("etl", "test_uri"),
        "--dataset", "{{ params.source }}", "--output", f"{RUN}/drift", "--run-id", "{{ run_id }}",
    ], Resources(cpu="1", memory="4Gi")))

    rollout = stage(StageSpec("rollout", [
        "--model-name", pull("register", "model_name"), "--features", FEATURES, "--run-id", "{{ run_id }}",
    ], Resources(cpu="1", memory="2Gi")))

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def summary(ti=None, params=None, run_id=None) -> dict:
        """Collect the stages' results into one summary, logged and written beside the run."""
        from jobs.summary import build_summary, log_summary, write_summary

        results = {t: ti.xcom_pull(task_ids=t) for t in
                   ("generate", "ingest", "etl", "tune", "train", "evaluate", "export", "baseline", "register",
                    "review", "promote", "drift", "rollout", "record_trigger")}
        out = build_summary(results, source=params["source"], run_id=run_id)
        out.update(promote.registry_summary(results["register"], results["review"], results["promote"],
                                            results["record_trigger"]))
        log_summary(out)
        write_summary(out, f"{run_dir(run_id)}/summary.json")
        return out

    source = choose_source()
    source >> [generate, ingest] >> etl >> tune >> train >> evaluate >> export >> register
    train >> baseline >> register
    record_trigger() >> register
    register >> review >> promotion >> check_champion_moved() >> rollout
    etl >> drift
    [rollout, drift] >> summary()
