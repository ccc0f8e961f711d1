"""The MLflow store: connecting to it (SQLite file or tracking server) and surviving it.

SQLite stores must be writable, are set up (schema created or upgraded, experiment created)
under a file lock so parallel jobs cannot corrupt them, run in write-ahead-log mode and
retry "database is locked"; a tracking server gets client HTTP settings that make a dead
server fail a job in seconds, and `tracking_user_error` turns a lost connection deep inside
MLflow into one clear line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import DictConfig

from dlilabs.ground.errors import UserError

log = logging.getLogger("dlilabs.tracking")
# MLflow announces every schema check and table creation at INFO ("Creating initial MLflow
# database tables...", alembic's steps): nothing a user acts on. Warnings still show.
for _chatty in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)

HINT = "Is it running? (make server)"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/"  # where a server with --serve-artifacts takes them
# Seconds to wait for another process creating or upgrading the SQLite store's schema (a
# big store's migration can take minutes; creating a new one takes seconds).
LOCK_TIMEOUT = 600
# requests' exceptions for a server that is gone, hung, or cut a response short.
FAILURES = ("ConnectionError", "Timeout", "RetryError", "ChunkedEncodingError")
# MLflow's error codes for HTTP 401 and 403 from a server started with --auth.
AUTH_ERRORS = {
    "UNAUTHENTICATED": "not logged in",
    "PERMISSION_DENIED": "permission denied",
}
# tracking.<key> -> the MLflow client's environment variable (mlflow/environment_variables.py).
HTTP_SETTINGS = {
    "http_timeout": "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "http_max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "http_backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
}


def close_connections() -> None:
    """Close the database connections MLflow's stores keep pooled in this process (at exit:
    dlilabs.tracking registers it). A process that ends without Python's teardown (commands,
    through `ground.startup.run_command`; evaluate's forked side) would otherwise leave a SQLite
    store's write-ahead log beside it (`mlflow.db-wal`): nothing is lost, but a copy of
    `mlflow.db` alone would miss the newest runs. The last connection's close folds the log
    into the file, as it did at the end of every process before. A no-op without MLflow."""
    from dlilabs.tracking import STORE_MODULES

    for name in STORE_MODULES:
        store_class = getattr(sys.modules.get(name), "SqlAlchemyStore", None)
        # MLflow caches one engine per database URI on the class (private: tests/tracking/
        # test_store.py checks that no -wal file outlives a stage).
        for engine in list(getattr(store_class, "_engine_map", {}).values()):
            with contextlib.suppress(Exception):
                engine.dispose()


def connect(tracking_cfg: DictConfig) -> str:
    """Point MLflow at the configured store and return the experiment id (created if new,
    with its artifacts under `tracking.artifact_location`, whatever the working directory).

    A SQLite store must be writable (else a UserError naming it); its schema creation or
    upgrade and the experiment's lookup-or-create run under a file lock beside it, so any
    number of processes may start at once. The experiment gets what the MLflow UI needs to
    open on its runs (`uiview.prepare_experiment`). Then runs left RUNNING by a process that
    is gone are ended KILLED (`reconcile`; a failure there is only a warning)."""
    import mlflow

    from dlilabs.tracking.reconcile import reconcile_quietly
    from dlilabs.tracking.uiview import prepare_experiment

    apply_client_settings(tracking_cfg)  # a dead server fails fast, not after minutes
    database = sqlite_file(tracking_cfg.uri)
    if database is None:
        mlflow.set_tracking_uri(tracking_cfg.uri)
        experiment_id = experiment_id_for(tracking_cfg)
        prepare_experiment(experiment_id, tracking_cfg.get("page"))  # the UI opens on runs
    else:
        check_writable(database)
        with store_lock(database):
            upgrade_old_schema(tracking_cfg.uri, database)
            mlflow.set_tracking_uri(tracking_cfg.uri)
            # The first call builds the store: MLflow creates a new file's schema here.
            experiment_id = experiment_id_for(tracking_cfg)
            prepare_experiment(experiment_id, tracking_cfg.get("page"))  # the UI opens on runs
            use_write_ahead_log(database)
    mlflow.set_experiment(experiment_id=experiment_id)
    reconcile_quietly(experiment_id, tracking_cfg.get("stale_after_minutes", 30))
    return experiment_id


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check_writable(database: Path) -> None:
    """Raise a UserError unless this process may write the SQLite store `database` and
    create files in its folder (the lock, SQLite's -wal and -shm files)."""
    fix = "or use another store (DLILABS_STORE_DIR=<folder> or MLFLOW_TRACKING_URI)"
    folder = database.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create the MLflow store's folder {folder}: {error.strerror}; {fix}"
        ) from None
    if database.exists() and not os.access(database, os.R_OK | os.W_OK):
        raise UserError(
            f"the MLflow store {database} is read-only for this user: make it writable "
            f"(chmod u+w {database}), {fix}"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(
            f"the MLflow store's folder {folder} is not writable for this user (SQLite keeps "
            f"its lock and journal files beside {database.name}): make it writable, {fix}"
        )


@contextlib.contextmanager
def store_lock(database: Path) -> Iterator[None]:
    """Hold `<database>.lock` (an OS file lock: released even if the holder is killed)."""
    from filelock import FileLock, Timeout

    lock = FileLock(f"{database}.lock")
    try:
        try:
            lock.acquire(timeout=2)
        except Timeout:
            log.info("waiting for another process to set up the MLflow store %s", database)
            lock.acquire(timeout=LOCK_TIMEOUT)
    except Timeout:
        raise UserError(
            f"waited {LOCK_TIMEOUT} s for {lock.lock_file}: another process holds the MLflow "
            "store's lock (creating or upgrading it?); try again when it is done"
        ) from None
    except PermissionError as error:
        raise UserError(f"cannot create {lock.lock_file}: {error.strerror}") from None
    try:
        yield
    finally:
        lock.release()


def schema_revision(database: Path) -> str | None:
    """The Alembic revision of an MLflow SQLite store's schema, None for a new or empty file."""
    if not database.is_file() or database.stat().st_size == 0:
        return None
    with contextlib.closing(sqlite3.connect(database, timeout=30)) as connection:
        try:
            row = connection.execute("select version_num from alembic_version").fetchone()
        except sqlite3.OperationalError:  # no such table: not set up yet
            return None
    return row[0] if row else None


def upgrade_old_schema(uri: str, database: Path) -> None:
    """Bring a store made by an older MLflow to this MLflow's schema (what `mlflow db
    upgrade` does), after copying it to `<database>.before-<revision>`. Call it under
    `store_lock`: Alembic's SQLite migrations are not safe to run twice at once. A store
    from a newer MLflow (a revision unknown here) is left for MLflow to refuse."""
    # mlflow.store.db.utils' _get_alembic_config and _upgrade_db are private (what `mlflow db
    # upgrade` runs, in-process and under our lock): pyproject bounds mlflow <4 for them, and
    # tests/tracking/test_store.py upgrades a real older store.
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError
    from mlflow.store.db import utils

    revision = schema_revision(database)
    if revision is None or revision == _current_head():
        return
    scripts = ScriptDirectory.from_config(utils._get_alembic_config(""))
    try:
        scripts.get_revision(revision)
    except CommandError:
        return
    backup = database.with_name(f"{database.name}.before-{revision}")
    log.warning(
        "MLflow store %s has an older schema (%s): upgrading it (copy kept in %s)",
        database,
        revision,
        backup,
    )
    with (
        contextlib.closing(sqlite3.connect(database, timeout=30)) as source,
        contextlib.closing(sqlite3.connect(backup)) as copy,
    ):
        source.backup(copy)
    engine = utils.create_sqlalchemy_engine_with_retry(uri)
    try:
        utils._upgrade_db(engine)
    finally:
        engine.dispose()


@functools.cache
def _current_head() -> str:
    """This MLflow's newest schema revision (reading its ~60 migration scripts: 0.15 s, once
    per process, not once per sweep job)."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db import utils

    return ScriptDirectory.from_config(utils._get_alembic_config("")).get_current_head()


def experiment_id_for(tracking_cfg: DictConfig) -> str:
    """Id of the experiment `tracking.experiment_name`, created if missing. Safe against a
    parallel job creating it first (the SQLite lock prevents that; a server's store says the
    name exists, and we look it up again)."""
    import mlflow

    name = tracking_cfg.experiment_name
    experiment = retry_if_locked(mlflow.get_experiment_by_name, name)
    if experiment is None:
        location = tracking_cfg.artifact_location
        if location and "://" not in location:
            location = Path(location).resolve().as_uri()
        try:
            return retry_if_locked(mlflow.create_experiment, name, artifact_location=location)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = mlflow.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise UserError(
            f"the MLflow experiment {name!r} is deleted: restore it (mlflow experiments "
            "restore) or log elsewhere (tracking.experiment_name=<name>)"
        )
    return experiment.experiment_id


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
    or while handling) is a failed HTTP request to it, or its refusal (401/403), else None.
    `uri` defaults to MLflow's current tracking URI. Errors reaching other hosts (dataset
    downloads) are not matched."""
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
            if ARTIFACTS_API in url and isinstance(error, requests.exceptions.RetryError):
                # The server answers, but cannot write to (or read from) its artifact store.
                return UserError(
                    f"the MLflow tracking server at {uri} failed to store or serve an artifact "
                    f"(HTTP 500 on {urlsplit(url).path}): its artifact store is failing; check "
                    "the bucket or folder given to its --artifacts, and its log (mlflow.log)"
                )
            reason = _reason(error)
            return UserError(f"lost the MLflow tracking server at {uri}: {reason}. {HINT}")
        if getattr(error, "error_code", None) in AUTH_ERRORS:
            return UserError(
                f"the MLflow tracking server at {uri} refused us "
                f"({AUTH_ERRORS[error.error_code]}): export MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD for a user it knows (the server's admin password is "
                "in its data dir: mlflow-admin.password)"
            )
        error = error.__cause__ or error.__context__
    return None
