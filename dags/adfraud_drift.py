"""
# Ad-click fraud model: drift watch

Every hour, compares the newest click events with what the champion was trained on and,
when enough of the model's inputs drifted, asks for a retrain.

`check_events` (no events at `events_path`: the run stops here) → `etl` (the training
features, PySpark, on the newest events) → `drift` (Evidently `DataDriftPreset`: every
row of those features against the training split of the champion version, found through
its `adfraud.data_uri` tag; HTML and JSON reports are artifacts of an MLflow run) →
`signal_retrain`: when the share of drifted columns reaches `threshold`, an event on the
`adfraud_drift` asset (extra: `drift_share`, `report_uri`, `mlflow_run_id`, `events_uri`),
which schedules `adfraud_retrain`. Fewer than `min_rows` events, or no champion yet: no
event.

`events_path` is a raw events folder in the parquet layout of `generate` / `ingest`; by
default `ADFRAUD_DRIFT_EVENTS` or `<ADFRAUD_HOME>/events/newest`, where the ingestion
job leaves the newest batch.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime

from adfraud_runtime import DRIFT_ASSET, Resources, StageSpec, stage
from airflow.sdk import DAG, CronTriggerTimetable, Param, task
from airflow.sdk.exceptions import AirflowSkipException

from jobs.common import settings

logger = logging.getLogger(__name__)

DATA_ROOT = settings.home()

# Hourly drift check, UTC.
HOURLY_CRON = "0 * * * *"

# Where the newest raw events land (the default of the events_path param).
EVENTS_ENV_VAR = "ADFRAUD_DRIFT_EVENTS"
DEFAULT_EVENTS = f"{DATA_ROOT}/events/newest"


def run_dir(run_id: str) -> str:
    """Where one drift run writes its outputs: ``<ADFRAUD_HOME>/drift/<run id>``."""
    return f"{DATA_ROOT}/drift/{re.sub(r'[^A-Za-z0-9_.-]+', '_', run_id)}"


def pull(task_id: str, key: str) -> str:
    """A template reading ``key`` of an upstream stage's JSON result."""
    return f"{{{{ ti.xcom_pull(task_ids='{task_id}')['{key}'] }}}}"


RUN = "{{ run_dir(run_id) }}"

with DAG(
    dag_id="adfraud_drift",
    description="Hourly drift check of the newest click events against the champion's training data",
    doc_md=__doc__,
    schedule=CronTriggerTimetable(HOURLY_CRON, timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["adfraud", "ml", "drift"],
    default_args={"retries": 0},
    user_defined_macros={"run_dir": run_dir},
    params={
        "events_path": Param(os.environ.get(EVENTS_ENV_VAR, DEFAULT_EVENTS), type="string", minLength=1,
                             description="raw events (parquet layout of generate / ingest) to check"),
        "dataset": Param("synthetic", type="string", enum=["synthetic", "talkingdata"],
                         description="dataset spec of the events; its champion is the reference"),
        "threshold": Param(0.2, type="number", exclusiveMinimum=0, maximum=1,
                           description="share of drifted columns that asks for a retrain"),
        "min_rows": Param(500, type="integer", minimum=1, description="fewer events than this: no verdict"),
    },
) as dag:

    @task.short_circuit
    def check_events(params=None) -> bool:
        """Stop the run (skip everything after) when there are no events to check."""
        from jobs.common import storage

        present = storage.exists(params["events_path"])
        if not present:
            logger.warning("no events at %s: nothing to check this hour", params["events_path"])
        return present

    etl = stage(StageSpec("etl", [
        "--input", "{{ params.events_path }}", "--output", f"{RUN}/features", "--dataset", "{{ params.dataset }}",
    ], Resources(cpu="2", memory="8Gi")))

    # Every split of the newest events' features is "current"; the registered model is
    # adfraud-<dataset> (jobs.common.tracking.model_name).
    drift = stage(StageSpec("drift", [
        "--reference-model", "adfraud-{{ params.dataset }}",
        "--current", pull("etl", "train_uri"), pull("etl", "validation_uri"), pull("etl", "test_uri"),
        "--dataset", "{{ params.dataset }}", "--output", f"{RUN}/report", "--threshold", "{{ params.threshold }}",
        "--min-rows", "{{ params.min_rows }}", "--run-id", "{{ run_id }}",
    ], Resources(cpu="1", memory="4Gi")))

    @task(outlets=[DRIFT_ASSET])
    def signal_retrain(ti=None, params=None, outlet_events=None) -> dict:
        """Emit the drift asset event (which schedules adfraud_retrain), or skip without drift."""
        result = ti.xcom_pull(task_ids="drift")
        if not result["drift_detected"]:
            raise AirflowSkipException(
                f"no retrain: status {result['status']}, drift share {result['drift_share']} "
                f"(threshold {result['threshold']})"
            )
        extra = {
            "drift_share": result["drift_share"],
            "drifted_columns": result["drifted_columns"],
            "columns_tested": result["columns_tested"],
            "report_uri": result["report_html_uri"],
            "report_json_uri": result["report_json_uri"],
            "mlflow_run_id": result["mlflow_run_id"],
            "dataset": result["dataset"],
            "reference_version": result["reference_version"],
            "events_uri": params["events_path"],
        }
        outlet_events[DRIFT_ASSET].extra = extra
        logger.info("drift share %.3f >= %.3f: asking for a retrain (report %s)", result["drift_share"],
                    result["threshold"], result["report_html_uri"])
        return extra

    check_events() >> etl >> drift >> signal_retrain()
