"""The DAGs parse, are wired in stage order, validate their params and render their argv.

``adfraud_retrain`` (nightly or on drift; gate → review → promote → rollout),
``adfraud_drift`` (hourly; emits the drift asset event) and ``adfraud_rollback``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from tests.conftest import REPO_ROOT
from tests.unit.test_runtime import load_dag

DAGS = REPO_ROOT / "dags"


def load_dag_file(monkeypatch, stem: str, home: str, **env: str):
    """Parse ``dags/<stem>.py`` with the local runtime and ``env``; returns its DAG."""
    monkeypatch.setenv("ADFRAUD_RUNTIME", "local")
    monkeypatch.setenv("ADFRAUD_HOME", home)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    name = f"{stem}_under_test"
    spec = importlib.util.spec_from_file_location(name, DAGS / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.dag


@pytest.fixture
def dag(monkeypatch, tmp_path):
    monkeypatch.delenv("ADFRAUD_AUTO_APPROVE", raising=False)
    monkeypatch.delenv("ADFRAUD_RETRAIN_DEFAULTS", raising=False)
    return load_dag(monkeypatch, "local", home=str(tmp_path))


@pytest.fixture
def drift_dag(monkeypatch, tmp_path):
    monkeypatch.delenv("ADFRAUD_DRIFT_EVENTS", raising=False)
    return load_dag_file(monkeypatch, "adfraud_drift", str(tmp_path))


def downstream(dag, task_id: str) -> set[str]:
    return set(dag.get_task(task_id).downstream_task_ids)


class FakeTI:
    """Just enough of a task instance for templates: xcom_pull from a dict of results."""

    def __init__(self, results: dict):
        self.results = results

    def xcom_pull(self, task_ids: str):
        return self.results.get(task_ids)


def render(dag, task_id: str, field: str, results: dict, params: dict | None = None, run_id: str = "manual__1"):
    task = dag.get_task(task_id)
    context = {"ti": FakeTI(results), "params": {**{k: dag.params[k] for k in dag.params}, **(params or {})}, "run_id": run_id,
               "dag_run": SimpleNamespace(triggering_user_name="erin")}
    return task.render_template(getattr(task, field), context, dag.get_template_env())


REGISTER_RESULT = {
    "model_name": "adfraud-synthetic", "version": 4, "gate_passed": True, "gate_reason": "AUC beats champion",
    "champion_version_at_gate": None, "challenger_metrics": {"auc": 0.97, "pr_auc": 0.88},
    "champion_metrics": None, "baseline_metrics": {"auc": 0.95, "pr_auc": 0.8}, "mlflow_run_id": "run9",
    "experiment_id": "1", "gate_policy": {"min_auc_margin": 0.0, "max_pr_auc_drop": 0.01},
}


# adfraud_retrain ------------------------------------------------------------------------


def test_dag_id_schedule_and_tags(dag):
    from adfraud_runtime import DRIFT_ASSET
    from airflow.sdk import AssetOrTimeSchedule

    assert dag.dag_id == "adfraud_retrain"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert "adfraud" in dag.tags
    assert dag.doc_md and "Ad-click fraud model" in dag.doc_md
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert dag.timetable.timetable.expression == "0 2 * * *"
    assert dag.timetable.asset_condition == DRIFT_ASSET


def test_stage_order(dag):
    assert downstream(dag, "choose_source") == {"generate", "ingest"}
    assert downstream(dag, "generate") == {"etl"} and downstream(dag, "ingest") == {"etl"}
    assert downstream(dag, "etl") == {"tune", "drift"}
    assert downstream(dag, "train") == {"evaluate", "baseline"}
    chain = ["tune", "train", "evaluate", "export", "register", "review", "promote", "check_champion_moved",
             "rollout", "summary"]
    for up, down in zip(chain, chain[1:], strict=False):
        assert down in downstream(dag, up), (up, down)
    assert downstream(dag, "baseline") == {"register"}
    assert downstream(dag, "record_trigger") == {"register"}
    assert downstream(dag, "register") == {"review"}
    assert "summary" in downstream(dag, "drift")


def test_params_have_json_schema_types(dag):
    schema = {k: v.schema for k, v in dag.params.items()}
    assert schema["source"]["enum"] == ["synthetic", "talkingdata"]
    for name in ("rows", "epochs", "members", "trials", "seed", "workers"):
        assert schema[name]["type"] == "integer", name
    assert schema["min_auc_margin"]["type"] == schema["max_pr_auc_drop"]["type"] == "number"
    assert schema["auto_approve"]["type"] == "boolean"


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("rows", "lots", "is not of type 'integer'"),
        ("epochs", 0, "less than the minimum"),
        ("source", "csv", "is not one of"),
        ("trials", 2.5, "is not of type 'integer'"),
        ("min_auc_margin", "big", "is not of type 'number'"),
        ("max_pr_auc_drop", -0.1, "less than the minimum"),
        ("auto_approve", "yes", "is not of type 'boolean'"),
    ],
    ids=["rows-not-integer", "epochs-below-minimum", "source-not-in-enum", "trials-float", "margin-not-number",
         "negative-pr-auc-drop", "auto-approve-not-boolean"],
)
def test_wrongly_typed_param_is_refused_naming_the_field(dag, name, value, reason):
    """A trigger's conf goes through the same ParamsDict validation as the UI form."""
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    params = ParamsDict(dict(dag.params.items()))
    with pytest.raises(ParamValidationError) as info:
        params.update({name: value})
        params.validate()
    message = str(info.value)
    assert f"Invalid input for param {name}:" in message
    assert reason in message


def test_default_params_validate(dag):
    from airflow.sdk.definitions.param import ParamsDict

    resolved = ParamsDict(dict(dag.params.items())).validate()
    assert resolved["source"] == "synthetic" and resolved["rows"] == 200_000
    assert resolved["min_auc_margin"] == 0.0 and resolved["max_pr_auc_drop"] == 0.01
    assert resolved["auto_approve"] is False


def test_auto_approve_default_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ADFRAUD_AUTO_APPROVE", "true")
    dag = load_dag(monkeypatch, "local", home=str(tmp_path))
    assert dag.params["auto_approve"] is True


def test_training_params_default_to_the_trainers_defaults(dag):
    """The DAG file imports no torch, so it repeats these; they must not drift apart."""
    from jobs.common.training import TrainConfig

    assert dag.params["members"] == TrainConfig().members
    assert dag.params["epochs"] == TrainConfig().epochs


def test_param_defaults_file_sets_what_scheduled_runs_use(monkeypatch, tmp_path):
    path = tmp_path / "defaults.json"
    path.write_text(json.dumps({"rows": 5000, "trials": 1, "min_auc_margin": -1.0}))
    monkeypatch.setenv("ADFRAUD_RETRAIN_DEFAULTS", str(path))
    dag = load_dag(monkeypatch, "local", home=str(tmp_path))
    assert dag.params["rows"] == 5000 and dag.params["trials"] == 1 and dag.params["min_auc_margin"] == -1.0
    assert dag.params["epochs"] == 8


def test_param_defaults_file_with_an_unknown_key_is_an_error(monkeypatch, tmp_path):
    path = tmp_path / "defaults.json"
    path.write_text(json.dumps({"rowz": 5000}))
    monkeypatch.setenv("ADFRAUD_RETRAIN_DEFAULTS", str(path))
    with pytest.raises(ValueError, match=r"unknown params \['rowz'\]"):
        load_dag(monkeypatch, "local", home=str(tmp_path))


def test_register_gets_the_gate_baseline_and_trigger(dag):
    results = {"train": {"model_uri": "/m", "mlflow_run_id": "run9"}, "etl": {"features_uri": "/f"},
               "evaluate": {"metrics_uri": "/e/metrics.json"}, "baseline": {"metrics_uri": "/b/metrics.json"},
               "record_trigger": {"report_uri": "/d/drift_report.html", "drift_share": 0.4, "mlflow_run_id": "d1"}}
    argv = render(dag, "register", "arguments", results, {"min_auc_margin": -1.0, "max_pr_auc_drop": 0.05})
    flags = dict(zip(argv[::2], argv[1::2], strict=True))
    assert flags["--baseline-metrics"] == "/b/metrics.json"
    assert flags["--min-auc-margin"] == "-1.0" and flags["--max-pr-auc-drop"] == "0.05"
    assert flags["--drift-report"] == "/d/drift_report.html" and flags["--drift-share"] == "0.4"
    quiet = render(dag, "register", "arguments", {**results, "record_trigger": {
        "report_uri": None, "drift_share": None, "mlflow_run_id": None}})
    assert dict(zip(quiet[::2], quiet[1::2], strict=True))["--drift-share"] == "None"


def test_review_shows_the_version_and_promote_gets_the_decision(dag):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    review = dag.get_task("review")
    assert isinstance(review, ApprovalOperator)
    assert review.defaults == ["Reject"] and review.response_timeout.total_seconds() == 20 * 3600
    results = {"register": REGISTER_RESULT,
               "review": {"decision": "approve", "reviewer": "alice", "reviewed_at": "2026-02-01T10:00:00+00:00",
                          "auto_approved": False}}
    assert render(dag, "review", "subject", results) == "Promote adfraud-synthetic v4 to champion?"
    body = render(dag, "review", "body", results)
    assert "| AUC-ROC | 0.9700 | n/a | 0.9500 |" in body and "/#/experiments/1/runs/run9" in body
    assert render(dag, "review", "gate_passed", results) == "True"
    assert render(dag, "review", "auto_approve", results, {"auto_approve": True}) == "True"
    argv = render(dag, "promote", "arguments", results)
    assert argv == ["--model-name", "adfraud-synthetic", "--version", "4", "--decision", "approve",
                    "--reviewer", "alice", "--reviewed-at", "2026-02-01T10:00:00+00:00", "--auto-approved", "False",
                    "--expected-champion", "none", "--run-id", "manual__1"]
    at_gate = render(dag, "promote", "arguments", {**results, "register": {**REGISTER_RESULT,
                                                                           "champion_version_at_gate": 3}})
    assert at_gate[at_gate.index("--expected-champion") + 1] == "3"


def test_record_trigger_reads_the_latest_drift_event(dag):
    from adfraud_runtime import DRIFT_ASSET

    fn = dag.get_task("record_trigger").python_callable
    events = {DRIFT_ASSET: [
        SimpleNamespace(extra={"drift_share": 0.35, "report_uri": "/old.html", "mlflow_run_id": "a"},
                        timestamp=datetime(2026, 2, 1, 1, tzinfo=UTC), source_run_id="scheduled__1"),
        SimpleNamespace(extra={"drift_share": 0.52, "report_uri": "/new.html", "mlflow_run_id": "b"},
                        timestamp=datetime(2026, 2, 1, 2, tzinfo=UTC), source_run_id="scheduled__2"),
    ]}
    run = SimpleNamespace(run_type="asset_triggered", run_id="asset_triggered__x")
    out = fn(dag_run=run, triggering_asset_events=events)
    assert out == {"triggered_by": "asset_triggered", "drift_share": 0.52, "report_uri": "/new.html",
                   "mlflow_run_id": "b", "source_run_id": "scheduled__2", "events": 2}
    manual = fn(dag_run=SimpleNamespace(run_type="manual", run_id="manual__x"), triggering_asset_events={})
    assert manual["triggered_by"] == "manual" and manual["drift_share"] is None


# The review step (ReviewOperator) ------------------------------------------------------------


def review_operator(**kwargs):
    from adfraud_runtime import ReviewOperator

    return ReviewOperator(task_id="review_under_test", subject="s", body="b", **kwargs)


def test_review_skips_when_the_gate_failed():
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException, match="failed its promotion gate"):
        review_operator(gate_passed="False", auto_approve="True").execute(context={})


def test_review_auto_approves_without_asking():
    out = review_operator(gate_passed="True", auto_approve="True").execute(context={})
    assert out["decision"] == "approve" and out["reviewer"] == "auto-approve" and out["auto_approved"] is True


@pytest.mark.parametrize(("option", "decision"), [("Approve", "approve"), ("Reject", "reject")],
                         ids=["approve", "reject"])
def test_review_answer_becomes_the_decision_without_skipping(option, decision):
    """A rejection is a result for promote to record, not a skip of everything after."""
    event = {"chosen_options": [option], "params_input": {}, "timedout": False,
             "responded_at": datetime(2026, 2, 1, 10, tzinfo=UTC), "responded_by_user": {"id": "7", "name": "bob"}}
    out = review_operator(gate_passed="True").execute_complete(context={}, event=event)
    assert out == {"decision": decision, "reviewer": "bob", "reviewed_at": "2026-02-01T10:00:00+00:00",
                   "auto_approved": False, "chosen_options": [option]}


def test_an_unanswered_review_times_out_to_reject():
    event = {"chosen_options": ["Reject"], "params_input": {}, "timedout": True,
             "responded_at": datetime(2026, 2, 2, tzinfo=UTC), "responded_by_user": None}
    out = review_operator(gate_passed="True").execute_complete(context={}, event=event)
    assert out["decision"] == "reject" and out["reviewer"] == "timeout"


# adfraud_drift --------------------------------------------------------------------------------


def test_drift_dag_runs_hourly_etl_then_drift_then_the_signal(drift_dag, tmp_path):
    from adfraud_runtime import DRIFT_ASSET

    assert drift_dag.dag_id == "adfraud_drift" and drift_dag.catchup is False and drift_dag.max_active_runs == 1
    assert drift_dag.timetable.expression == "0 * * * *"
    assert downstream(drift_dag, "check_events") == {"etl"}
    assert downstream(drift_dag, "etl") == {"drift"}
    assert downstream(drift_dag, "drift") == {"signal_retrain"}
    assert drift_dag.get_task("signal_retrain").outlets == [DRIFT_ASSET]
    assert drift_dag.params["events_path"] == f"{tmp_path}/events/newest"
    etl = {"train_uri": "/f/train", "validation_uri": "/f/validation", "test_uri": "/f/test"}
    argv = render(drift_dag, "drift", "arguments", {"etl": etl}, run_id="scheduled__2026")
    assert argv[:2] == ["--reference-model", "adfraud-synthetic"]
    assert argv[argv.index("--current") + 1:argv.index("--current") + 4] == ["/f/train", "/f/validation", "/f/test"]
    assert argv[argv.index("--output") + 1] == f"{tmp_path}/drift/scheduled__2026/report"


def test_drift_events_path_default_from_the_environment(monkeypatch, tmp_path):
    dag = load_dag_file(monkeypatch, "adfraud_drift", str(tmp_path), ADFRAUD_DRIFT_EVENTS="s3://landing/clicks")
    assert dag.params["events_path"] == "s3://landing/clicks"


@pytest.mark.parametrize(("name", "value"), [("threshold", 0), ("threshold", 1.5), ("min_rows", "many")],
                         ids=["zero-threshold", "threshold-above-one", "rows-not-integer"])
def test_drift_params_are_validated(drift_dag, name, value):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    params = ParamsDict(dict(drift_dag.params.items()))
    with pytest.raises(ParamValidationError, match=f"Invalid input for param {name}:"):
        params.update({name: value})
        params.validate()


DRIFTED = {"drift_detected": True, "status": "ok", "drift_share": 0.55, "threshold": 0.3, "drifted_columns": 11,
           "columns_tested": 20, "report_html_uri": "/d/report/drift_report.html",
           "report_json_uri": "/d/report/drift_report.json", "mlflow_run_id": "m1", "dataset": "synthetic",
           "reference_version": 2}


def test_signal_retrain_puts_share_report_and_run_on_the_asset_event(drift_dag):
    from adfraud_runtime import DRIFT_ASSET

    outlet_events = {DRIFT_ASSET: SimpleNamespace(extra={})}
    fn = drift_dag.get_task("signal_retrain").python_callable
    fn(ti=FakeTI({"drift": DRIFTED}), params={"events_path": "/landing/newest"}, outlet_events=outlet_events)
    extra = outlet_events[DRIFT_ASSET].extra
    assert extra["drift_share"] == 0.55 and extra["report_uri"] == "/d/report/drift_report.html"
    assert extra["mlflow_run_id"] == "m1" and extra["reference_version"] == 2
    assert extra["events_uri"] == "/landing/newest"


@pytest.mark.parametrize("status", ["ok", "insufficient_data", "no_reference"])
def test_no_drift_no_asset_event(drift_dag, status):
    """A skipped task emits no asset event, so no retrain is scheduled."""
    from airflow.sdk.exceptions import AirflowSkipException

    fn = drift_dag.get_task("signal_retrain").python_callable
    quiet = {**DRIFTED, "drift_detected": False, "status": status, "drift_share": 0.1 if status == "ok" else None}
    with pytest.raises(AirflowSkipException, match=f"no retrain: status {status}"):
        fn(ti=FakeTI({"drift": quiet}), params={"events_path": "/e"}, outlet_events={})


def test_check_events_stops_the_run_without_events(drift_dag, tmp_path):
    fn = drift_dag.get_task("check_events").python_callable
    assert fn(params={"events_path": str(tmp_path / "nothing")}) is False
    (tmp_path / "events").mkdir()
    assert fn(params={"events_path": str(tmp_path / "events")}) is True


# adfraud_rollback -------------------------------------------------------------------------------


def test_rollback_dag_rolls_back_then_rolls_out(monkeypatch, tmp_path):
    dag = load_dag_file(monkeypatch, "adfraud_rollback", str(tmp_path))
    assert dag.dag_id == "adfraud_rollback" and dag.max_active_runs == 1
    assert downstream(dag, "rollback") == {"rollout"}
    rollback = dag.get_task("rollback")
    assert rollback.stage == "promote"
    argv = render(dag, "rollback", "arguments", {})
    assert argv == ["--rollback", "--model-name", "adfraud-synthetic", "--reviewer", "erin", "--run-id", "manual__1"]
    rollout = render(dag, "rollout", "arguments", {"rollback": {"data_uri": "/runs/r1/features"}})
    assert rollout[rollout.index("--features") + 1] == "/runs/r1/features"
