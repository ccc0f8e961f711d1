"""A logged model is whole in the artifact store, or not there at all.

MLflow logs a model in two steps: it saves it to a local temporary folder, then copies the
folder to the LoggedModel's artifact location, file by file. A full disk or a read-only
store stops the copy halfway; MLflow marks the LoggedModel FAILED but leaves the files it
had copied. `whole_model_or_none` wraps the logging call (whatever flavor or signature it
logs) and removes such a model, then reports the write problem as one line.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.entities import LoggedModelStatus

from dlilabs.ground.io import UnwritableFile, write_problem

log = logging.getLogger("dlilabs.tracking")


def _last_model_id() -> str | None:
    with contextlib.suppress(Exception):  # none logged yet, or the store is what failed
        model = mlflow.last_logged_model()
        return model.model_id if model is not None else None
    return None


def local_folder(uri: str) -> Path | None:
    """The folder a file:// (or plain path) artifact URI names; None for a remote store."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def remove_model(model) -> None:
    """Delete a LoggedModel's artifacts (its whole `models/<id>/` folder in a local store)
    and the LoggedModel itself (MLflow keeps it as deleted: it leaves searches and the UI)."""
    folder = local_folder(model.artifact_location)
    if folder is not None:
        # artifact_location is <root>/<experiment>/models/<model id>/artifacts
        shutil.rmtree(folder.parent if folder.parent.name == model.model_id else folder, True)
    else:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(model.artifact_location).delete_artifacts()
    mlflow.MlflowClient().delete_logged_model(model.model_id)


@contextlib.contextmanager
def whole_model_or_none() -> Iterator[None]:
    """Around one MLflow model-logging call (Model.log, mlflow.<flavor>.log_model): when it
    raises before the model it created is READY (complete), that model and whatever of it
    reached the artifact store are removed. A full disk, read-only folder or missing
    permission is then an UnwritableFile (one line naming the file); other errors go on."""
    before = _last_model_id()
    try:
        yield
    except Exception as error:
        created, cleaned = _last_model_id(), True
        if created is not None and created != before:
            try:
                model = mlflow.MlflowClient().get_logged_model(created)
                if model.status != LoggedModelStatus.READY:
                    remove_model(model)
            except Exception as cleanup:  # keep the cause; say what could not be cleaned
                log.warning("could not remove the incomplete model %s: %s", created, cleanup)
                cleaned = False
        problem = write_problem(error, cleaned=cleaned)
        if problem is None:
            raise
        raise UnwritableFile(f"logging the model: {problem}") from None
