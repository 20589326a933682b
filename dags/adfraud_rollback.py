"""
# Ad-click fraud model: rollback

Moves `champion` back to the previous approved version and points serving at it. Has
no schedule: trigger it when the live model misbehaves.

`rollback` (`python -m jobs.promote --rollback`: the most recently approved version
before the current champion that was not rolled back itself becomes champion; the
rolled-back version is tagged `adfraud.rolled_back_at` / `_by`) → `rollout` (serving
config → the restored champion, smoke-checked on its own training run's test split).
The same without Airflow: `python -m jobs.promote --rollback --model-name adfraud-synthetic`.
"""

from __future__ import annotations

from datetime import datetime

from adfraud_runtime import Resources, StageSpec, stage
from airflow.sdk import DAG, Param


def pull(task_id: str, key: str) -> str:
    """A template reading ``key`` of an upstream stage's JSON result."""
    return f"{{{{ ti.xcom_pull(task_ids='{task_id}')['{key}'] }}}}"


with DAG(
    dag_id="adfraud_rollback",
    description="Move the champion back to the previous approved model version and serve it",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["adfraud", "ml", "registry"],
    default_args={"retries": 0},
    params={
        "model_name": Param("adfraud-synthetic", type="string", enum=["adfraud-synthetic", "adfraud-talkingdata"],
                            description="registered model to roll back"),
        "requested_by": Param("", type="string",
                              description="who asks for the rollback (default: the user who triggered the run)"),
    },
) as dag:

    rollback = stage(StageSpec("promote", [
        "--rollback", "--model-name", "{{ params.model_name }}",
        "--reviewer", "{{ params.requested_by or dag_run.triggering_user_name or 'airflow' }}",
        "--run-id", "{{ run_id }}",
    ], Resources(cpu="1", memory="2Gi"), task_id="rollback"))

    rollout = stage(StageSpec("rollout", [
        "--model-name", "{{ params.model_name }}", "--features", pull("rollback", "data_uri"),
        "--run-id", "{{ run_id }}",
    ], Resources(cpu="1", memory="2Gi")))

    rollback >> rollout
