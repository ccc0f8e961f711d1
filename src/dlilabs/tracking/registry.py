"""The model registry: the `champion` alias, and loading registered models.

The evaluate stage moves `champion` to a lab's new version when it scores better;
`dlilabs.predict` resolves `models:/...` URIs and bare registered names here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dlilabs.ground.errors import UserError

log = logging.getLogger("dlilabs.tracking")

CHAMPION = "champion"


def update_champion(
    client: MlflowClient,
    name: str,
    version: int | str,
    metric: str = "eval/val_accuracy",
    alias: str = CHAMPION,
) -> bool:
    """Point `alias` of registered model `name` at `version` if its run's `metric` beats the
    current holder's (or nobody holds it). Returns True when the alias now names `version`."""
    version = str(version)
    candidate = _version_metric(client, name, version, metric)
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no version holds the alias yet
        holder = None
    if holder is not None and str(holder.version) != version:
        current = _version_metric(client, name, holder.version, metric)
        if not candidate > current:  # NaN never wins; ties keep the older champion
            log.info(
                "%s v%s: %s %.4f does not beat @%s v%s (%.4f)",
                name,
                version,
                metric,
                candidate,
                alias,
                holder.version,
                current,
            )
            return False
    client.set_registered_model_alias(name, alias, version)
    log.info("%s v%s is now @%s (%s %.4f)", name, version, alias, metric, candidate)
    return True


def _version_metric(client: MlflowClient, name: str, version: str, metric: str) -> float:
    """The latest value of `metric` in the run that produced model version `version`."""
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        return float("nan")
    return client.get_run(run_id).data.metrics.get(metric, float("nan"))


def store_exists(uri: str) -> bool:
    """False for a SQLite store whose file is missing (opening it would create it)."""
    database = uri.removeprefix("sqlite:///")
    return database == uri or Path(database).is_file()


def latest_version(name: str, uri: str) -> str | None:
    """The highest version number registered under `name`, or None."""
    versions = MlflowClient(uri).search_model_versions(f"name = '{name.replace(chr(39), '')}'")
    return max((v.version for v in versions), key=int, default=None)


def load_keras_model(model_uri: str, uri: str):
    """(Keras model, its run's dataset.name param or None) from an MLflow model URI."""
    import mlflow

    if not store_exists(uri):
        raise UserError(
            f"no MLflow store at {uri}: cannot resolve {model_uri}; run the "
            "pipeline first or pass --tracking-uri"
        )
    mlflow.set_tracking_uri(uri)
    try:
        model = _load_keras(model_uri)
        info = mlflow.models.get_model_info(model_uri)
    except MlflowException as error:
        raise UserError(f"cannot load {model_uri} from {uri}: {error.message}") from None
    run = mlflow.MlflowClient(uri).get_run(info.run_id) if info.run_id else None
    return model, run.data.params.get("dataset.name") if run else None


def load_model_folder(path: Path):
    """The Keras model in an MLflow model folder (one holding `MLmodel`)."""
    return _load_keras(str(path))


def _load_keras(model_uri: str):
    """The Keras model of an MLflow model: the Keras flavor of versions logged before
    raw-pixel serving (they take scaled input), the artifact inside a PixelClassifier after."""
    import mlflow

    from dlilabs.tracking.serving import is_pixel_model, load_pixel_model

    if is_pixel_model(model_uri):
        return load_pixel_model(model_uri)[0]
    return mlflow.keras.load_model(model_uri)
