"""What every stage's ``main()`` does: logging, the argument parser, the result file."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from jobs.common import settings, storage

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# Exceptions that mean "the user pointed the stage at something wrong", reported in one
# line (exit 2) instead of a traceback; anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _excepthook(kind, value, tb) -> None:
    if issubclass(kind, USER_ERRORS) or _is_missing_registry_entity(value):
        message = str(value)
        if issubclass(kind, FileNotFoundError) and " " not in message:
            message = f"not found: {message}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    sys.__excepthook__(kind, value, tb)


def _is_missing_registry_entity(value: BaseException) -> bool:
    """An MLflow 'not found' (unknown model, version or alias) is a user error too."""
    return type(value).__name__ == "MlflowException" and getattr(value, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when configured
    (a stage called in-process by a test or a notebook keeps logging after stderr moves)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: bool = False) -> None:
    """Configure the root logger once, from a stage's ``main()`` (never at import).

    Also installs the hook that turns user errors (a missing input, an unknown model)
    into one ``error:`` line and exit status 2.
    """
    sys.excepthook = _excepthook
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, handlers=[_StderrHandler()], force=True
    )
    for noisy in ("py4j", "urllib3", "alembic", "botocore", "fsspec", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when there is one to show and the help text lacks it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, "", argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every stage shares."""
    p = argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=description,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--result-path",
        default=None,
        help=f"where to write the JSON result; if unset, ${settings.XCOM_PATH_ENV_VAR} "
        f"or {settings.DEFAULT_XCOM_PATH}",
    )
    p.add_argument("--verbose", action="store_true", help="log at debug level")
    return p


def write_result(result: dict[str, Any], result_path: str | None = None) -> str:
    """Write a stage's JSON result where Airflow collects it and log it."""
    path = result_path or settings.xcom_path()
    storage.write_json(path, result)
    logger.info("result written to %s", path)
    logger.debug("result: %s", json.dumps(result, default=str))
    return path


def fail(message: str, code: int = 2) -> None:
    """Stop the stage with a one-line error a user can act on, not a stack trace."""
    # One plain line on stderr (where the log handler writes too), without a traceback.
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise SystemExit(f"error: {name}={value!r} is not an integer") from exc
