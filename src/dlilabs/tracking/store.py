"""The MLflow store: connecting to it (SQLite file or tracking server) and surviving it.

SQLite stores run in write-ahead-log mode and retry "database is locked"; a tracking server
gets client HTTP settings that make a dead server fail a job in seconds, and
`tracking_user_error` turns a lost connection deep inside MLflow into one clear line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
from pathlib import Path

from omegaconf import DictConfig

from dlilabs.errors import UserError

log = logging.getLogger("dlilabs.tracking")

HINT = "Is it running? (make server)"
# requests' exceptions for a server that is gone, hung, or cut a response short.
FAILURES = ("ConnectionError", "Timeout", "RetryError", "ChunkedEncodingError")
# tracking.<key> -> the MLflow client's environment variable (mlflow/environment_variables.py).
HTTP_SETTINGS = {
    "http_timeout": "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "http_max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "http_backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
}


def connect(tracking_cfg: DictConfig) -> str:
    """Point MLflow at the configured store and return the experiment id (created if new,
    with its artifacts under `tracking.artifact_location`, whatever the working directory)."""
    import mlflow

    apply_client_settings(tracking_cfg)  # a dead server fails fast, not after minutes
    database = tracking_cfg.uri.removeprefix("sqlite:///")
    if database != tracking_cfg.uri:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_cfg.uri)
    experiment = retry_if_locked(mlflow.get_experiment_by_name, tracking_cfg.experiment_name)
    if database != tracking_cfg.uri:
        use_write_ahead_log(Path(database))
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        location = tracking_cfg.artifact_location
        if location and "://" not in location:
            location = Path(location).resolve().as_uri()
        try:
            experiment_id = mlflow.create_experiment(
                tracking_cfg.experiment_name, artifact_location=location
            )
        except mlflow.exceptions.MlflowException:
            # A parallel job created it between our lookup and now.
            experiment_id = mlflow.get_experiment_by_name(
                tracking_cfg.experiment_name
            ).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def use_write_ahead_log(database: Path) -> None:
    """Switch a SQLite store to write-ahead logging (persistent, once per file): readers no
    longer block the writer, so parallel sweep jobs rarely meet "database is locked"."""
    with contextlib.closing(sqlite3.connect(database, timeout=30)) as connection:
        if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            retry_if_locked(connection.execute, "PRAGMA journal_mode=WAL")


def retry_if_locked(function, *args, attempts: int = 8, **kwargs):
    """Call `function`, retrying with backoff while SQLite says "database is locked"."""
    for attempt in range(attempts):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            if "database is locked" not in str(error) or attempt == attempts - 1:
                raise
            log.warning("MLflow store busy (database is locked); retrying")
            time.sleep(0.2 * 2**attempt)
    return None


def apply_client_settings(tracking_cfg) -> None:
    """Export `tracking.http_*` (when set) as the MLflow client's HTTP environment variables, so
    a dead server fails a job in seconds instead of after MLflow's ~4 minutes of retries."""
    for key, variable in HTTP_SETTINGS.items():
        value = tracking_cfg.get(key)
        if value is not None:
            os.environ[variable] = str(int(value))


def _reason(error: BaseException) -> str:
    """A short human reason for a requests failure: 'connection refused', 'no answer ...'."""
    import requests

    if isinstance(error, requests.exceptions.Timeout):
        seconds = os.environ.get(HTTP_SETTINGS["http_timeout"], "120")
        return f"no answer within {seconds} s (tracking.http_timeout)"
    if isinstance(error, requests.exceptions.RetryError):
        return "it kept answering with server errors"
    text = str(error)
    if match := re.search(r"\[Errno -?\d+\] ([^'\")]+)", text):
        return match.group(1).strip().lower()
    if "RemoteDisconnected" in text or "aborted" in text:
        return "the server closed the connection"
    return type(error).__name__


def tracking_user_error(error: BaseException, uri: str | None = None) -> UserError | None:
    """A UserError naming the tracking server if `error` (or an exception it was raised from
    or while handling) is a failed HTTP request to it, else None. `uri` defaults to MLflow's
    current tracking URI. Errors reaching other hosts (dataset downloads) are not matched."""
    import mlflow
    import requests

    uri = (uri or mlflow.get_tracking_uri()).rstrip("/")
    if not uri.startswith(("http://", "https://")):
        return None
    failures = tuple(getattr(requests.exceptions, name) for name in FAILURES)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        request = getattr(error, "request", None)
        url = getattr(request, "url", None) or ""
        if isinstance(error, failures) and url.startswith(uri):
            reason = _reason(error)
            return UserError(f"lost the MLflow tracking server at {uri}: {reason}. {HINT}")
        error = error.__cause__ or error.__context__
    return None
