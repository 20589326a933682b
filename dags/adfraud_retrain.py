"""
# Ad-click fraud model: nightly retraining

Builds a new fraud model from the newest click events and promotes it only when it beats
the current champion on the same test data.

`generate` (synthetic events) **or** `ingest` (a TalkingData AdTracking CSV) →
`etl` (PySpark, past-only windowed features, time split 70/15/15) →
`tune` (Ray Tune, ASHA) → `train` (PyTorch, torch.distributed or Horovod) →
`evaluate` → `export` (ONNX, TensorRT on GPUs) → `register` (MLflow registry,
`challenger` / `champion` gate) → `rollout` (serving config → champion);
`drift` (Evidently) compares the newest split with the training reference.

Every stage is `python -m jobs.<stage>`; `ADFRAUD_RUNTIME` picks whether it runs as a
local process (default) or as a KubernetesPodOperator pod. Trigger with **Trigger DAG
w/ config** to choose the data source, size, epochs and trials.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from adfraud_runtime import Resources, StageSpec, stage
from airflow.sdk import DAG, Param, TriggerRule, task

from jobs.common import settings

DATA_ROOT = settings.home()


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

with DAG(
    dag_id="adfraud_retrain",
    description="Retrain, evaluate, gate and roll out the ad-click fraud model",
    doc_md=__doc__,
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["adfraud", "ml", "retraining"],
    default_args={"retries": 0, "retry_delay": timedelta(minutes=5)},
    user_defined_macros={"run_dir": run_dir},
    params={
        "source": Param("synthetic", type="string", enum=["synthetic", "talkingdata"],
                        description="synthetic events from the generator, or a TalkingData CSV"),
        "input_path": Param("", type="string",
                            description="TalkingData CSV path or URI (source = talkingdata)"),
        "rows": Param(200_000, type="integer", minimum=1_000, maximum=100_000_000,
                      description="synthetic events to generate"),
        "epochs": Param(8, type="integer", minimum=1, maximum=200, description="maximum training epochs"),
        "trials": Param(4, type="integer", minimum=1, maximum=256, description="Ray Tune trials"),
        "tune_epochs": Param(3, type="integer", minimum=1, maximum=50, description="epochs of the longest trial"),
        "workers": Param(2, type="integer", minimum=1, maximum=64, description="training processes"),
        "backend": Param("torch", type="string", enum=["torch", "horovod"], description="training backend"),
        "seed": Param(7, type="integer", minimum=0, description="seed of data generation, search and training"),
    },
) as dag:

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

    etl = stage(StageSpec("etl", [
        "--input", RAW_URI, "--output", f"{RUN}/features", "--dataset", "{{ params.source }}",
    ], Resources(cpu="2", memory="8Gi")), trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)

    tune = stage(StageSpec("tune", [
        "--features", FEATURES, "--output", f"{RUN}/tune", "--trials", "{{ params.trials }}",
        "--max-epochs", "{{ params.tune_epochs }}", "--seed", "{{ params.seed }}", "--run-id", "{{ run_id }}",
    ], Resources(cpu="2", memory="8Gi", image="tuner")))

    train = stage(StageSpec("train", [
        "--features", FEATURES, "--output", f"{RUN}/model", "--params", pull("tune", "best_config_uri"),
        "--epochs", "{{ params.epochs }}", "--workers", "{{ params.workers }}", "--backend", "{{ params.backend }}",
        "--seed", "{{ params.seed }}", "--run-id", "{{ run_id }}",
    ], Resources(cpu="4", memory="16Gi", gpu=1, image="trainer-gpu")))

    evaluate = stage(StageSpec("evaluate", [
        "--model", MODEL, "--features", FEATURES, "--output", f"{RUN}/evaluation", "--mlflow-run-id", MLFLOW_RUN,
    ], Resources(cpu="1", memory="4Gi")))

    export = stage(StageSpec("export", [
        "--model", MODEL, "--features", FEATURES, "--output", f"{RUN}/export", "--mlflow-run-id", MLFLOW_RUN,
    ], Resources(cpu="1", memory="4Gi", gpu=1, image="trainer-gpu")))

    register = stage(StageSpec("register", [
        "--model", MODEL, "--features", FEATURES, "--metrics", pull("evaluate", "metrics_uri"),
        "--mlflow-run-id", MLFLOW_RUN, "--run-id", "{{ run_id }}",
    ], Resources(cpu="1", memory="4Gi")))

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
                   ("generate", "ingest", "etl", "tune", "train", "evaluate", "export", "register", "drift",
                    "rollout")}
        out = build_summary(results, source=params["source"], run_id=run_id)
        log_summary(out)
        write_summary(out, f"{run_dir(run_id)}/summary.json")
        return out

    source = choose_source()
    source >> [generate, ingest] >> etl >> tune >> train >> evaluate >> export >> register >> rollout
    etl >> drift
    [rollout, drift] >> summary()
