"""The retraining DAG parses, is wired in stage order and validates its params."""

from __future__ import annotations

import pytest

from tests.unit.test_runtime import load_dag


@pytest.fixture
def dag(monkeypatch, tmp_path):
    return load_dag(monkeypatch, "local", home=str(tmp_path))


def test_dag_id_schedule_and_tags(dag):
    assert dag.dag_id == "adfraud_retrain"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert "adfraud" in dag.tags
    assert dag.doc_md and "Ad-click fraud model" in dag.doc_md


def test_stage_order(dag):
    def downstream(task_id):
        return set(dag.get_task(task_id).downstream_task_ids)

    assert downstream("choose_source") == {"generate", "ingest"}
    assert downstream("generate") == {"etl"} and downstream("ingest") == {"etl"}
    assert downstream("etl") == {"tune", "drift"}
    chain = ["tune", "train", "evaluate", "export", "register", "rollout", "summary"]
    for up, down in zip(chain, chain[1:]):
        assert down in downstream(up), (up, down)
    assert "summary" in downstream("drift")


def test_params_have_json_schema_types(dag):
    schema = {k: v.schema for k, v in dag.params.items()}
    assert schema["source"]["enum"] == ["synthetic", "talkingdata"]
    for name in ("rows", "epochs", "trials", "seed", "workers"):
        assert schema[name]["type"] == "integer", name


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("rows", "lots", "is not of type 'integer'"),
        ("epochs", 0, "less than the minimum"),
        ("source", "csv", "is not one of"),
        ("trials", 2.5, "is not of type 'integer'"),
    ],
    ids=["rows-not-integer", "epochs-below-minimum", "source-not-in-enum", "trials-float"],
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
