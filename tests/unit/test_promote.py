"""The decision after review: approval moves champion, rejection does not, rollback goes back.

The registry operations run against a real SQLite MLflow store with small versions (no
models): what is tested is which version holds ``champion`` and which tags say why.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from jobs import promote
from jobs.register import CHAMPION, GATE_FAILED, GATE_PASSED, TAG_GATE, TAG_GATE_REASON

REGISTER_RESULT = {
    "model_name": "adfraud-synthetic",
    "version": 3,
    "gate_passed": True,
    "gate_reason": "AUC 0.9712 beats champion 0.9650 (margin 0); PR-AUC change +0.0100",
    "gate_policy": {"min_auc_margin": 0.0, "max_pr_auc_drop": 0.01},
    "challenger_metrics": {"auc": 0.9712, "pr_auc": 0.8811},
    "champion_metrics": {"auc": 0.9650, "pr_auc": 0.8711},
    "baseline_metrics": {"auc": 0.9533, "pr_auc": 0.8402, "metrics_uri": "/runs/x/baseline/metrics.json"},
    "champion_version_at_gate": 2,
    "mlflow_run_id": "abc123",
    "experiment_id": "7",
    "drift_trigger": None,
}


# Settings and the review prompt ---------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("YES", True), ("off", False),
                                                 ("0", False), ("", False)],
                         ids=["true", "one", "yes-upper", "off", "zero", "empty-is-default"])
def test_auto_approve_env_flag(monkeypatch, value, expected):
    monkeypatch.setenv(promote.AUTO_APPROVE_ENV_VAR, value)
    assert promote.auto_approve_default() is expected


def test_auto_approve_env_flag_rejects_garbage(monkeypatch):
    monkeypatch.setenv(promote.AUTO_APPROVE_ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="ADFRAUD_AUTO_APPROVE='sometimes'"):
        promote.auto_approve_default()


def test_review_body_shows_metrics_beside_the_champion_and_links_mlflow(monkeypatch):
    monkeypatch.setenv(promote.MLFLOW_UI_URL_ENV_VAR, "http://mlflow.test:5000/")
    body = promote.review_body(REGISTER_RESULT)
    assert "**adfraud-synthetic v3** passed the promotion gate" in body
    assert "| test split | challenger v3 | champion v2 | LightGBM baseline |" in body
    assert "| AUC-ROC | 0.9712 | 0.9650 | 0.9533 |" in body
    assert "| PR-AUC | 0.8811 | 0.8711 | 0.8402 |" in body
    assert "(http://mlflow.test:5000/#/experiments/7/runs/abc123)" in body
    assert "(http://mlflow.test:5000/#/models/adfraud-synthetic/versions/3)" in body
    assert "**Reject** keeps v2" in body
    assert promote.review_subject(REGISTER_RESULT) == "Promote adfraud-synthetic v3 to champion?"


def test_review_body_of_the_first_model_and_a_drift_trigger(monkeypatch):
    monkeypatch.delenv(promote.MLFLOW_UI_URL_ENV_VAR, raising=False)
    first = {**REGISTER_RESULT, "version": 1, "champion_metrics": None, "champion_version_at_gate": None,
             "baseline_metrics": None,
             "drift_trigger": {"drift_share": 0.45, "report_uri": "/drift/r1/report/drift_report.html"}}
    body = promote.review_body(first)
    assert "| champion (none yet) |" in body
    assert "| AUC-ROC | 0.9712 | n/a | n/a |" in body
    assert "Triggered by drift: share 0.4500, report `/drift/r1/report/drift_report.html`" in body
    assert f"({promote.DEFAULT_MLFLOW_UI_URL}/#/experiments/7/runs/abc123)" in body
    assert "Reject** keeps no champion" in body


def test_registry_summary_takes_the_outcome_from_promote():
    review = {"decision": "approve", "reviewer": "alice", "auto_approved": False}
    outcome = {"champion_moved": True, "aliases": ["challenger", "champion"], "champion_version": 3,
               "reason": "approved by alice"}
    trigger = {"triggered_by": "asset_triggered", "drift_share": 0.5, "report_uri": "/r.html"}
    out = promote.registry_summary(REGISTER_RESULT, review, outcome, trigger)
    assert out["promoted"] is True and out["aliases"] == ["challenger", "champion"]
    assert out["champion_version"] == 3 and out["reviewer"] == "alice" and out["baseline_test_auc"] == 0.9533
    assert out["triggered_by"] == "asset_triggered" and out["trigger_drift_share"] == 0.5


def test_registry_summary_when_the_gate_failed_and_review_was_skipped():
    failed = {**REGISTER_RESULT, "gate_passed": False, "aliases": ["challenger"], "champion_version": 2}
    out = promote.registry_summary(failed, None, None, None)
    assert out["promoted"] is False and out["aliases"] == ["challenger"] and out["champion_version"] == 2
    assert out["review_decision"] is None and out["triggered_by"] is None


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-12-04T07:41:43.157872+00:00", "2026-12-04T07:41:43Z"),
    ("2026-12-04T09:41:43+02:00", "2026-12-04T07:41:43Z"),
    ("2026-12-04T07:41:43Z", "2026-12-04T07:41:43Z"),
], ids=["airflow-iso", "offset", "zulu"])
def test_review_times_are_recorded_in_one_sortable_format(value, expected):
    assert promote.utc_time(value) == expected


# Rollback target (pure) -------------------------------------------------------------------


def version(number: int, approved_at: str | None = None, rolled_back: bool = False):
    tags = {}
    if approved_at:
        tags[promote.TAG_APPROVED_AT] = approved_at
        tags[promote.TAG_PROMOTED_AT] = approved_at
    if rolled_back:
        tags[promote.TAG_ROLLED_BACK_AT] = "2026-01-09T00:00:00Z"
    return SimpleNamespace(version=str(number), tags=tags)


ROLLBACK_CASES = [
    ("previous-approved", [version(1, "2026-01-01"), version(2, "2026-01-02"), version(3, "2026-01-03")], 3, "2"),
    ("skips-unapproved", [version(1, "2026-01-01"), version(2), version(3, "2026-01-03")], 3, "1"),
    ("skips-rolled-back", [version(1, "2026-01-01"), version(2, "2026-01-02", rolled_back=True),
                           version(3, "2026-01-03")], 3, "1"),
    ("never-a-later-approval", [version(1, "2026-01-01"), version(2, "2026-01-05"), version(3, "2026-01-03")], 3,
     "1"),
    ("none-before-the-first", [version(1, "2026-01-01"), version(2)], 1, None),
    ("champion-without-approval-tag", [version(1, "2026-01-01"), version(2)], 2, "1"),
    ("approved-but-never-champion", [version(1, "2026-01-01"),
                                     SimpleNamespace(version="2", tags={promote.TAG_APPROVED_AT: "2026-01-02"}),
                                     version(3, "2026-01-03")], 3, "1"),
]


@pytest.mark.parametrize(("versions", "current", "expected"), [c[1:] for c in ROLLBACK_CASES],
                         ids=[c[0] for c in ROLLBACK_CASES])
def test_rollback_target(versions, current, expected):
    champion = next(v for v in versions if v.version == str(current))
    target = promote.rollback_target(versions, champion)
    assert (target.version if target else None) == expected


# Against a real registry ------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """An MlflowClient on a fresh SQLite store shared by this module's tests."""
    home = tmp_path_factory.mktemp("promote-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADFRAUD_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        from mlflow import MlflowClient

        from jobs.common import tracking

        tracking.configure()
        yield MlflowClient()


@pytest.fixture
def model(registry, request):
    """A registered model named after the test, and a factory for its versions."""
    name = f"m-{request.node.name}"[:200].replace("[", "-").replace("]", "")
    registry.create_registered_model(name)

    def add(gate: str = GATE_PASSED) -> int:
        v = registry.create_model_version(name, source="/nowhere", tags={TAG_GATE: gate, TAG_GATE_REASON: "test"})
        return int(v.version)

    return name, add


def champion_of(client, name: str) -> int | None:
    from jobs.register import current_alias

    return promote.version_number(current_alias(client, name, CHAMPION))


def test_approval_moves_champion_and_records_who_and_when(registry, model):
    name, add = model
    v1 = add()
    out = promote.approve(registry, name, v1, "alice", "2026-02-01T10:00:00Z", None, False, "run-1")
    assert out["champion_moved"] is True and champion_of(registry, name) == v1
    tags = registry.get_model_version(name, str(v1)).tags
    assert tags[promote.TAG_REVIEW] == "approved"
    assert tags[promote.TAG_APPROVED_BY] == "alice" and tags[promote.TAG_APPROVED_AT] == "2026-02-01T10:00:00Z"
    assert tags[promote.TAG_AUTO_APPROVED] == "false" and tags[promote.TAG_PREVIOUS_CHAMPION] == ""
    v2 = add()
    promote.approve(registry, name, v2, promote.AUTO_REVIEWER, "2026-02-02T10:00:00Z", v1, True, "run-2")
    tags = registry.get_model_version(name, str(v2)).tags
    assert champion_of(registry, name) == v2
    assert tags[promote.TAG_AUTO_APPROVED] == "true" and tags[promote.TAG_APPROVED_BY] == "auto-approve"
    assert tags[promote.TAG_PREVIOUS_CHAMPION] == str(v1)


def test_rejection_leaves_the_champion(registry, model):
    name, add = model
    v1, v2 = add(), add()
    promote.approve(registry, name, v1, "alice", "2026-02-01T10:00:00Z", None, False, "run-1")
    out = promote.reject(registry, name, v2, "bob", "2026-02-02T10:00:00Z")
    assert out["champion_moved"] is False and out["champion_version"] == v1
    assert champion_of(registry, name) == v1
    tags = registry.get_model_version(name, str(v2)).tags
    assert tags[promote.TAG_REVIEW] == "rejected" and tags[promote.TAG_REJECTED_BY] == "bob"
    assert promote.TAG_APPROVED_AT not in tags


def test_a_failed_gate_is_never_promoted_even_when_approved(registry, model):
    name, add = model
    v1, v2 = add(), add(GATE_FAILED)
    promote.approve(registry, name, v1, "alice", "2026-02-01T10:00:00Z", None, False, "run-1")
    with pytest.raises(PermissionError, match=f"v{v2} did not pass its gate"):
        promote.approve(registry, name, v2, "mallory", "2026-02-02T10:00:00Z", v1, False, "run-2")
    assert champion_of(registry, name) == v1


def test_champion_moved_since_the_gate_is_not_overwritten(registry, model):
    """Compare and set: the gate compared against v1, but v2 became champion meanwhile."""
    name, add = model
    v1, v2, v3 = add(), add(), add()
    promote.approve(registry, name, v1, "alice", "2026-02-01T10:00:00Z", None, False, "run-1")
    promote.approve(registry, name, v2, "alice", "2026-02-02T10:00:00Z", v1, False, "run-2")
    out = promote.approve(registry, name, v3, "bob", "2026-02-03T10:00:00Z", v1, False, "run-3")
    assert out["champion_moved"] is False and champion_of(registry, name) == v2
    tags = registry.get_model_version(name, str(v3)).tags
    assert "the gate compared against v1, but the champion is now v2" in tags[promote.TAG_PROMOTION]
    # A lost race is not an approval a rollback may return to.
    assert promote.TAG_APPROVED_AT not in tags and tags[promote.TAG_APPROVED_BY] == "bob"


def test_rollback_goes_back_one_approved_version_at_a_time(registry, model):
    name, add = model
    v1, v2, v3 = add(), add(), add()
    for n, (v, day) in enumerate(((v1, "01"), (v2, "02"), (v3, "03"))):
        promote.approve(registry, name, v, "alice", f"2026-02-{day}T10:00:00Z", [None, v1, v2][n], False, "r")
    assert promote.rollback(registry, name, "carol")["champion_version"] == v2
    assert registry.get_model_version(name, str(v3)).tags[promote.TAG_ROLLED_BACK_BY] == "carol"
    assert promote.rollback(registry, name, "carol")["champion_version"] == v1
    with pytest.raises(LookupError, match=f"no approved version before champion v{v1}"):
        promote.rollback(registry, name, "carol")
    assert champion_of(registry, name) == v1


def test_rollback_without_a_champion_is_a_clear_error(registry, model):
    name, add = model
    add()
    with pytest.raises(LookupError, match="has no champion to roll back"):
        promote.rollback(registry, name, "carol")


def test_cli_approve_writes_the_result(registry, model, tmp_path):
    name, add = model
    v1 = add()
    result_path = tmp_path / "result.json"
    promote.main(["--model-name", name, "--version", str(v1), "--decision", "approve", "--reviewer", "dana",
                  "--expected-champion", "none", "--auto-approved", "False", "--result-path", str(result_path)])
    result = json.loads(result_path.read_text())
    assert result["champion_moved"] is True and result["aliases"] == ["champion"]
    assert result["decision"] == "approve" and result["reviewer"] == "dana" and result["auto_approved"] is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rollback", "--version", "2"], "--rollback takes no --version or --decision"),
        (["--version", "2"], "give --version and --decision (or --rollback)"),
        (["--version", "2", "--decision", "approve", "--expected-champion", "two"],
         "--expected-champion 'two': expected a version number or 'none'"),
    ],
    ids=["rollback-with-version", "missing-decision", "bad-expected-champion"],
)
def test_cli_refuses_inconsistent_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        promote.main(["--model-name", "adfraud-synthetic", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_to_promote_a_failed_gate(registry, model, capsys):
    name, add = model
    v = add(GATE_FAILED)
    with pytest.raises(SystemExit) as info:
        promote.main(["--model-name", name, "--version", str(v), "--decision", "approve"])
    assert info.value.code == 2
    assert "a failed challenger is never promoted" in capsys.readouterr().err
    assert champion_of(registry, name) is None
