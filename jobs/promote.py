"""The registry decision after review: move ``champion``, record a rejection, or roll back.

``--decision approve`` moves the ``champion`` alias to a challenger that passed its gate,
but only if the champion is still the version the gate compared it with
(``--expected-champion``): the alias moves after a fresh read, under a lock on local
stores, so two promotions never overwrite each other unseen. Who approved, when, and
whether a policy approved automatically are version tags. ``--decision reject`` tags
the rejection and leaves the champion as it is. ``--rollback`` moves ``champion`` back to
the most recently approved version before the current one that was not rolled back
itself.

    python -m jobs.promote --model-name adfraud-synthetic --version 3 --decision approve --reviewer alice
    python -m jobs.promote --model-name adfraud-synthetic --version 4 --decision reject --reviewer bob
    python -m jobs.promote --model-name adfraud-synthetic --rollback --reviewer carol

Top-level imports stay light (no MLflow): the DAGs import this module at parse time for
its settings and render the review prompt with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

# Approve a challenger that passed its gate without waiting for a person (unattended
# nightly runs); the retrain DAG's `auto_approve` param defaults to this.
AUTO_APPROVE_ENV_VAR = "ADFRAUD_AUTO_APPROVE"
DEFAULT_AUTO_APPROVE = False

# Base URL of the MLflow UI that review prompts link to.
MLFLOW_UI_URL_ENV_VAR = "ADFRAUD_MLFLOW_UI_URL"
DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"

APPROVE = "approve"
REJECT = "reject"
DECISIONS = (APPROVE, REJECT)

# Who approved when a policy did (the tags also say adfraud.auto_approved=true).
AUTO_REVIEWER = "auto-approve"

TAG_REVIEW = "adfraud.review"  # approved | rejected
TAG_APPROVED_BY = "adfraud.approved_by"
TAG_APPROVED_AT = "adfraud.approved_at"
TAG_AUTO_APPROVED = "adfraud.auto_approved"
TAG_REJECTED_BY = "adfraud.rejected_by"
TAG_REJECTED_AT = "adfraud.rejected_at"
TAG_PROMOTED_AT = "adfraud.promoted_at"
TAG_PREVIOUS_CHAMPION = "adfraud.previous_champion"
TAG_PROMOTION = "adfraud.promotion"  # why an approved version did not become champion
TAG_ROLLED_BACK_AT = "adfraud.rolled_back_at"
TAG_ROLLED_BACK_BY = "adfraud.rolled_back_by"
TAG_RESTORED_AT = "adfraud.restored_at"

# How recorded times look (UTC, second resolution): they sort as strings.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# Seconds to wait for the registry lock of a local store before giving up.
LOCK_TIMEOUT_S = 120


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment setting: 1/true/yes/on or 0/false/no/off; a clear error otherwise."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: expected true or false")


def auto_approve_default() -> bool:
    """Whether runs approve a passing challenger automatically unless told otherwise."""
    return env_flag(AUTO_APPROVE_ENV_VAR, DEFAULT_AUTO_APPROVE)


def mlflow_ui_url() -> str:
    return os.environ.get(MLFLOW_UI_URL_ENV_VAR, DEFAULT_MLFLOW_UI_URL).rstrip("/")


def utc_now() -> str:
    return time.strftime(TIME_FORMAT, time.gmtime())


def utc_time(value: str) -> str:
    """An ISO 8601 time (``Z`` or an offset, fractions allowed) as UTC in :data:`TIME_FORMAT`,
    so recorded times sort as strings; empty means now."""
    if not value.strip():
        return utc_now()
    from datetime import UTC, datetime

    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"--reviewed-at {value!r}: expected an ISO 8601 time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime(TIME_FORMAT)


# Review prompt and summary (no MLflow: the DAG renders these) --------------------------


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("n/a" if value is None else str(value))


def review_subject(register: dict) -> str:
    return f"Promote {register['model_name']} v{register['version']} to champion?"


def review_body(register: dict, ui_url: str | None = None) -> str:
    """The Markdown a reviewer sees: the challenger's metrics beside the champion's and
    the baseline's on the same test split, the gate's verdict, and MLflow links."""
    ui = (ui_url or mlflow_ui_url()).rstrip("/")
    name, version = register["model_name"], register["version"]
    challenger = register.get("challenger_metrics") or {}
    champion = register.get("champion_metrics") or {}
    baseline = register.get("baseline_metrics") or {}
    at_gate = register.get("champion_version_at_gate")
    policy = register.get("gate_policy") or {}
    champion_label = f"champion v{at_gate}" if at_gate else "champion (none yet)"
    run_url = f"{ui}/#/experiments/{register.get('experiment_id', '0')}/runs/{register['mlflow_run_id']}"
    version_url = f"{ui}/#/models/{name}/versions/{version}"
    lines = [
        f"**{name} v{version}** {'passed' if register.get('gate_passed') else 'failed'} the promotion gate: "
        f"{register.get('gate_reason', '')}",
        "",
        f"| test split | challenger v{version} | {champion_label} | LightGBM baseline |",
        "|---|---|---|---|",
        f"| AUC-ROC | {_fmt(challenger.get('auc'))} | {_fmt(champion.get('auc'))} | {_fmt(baseline.get('auc'))} |",
        f"| PR-AUC | {_fmt(challenger.get('pr_auc'))} | {_fmt(champion.get('pr_auc'))} "
        f"| {_fmt(baseline.get('pr_auc'))} |",
        "",
        f"Gate: AUC margin over the champion > {policy.get('min_auc_margin', 'n/a')}, "
        f"PR-AUC drop <= {policy.get('max_pr_auc_drop', 'n/a')}.",
    ]
    trigger = register.get("drift_trigger")
    if trigger:
        lines += ["", f"Triggered by drift: share {_fmt(trigger.get('drift_share'))}, "
                  f"report `{trigger.get('report_uri')}`."]
    lines += [
        "",
        f"[MLflow run]({run_url}) · [model version]({version_url})",
        "",
        f"**Approve** moves `champion` to v{version}; **Reject** keeps "
        f"{f'v{at_gate}' if at_gate else 'no champion'} and tags v{version} as rejected.",
    ]
    return "\n".join(lines)


def registry_summary(register: dict | None, review: dict | None, promote: dict | None,
                     trigger: dict | None) -> dict[str, Any]:
    """The summary fields that come from the registry decision, not from register alone."""
    register, review, promote, trigger = register or {}, review or {}, promote or {}, trigger or {}
    out: dict[str, Any] = {
        "gate_passed": register.get("gate_passed"),
        "baseline_test_auc": (register.get("baseline_metrics") or {}).get("auc"),
        "review_decision": review.get("decision"),
        "reviewer": review.get("reviewer"),
        "auto_approved": review.get("auto_approved"),
        "promoted": bool(promote.get("champion_moved")),
        "aliases": promote.get("aliases", register.get("aliases")),
        "champion_version": promote.get("champion_version", register.get("champion_version")),
        "triggered_by": trigger.get("triggered_by"),
        "trigger_drift_share": trigger.get("drift_share"),
        "trigger_drift_report": trigger.get("report_uri"),
    }
    if promote.get("reason"):
        out["promotion_reason"] = promote["reason"]
    return out


# Registry operations --------------------------------------------------------------------


@contextlib.contextmanager
def registry_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise alias moves on a local store (a file lock beside the SQLite file).

    A tracking server offers no compare-and-set on aliases; there the fresh read right
    before the move is the guard, and the DAGs run one retrain at a time.
    """
    path = None
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri.removeprefix("sqlite:///") + ".alias.lock"
    elif tracking_uri.startswith("file:") or "://" not in tracking_uri:
        path = os.path.join(tracking_uri.removeprefix("file://").removeprefix("file:"), ".alias.lock")
    if path is None:
        yield
        return
    from filelock import FileLock

    with FileLock(path, timeout=LOCK_TIMEOUT_S):
        yield


def _label(version: int | None) -> str:
    return f"v{version}" if version is not None else "no champion"


def version_number(version) -> int | None:
    return int(version.version) if version is not None else None


def aliases_of(client, name: str, version: int) -> list[str]:
    return sorted(client.get_model_version(name, str(version)).aliases)


def approve(client, name: str, version: int, reviewer: str, reviewed_at: str, expected_champion: int | None,
            auto_approved: bool, run_id: str, check_expected: bool = True) -> dict[str, Any]:
    """Move ``champion`` to ``version`` if its gate passed and the champion did not move."""
    import mlflow

    from jobs.register import CHAMPION, GATE_PASSED, TAG_GATE, TAG_GATE_REASON, current_alias

    target = client.get_model_version(name, str(version))
    if target.tags.get(TAG_GATE) != GATE_PASSED:
        raise PermissionError(
            f"{name} v{version} did not pass its gate ({target.tags.get(TAG_GATE_REASON, 'no gate result')}); "
            "a failed challenger is never promoted"
        )
    tags = {
        TAG_REVIEW: "approved",
        TAG_APPROVED_BY: reviewer,
        TAG_APPROVED_AT: reviewed_at,
        TAG_AUTO_APPROVED: "true" if auto_approved else "false",
    }
    with registry_lock(mlflow.get_tracking_uri()):
        # Compare and set: a fresh read of the champion right before the move.
        before = version_number(current_alias(client, name, CHAMPION))
        if check_expected and before != expected_champion:
            reason = (f"the gate compared against {_label(expected_champion)}, but the champion is now "
                      f"{_label(before)}; re-run the retrain to compare with it")
            stale = {TAG_REVIEW: "approved", TAG_APPROVED_BY: reviewer, TAG_AUTO_APPROVED: tags[TAG_AUTO_APPROVED],
                     TAG_PROMOTION: reason}
            for key, value in stale.items():
                client.set_model_version_tag(name, str(version), key, value)
            logger.warning("%s v%s approved by %s but not promoted: %s", name, version, reviewer, reason)
            return {"champion_moved": False, "reason": reason, "champion_version": before,
                    "previous_champion_version": before}
        if before == version:
            return {"champion_moved": False, "reason": f"v{version} already is champion",
                    "champion_version": version, "previous_champion_version": before}
        client.set_registered_model_alias(name, CHAMPION, str(version))
        tags.update({TAG_PROMOTED_AT: utc_now(), TAG_PREVIOUS_CHAMPION: str(before or ""),
                     TAG_PROMOTION: f"champion since DAG run {run_id}"})
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
    logger.info("%s v%s is now %s (was v%s), approved by %s%s", name, version, CHAMPION, before, reviewer,
                " automatically" if auto_approved else "")
    return {"champion_moved": True, "reason": f"approved by {reviewer}", "champion_version": version,
            "previous_champion_version": before}


def reject(client, name: str, version: int, reviewer: str, reviewed_at: str) -> dict[str, Any]:
    """Tag the rejection; the champion stays where it is."""
    from jobs.register import CHAMPION, current_alias

    for key, value in {TAG_REVIEW: "rejected", TAG_REJECTED_BY: reviewer, TAG_REJECTED_AT: reviewed_at}.items():
        client.set_model_version_tag(name, str(version), key, value)
    champion = version_number(current_alias(client, name, CHAMPION))
    logger.info("%s v%s rejected by %s; champion stays v%s", name, version, reviewer, champion)
    return {"champion_moved": False, "reason": f"rejected by {reviewer}", "champion_version": champion,
            "previous_champion_version": champion}


def _approval_key(version) -> tuple[str, int]:
    return version.tags.get(TAG_APPROVED_AT, ""), int(version.version)


def rollback_target(versions: list, current) -> Any | None:
    """The version a rollback restores: the most recently approved one before ``current``
    that became champion and was not rolled back itself (approval times tie-break on the
    version number). An approval that lost a race (no ``adfraud.promoted_at``) never counts."""
    approved = [v for v in versions if v.tags.get(TAG_APPROVED_AT) and v.tags.get(TAG_PROMOTED_AT)
                and not v.tags.get(TAG_ROLLED_BACK_AT)]
    candidates = [v for v in approved if v.version != current.version]
    if current.tags.get(TAG_APPROVED_AT):
        candidates = [v for v in candidates if _approval_key(v) < _approval_key(current)]
    return max(candidates, key=_approval_key, default=None)


def rollback(client, name: str, requested_by: str) -> dict[str, Any]:
    """Move ``champion`` back to :func:`rollback_target`; fails when there is none."""
    import mlflow

    from jobs.common import tracking
    from jobs.register import CHAMPION, current_alias

    with registry_lock(mlflow.get_tracking_uri()):
        current = current_alias(client, name, CHAMPION)
        if current is None:
            raise LookupError(f"{name} has no champion to roll back")
        versions = list(client.search_model_versions(f"name = '{name}'"))
        target = rollback_target(versions, current)
        if target is None:
            raise LookupError(f"{name} has no approved version before champion v{current.version} to roll back to")
        client.set_registered_model_alias(name, CHAMPION, target.version)
        now = utc_now()
        client.set_model_version_tag(name, current.version, TAG_ROLLED_BACK_AT, now)
        client.set_model_version_tag(name, current.version, TAG_ROLLED_BACK_BY, requested_by)
        client.set_model_version_tag(name, target.version, TAG_RESTORED_AT, now)
    logger.info("rolled %s back from v%s to v%s (requested by %s)", name, current.version, target.version,
                requested_by)
    return {"champion_moved": True, "reason": f"rollback requested by {requested_by}",
            "champion_version": int(target.version), "previous_champion_version": int(current.version),
            "rolled_back_version": int(current.version),
            "data_uri": target.tags.get(tracking.TAG_DATA_URI, "")}


def run(args) -> dict[str, Any]:
    import mlflow
    from mlflow import MlflowClient

    from jobs.common import tracking

    tracking.configure()
    client = MlflowClient()
    if args.rollback:
        out = rollback(client, args.model_name, args.reviewer)
    elif args.decision == APPROVE:
        out = approve(client, args.model_name, args.version, args.reviewer, utc_time(args.reviewed_at),
                      parse_champion(args.expected_champion or ""), args.auto_approved, args.run_id,
                      check_expected=args.expected_champion is not None)
    else:
        out = reject(client, args.model_name, args.version, args.reviewer, utc_time(args.reviewed_at))
    version = out["champion_version"] if args.rollback else args.version
    return {
        "model_name": args.model_name,
        "version": version,
        "decision": "rollback" if args.rollback else args.decision,
        "reviewer": args.reviewer,
        "auto_approved": bool(args.auto_approved),
        "aliases": aliases_of(client, args.model_name, version) if version else [],
        "tracking_uri": mlflow.get_tracking_uri(),
        **out,
    }


def parse_champion(value: str) -> int | None:
    """``--expected-champion``: a version number, or none/empty for "no champion"."""
    if value.strip().lower() in ("", "none", "null"):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--expected-champion {value!r}: expected a version number or 'none'") from None


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise ValueError(value)


def main(argv: list[str] | None = None) -> None:
    from jobs.common import cli

    p = cli.parser("jobs.promote", __doc__.split("\n\n")[0])
    p.add_argument("--model-name", required=True, help="registered model name, e.g. adfraud-synthetic")
    p.add_argument("--version", type=int, help="the reviewed version (not with --rollback)")
    p.add_argument("--decision", choices=DECISIONS, help="the review's outcome (not with --rollback)")
    p.add_argument("--reviewer", default=os.environ.get("USER", "unknown"),
                   help="who decided (recorded as a version tag)")
    p.add_argument("--reviewed-at", default="", help="when, ISO 8601 UTC (default: now)")
    p.add_argument("--expected-champion", default=None,
                   help="the champion version the gate compared against ('none' for no champion); "
                   "the alias moves only if it still holds. Default: do not check")
    p.add_argument("--auto-approved", type=parse_bool, default=False,
                   help="true when a policy (auto_approve) approved, not a person")
    p.add_argument("--rollback", action="store_true",
                   help="move champion back to the previous approved version instead")
    p.add_argument("--run-id", default="manual", help="orchestrator run id, recorded in the promotion tag")
    args = p.parse_args(argv)
    cli.configure_logging(args.verbose)
    if args.rollback and (args.version is not None or args.decision):
        cli.fail("--rollback takes no --version or --decision")
    if not args.rollback and (args.version is None or args.decision is None):
        cli.fail("give --version and --decision (or --rollback)")
    try:
        if args.expected_champion is not None:
            parse_champion(args.expected_champion)
        utc_time(args.reviewed_at)
    except ValueError as exc:
        cli.fail(str(exc))
    try:
        result = run(args)
    except (PermissionError, LookupError) as exc:
        cli.fail(str(exc))
    cli.write_result(result, args.result_path)


if __name__ == "__main__":
    main()
