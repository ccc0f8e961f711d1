"""MLflow tracking: the store, run metadata, per-epoch metrics and the logged Keras model.

Metric names are stable and grouped: `train/loss`, `train/accuracy`, `val/loss`,
`val/accuracy`, and the overfitting gap `gap/accuracy` (train - val) and `gap/loss`
(val - train). The history CSV uses the same names with `_` (`train_accuracy`), which
DVC's plot templates read more easily.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import time
import types
from collections.abc import Iterator
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.entities import Metric
from omegaconf import DictConfig, OmegaConf

from dlilabs.server import apply_client_settings

log = logging.getLogger("dlilabs.tracking")

HISTORY_COLUMNS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "gap_loss",
    "gap_accuracy",
)


def connect(tracking_cfg: DictConfig) -> str:
    """Point MLflow at the configured store and return the experiment id (created if new,
    with its artifacts under `tracking.artifact_location`, whatever the working directory)."""
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


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """Resolved config -> {"model.hidden_units": "[512, 512]", "trainer.epochs": "5", ...}.

    `paths` and the download `source` are machine-specific, so they go in the config artifact
    but not in params (params should compare across machines)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("paths", None)
    resolved.get("dataset", {}).pop("source", None)
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            flat[prefix] = str(value)

    walk("", resolved)
    return flat


def git_state(root: Path) -> dict[str, str]:
    """{"git.commit": sha, "git.dirty": "true"/"false"} for the project, empty outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(bool(changes)).lower()}


def run_tags(cfg: DictConfig, stage: str, extra: dict[str, str]) -> dict[str, str]:
    """Tags every lab run carries: lab, DVC stage, git state, versions, demo flag, plus `extra`."""
    import tensorflow as tf

    tags = {
        "lab": cfg.lab,
        "dataset": cfg.dataset.name,
        # DVC names the running stage (train@asl_cnn); outside DVC, say what it would be.
        "dvc.stage": os.environ.get("DVC_STAGE", stage),
        "dvc.managed": str("DVC_STAGE" in os.environ).lower(),
        "demo": str(bool(cfg.demo)).lower(),
        # Where it ran: the project, or a copy (DVC's temporary experiment folders).
        "dlilabs.workdir": str(cfg.paths.root),
        "tensorflow.version": tf.__version__,
        "keras.version": keras.__version__,
        **git_state(Path(cfg.paths.root)),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    tags.update(extra)
    return tags


def history_row(epoch: int, logs: dict) -> dict[str, float]:
    """Keras epoch logs -> one history row: epoch (1-based), train/val loss and accuracy, gaps."""
    row = {"epoch": epoch}
    for key, value in logs.items():
        name = key.removeprefix("val_")
        split = "val" if key.startswith("val_") else "train"
        if name in ("loss", "accuracy"):
            row[f"{split}_{name}"] = float(value)
    if "val_accuracy" in row and "train_accuracy" in row:
        row["gap_accuracy"] = row["train_accuracy"] - row["val_accuracy"]
    if "val_loss" in row and "train_loss" in row:
        row["gap_loss"] = row["val_loss"] - row["train_loss"]
    return row


def metric_name(column: str) -> str:
    """History column -> MLflow metric name: `train_accuracy` -> `train/accuracy`."""
    return column.replace("_", "/", 1)


class EpochLogger(keras.callbacks.Callback):
    """Logs every epoch to the active MLflow run and keeps the rows for the history CSV.

    Metrics are sent at least every `flush_seconds` (each image-lab epoch takes longer, so
    they go out as each epoch ends); call `flush()` in a `finally` so a crash keeps them."""

    def __init__(self, flush_seconds: float = 2.0):
        super().__init__()
        self.rows: list[dict[str, float]] = []
        self.flush_seconds = flush_seconds
        self._pending: list = []
        self._last_flush = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        row = history_row(epoch + 1, logs or {})
        self.rows.append(row)
        timestamp = int(time.time() * 1000)
        self._pending.extend(
            Metric(metric_name(column), value, timestamp, epoch + 1)
            for column, value in row.items()
            if column != "epoch"
        )
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def on_train_end(self, logs=None):
        self.flush()

    def flush(self) -> None:
        """Send the buffered epoch metrics to the active run (once: a failed send is not
        retried by the next flush, so a dead server costs one timeout, not several)."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        run = mlflow.active_run()
        if pending and run is not None:
            client = mlflow.MlflowClient()
            # log_batch takes at most 1000 metrics per call.
            for start in range(0, len(pending), 1000):
                batch = pending[start : start + 1000]
                retry_if_locked(client.log_batch, run.info.run_id, metrics=batch)


class KeepBestWeights(keras.callbacks.Callback):
    """Remembers the weights of the best epoch by `monitor` and restores them after training.

    The course keeps the last weights, and lab 4's last epoch can be far below its best."""

    def __init__(self, monitor: str = "val_accuracy"):
        super().__init__()
        self.monitor = monitor
        self.maximize = "accuracy" in monitor
        self.best_value: float | None = None
        self.best_epoch = 0
        self.best_weights = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        improved = self.best_value is None or (
            value > self.best_value if self.maximize else value < self.best_value
        )
        if improved:
            self.best_value, self.best_epoch = float(value), epoch + 1
            self.best_weights = self.model.get_weights()

    def restore(self) -> None:
        """Load the best epoch's weights into the model (no-op if no epoch finished)."""
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


def summary_metrics(rows: list[dict[str, float]], best_epoch: int) -> dict[str, float]:
    """Best and final of each history column, and the best epoch (1-based)."""
    summary: dict[str, float] = {"best_epoch": float(best_epoch)}
    if not rows:
        return summary
    best_row = rows[best_epoch - 1] if best_epoch else rows[-1]
    for column in HISTORY_COLUMNS:
        if column in rows[-1]:
            summary[f"final/{metric_name(column)}"] = rows[-1][column]
            summary[f"best/{metric_name(column)}"] = best_row[column]
    return summary


def _save_keras_model(path, **kwargs):
    # MLflow 3.17's keras save_model writes the input example before it creates the model
    # folder (FileNotFoundError on input_example.json); creating the folder first fixes it.
    os.makedirs(path, exist_ok=True)
    return mlflow.keras.save_model(path=path, **kwargs)


# mlflow.keras, but with the folder fix above; Model.log only needs these two attributes.
_KERAS_FLAVOR = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_model)


def log_keras_model(model: keras.Model, sample_inputs: np.ndarray, registered_name: str | None):
    """Log `model` with MLflow's Keras 3 flavor, a signature inferred from `sample_inputs`
    (e.g. float32 (5, 28, 28)) and its predictions, that input example, and register it under
    `registered_name` if given. Returns MLflow's ModelInfo."""
    import tensorflow as tf
    from mlflow.models import Model, infer_signature

    signature = infer_signature(sample_inputs, model.predict(sample_inputs, verbose=0))
    return Model.log(
        artifact_path=None,
        name="model",
        flavor=_KERAS_FLAVOR,
        model=model,
        signature=signature,
        input_example=sample_inputs,
        registered_model_name=registered_name,
        # Listing them skips MLflow's requirement inference, which reloads the model in a
        # subprocess (another TensorFlow import) for a list we already know.
        pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
    )


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"received signal {signum}")


@contextlib.contextmanager
def lab_run(
    run_name: str, tags: dict[str, str] | None = None, run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Start (or, with `run_id`, resume) an MLflow run that always ends with a true status:
    FINISHED, FAILED when the body raises, KILLED on Ctrl-C or SIGTERM (turned into
    KeyboardInterrupt here so `dvc` or a scheduler stopping the job is recorded too)."""
    try:
        previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        previous_handler = None
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
