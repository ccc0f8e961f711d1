"""A lab's MLflow run: its tags and params, per-epoch metrics, the logged Keras model, and
a lifecycle that always ends with a true status.

Metric names are stable and grouped: `train/loss`, `train/accuracy`, `val/loss`,
`val/accuracy`, and the overfitting gap `gap/accuracy` (train - val) and `gap/loss`
(val - train), as `dlilabs.core.fitting` computes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.entities import Metric, RunTag
from omegaconf import DictConfig, OmegaConf

from dlilabs.core.fitting import history_row, metric_name
from dlilabs.ground.io import once_per_file_state, sha256_file
from dlilabs.tracking.modellog import log_keras_model
from dlilabs.tracking.reconcile import HEARTBEAT, Heartbeat, now_ms, owner_tags
from dlilabs.tracking.slurm import received, slurm_tags, stopped_from_outside
from dlilabs.tracking.store import retry_if_locked

log = logging.getLogger("dlilabs.tracking")


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """Resolved config -> {"model.hidden_units": "[512, 512]", "trainer.epochs": "5", ...}.

    `paths` and the download `source` are machine-specific, so they go in the config artifact
    but not in params (params should compare across machines)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("paths", None)
    resolved.pop("published", None)  # the course's reference numbers (model cards), not settings
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
    # The config's own `tags` (profile=demo: data=mnist_5k) say what a run is.
    tags.update({key: str(value) for key, value in (cfg.get("tags") or {}).items()})
    tags.update(extra)
    return tags


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
        self._epoch_start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        # A stop signal whose KeyboardInterrupt Python swallowed (raised inside a weakref or
        # __del__ callback, "Exception ignored in ...") still stops the job, an epoch later.
        if received:
            raise KeyboardInterrupt(f"received signal {received[-1]}")
        self._epoch_start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        row = history_row(epoch + 1, logs or {})
        self.rows.append(row)
        timestamp = int(time.time() * 1000)
        self._pending.extend(
            Metric(metric_name(column), value, timestamp, epoch + 1)
            for column, value in row.items()
            if column != "epoch"
        )
        # The cost beside the accuracy (wall seconds, validation included); not in history.csv.
        seconds = time.monotonic() - self._epoch_start
        self._pending.append(Metric("time/epoch_seconds", seconds, timestamp, epoch + 1))
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
                # The owner's heartbeat goes along: a sign of life at least every epoch.
                beat = [RunTag(HEARTBEAT, str(now_ms()))]
                retry_if_locked(client.log_batch, run.info.run_id, metrics=batch, tags=beat)


def _interrupt(signum, frame):
    received.append(signum)  # see EpochLogger.on_epoch_begin and slurm.stopped_from_outside
    raise KeyboardInterrupt(f"received signal {signum}")


def _take_stop_signals() -> dict[int, object]:
    """Make the stop signals raise KeyboardInterrupt through `_interrupt`; returns {signal:
    the handler it replaced}, to put back ({} outside the main thread: signals left alone).

    SIGTERM always. SLURM's warning before a preemption or the time limit
    (--signal=USR2@...) where nothing else handles it: under submitit its own handler stays,
    which requeues the job, which then continues the run. Ctrl-C where Python's own handler
    is in place (a shell's background job starts with it ignored): it raises as before, and
    is recorded like the others."""
    wanted = {
        signal.SIGTERM: lambda handler: True,
        signal.SIGUSR2: lambda handler: handler in (signal.SIG_DFL, None),
        signal.SIGINT: lambda handler: handler is signal.default_int_handler,
    }
    replaced = {}
    try:
        for signum, replaceable in wanted.items():
            handler = signal.getsignal(signum)
            if replaceable(handler):
                signal.signal(signum, _interrupt)
                replaced[signum] = signal.SIG_DFL if handler is None else handler
    except ValueError:  # not the main thread
        return {}
    return replaced


def peak_memory_mb() -> float:
    """This process's peak resident memory so far, in MiB (getrusage: KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def system_metrics(tracking_cfg: DictConfig | None) -> bool | None:
    """Turn MLflow's system metrics (system/cpu_utilization_percentage, memory, GPU when
    nvidia-ml-py finds one) on or off per `tracking.system_metrics`, sampled every
    `tracking.system_metrics_interval` seconds. None (no config): MLflow's own default."""
    if tracking_cfg is None or tracking_cfg.get("system_metrics") is None:
        return None
    if tracking_cfg.system_metrics:
        mlflow.set_system_metrics_sampling_interval(tracking_cfg.get("system_metrics_interval", 10))
        # Its start/stop and "no GPU" notices are INFO lines that tell the user nothing.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    return bool(tracking_cfg.system_metrics)


@contextlib.contextmanager
def lab_run(
    run_name: str,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
    tracking_cfg: DictConfig | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or, with `run_id`, resume) an MLflow run that always ends with a true status:
    FINISHED, FAILED when the body raises, KILLED on Ctrl-C, SIGTERM or SIGUSR2 (turned into
    KeyboardInterrupt here so `dvc` or a scheduler stopping the job is recorded too; an
    error that a library made of that KeyboardInterrupt becomes one again).
    A `kill -9` cannot be caught: the run records its owner process and a heartbeat while
    it lasts, so that `reconcile` can end it later (KILLED at its last heartbeat).
    `tracking_cfg` turns system metrics on (`system_metrics`); every run ends with its
    process's peak memory, `memory/peak_mb`."""
    received.clear()
    replaced = _take_stop_signals()
    tags = {**(tags or {}), **owner_tags(), **slurm_tags()}  # a resumed run changes owner
    run = mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else run_name,
        tags=tags,
        log_system_metrics=system_metrics(tracking_cfg),
    )
    heartbeat = Heartbeat(run.info.run_id).start()
    status = "FINISHED"
    try:
        yield run
    except BaseException as error:  # KILLED: a signal, or submitit's exit to be requeued
        status = "KILLED" if stopped_from_outside(error) else "FAILED"
        if received and not isinstance(error, KeyboardInterrupt | SystemExit):
            # The signal's KeyboardInterrupt came back wrapped (a library's error around what
            # its callback raised): the job stops as for the signal itself.
            raise KeyboardInterrupt(f"received signal {received[-1]}") from error
        raise
    finally:
        if replaced:
            # A second stop signal (SLURM sends SIGTERM after its preemption warning) must not
            # cut this short: a run left open would be ended FINISHED by MLflow at exit.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        heartbeat.stop()
        with contextlib.suppress(Exception):  # the store may be what failed: keep the cause
            mlflow.log_metric("memory/peak_mb", peak_memory_mb())
        mlflow.end_run(status)
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


# The prepared splits' sha256, each file hashed once per process (a sweep's jobs share them).
split_sha256 = once_per_file_state(sha256_file)


def data_tags(train_file: Path, val_file: Path, train_rows: int, val_rows: int) -> dict:
    """Tags that pin the exact data: sha256 and row counts of the prepared splits."""
    return {
        "data.train.sha256": split_sha256(train_file),
        "data.val.sha256": split_sha256(val_file),
        "data.train.rows": str(train_rows),
        "data.val.rows": str(val_rows),
    }


def log_config(cfg: DictConfig) -> None:
    """The flattened config as params, the resolved one as `config.yaml`, on the active run."""
    mlflow.log_params(flatten_config(cfg))
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def log_metrics(metrics: dict[str, float]) -> None:
    """Log summary metrics (no step) to the active run."""
    mlflow.log_metrics(metrics)


def finish_run(
    cfg: DictConfig,
    run,
    experiment_id: str,
    model: keras.Model,
    sample: np.ndarray,
    rows: list[dict],
    metrics: dict,
    **extra,
) -> tuple[dict, Path]:
    """Inside the lab's run: log and register the model (signature from `sample` inputs),
    write the DVC outputs (model.keras, history.csv, run.json) and log the history.
    Returns (run.json's content, model folder)."""
    from dlilabs.core.fitting import save_outputs
    from dlilabs.tracking.artifacts import whole_model_or_none
    from dlilabs.tracking.cards import write_card
    from dlilabs.tracking.sweep import job_output_dir

    registered = cfg.tracking.model_name if cfg.tracking.register_models else None
    classes = cfg.dataset.get("class_names")  # image labs: served with their class names
    with tempfile.TemporaryDirectory(prefix="dlilabs-model-") as folder:
        # Serialized once: the logged model holds a copy of the very file models/ gets.
        saved = Path(folder) / "model.keras"
        model.save(saved)
        with whole_model_or_none():  # a full disk leaves no half-copied model in the store
            model_info = log_keras_model(
                model, sample, registered, classes and list(map(str, classes)), saved=saved
            )
        if classes:  # the model card says which input this version takes
            from dlilabs.tracking.serving import INPUT_DESCRIPTION, INPUT_TAG

            mlflow.set_tag(INPUT_TAG, INPUT_DESCRIPTION)
        version = getattr(model_info, "registered_model_version", None)
        if version:  # every registered version gets its model card
            write_card(mlflow.MlflowClient(), cfg, run.info.run_id, registered, version)
        run_info = {
            "lab": cfg.lab,
            "run_id": run.info.run_id,
            "experiment_id": experiment_id,
            "model_uri": model_info.model_uri,
            "registered_model": registered,
            "registered_version": version,
            "epochs": len(rows),
            **extra,
            **metrics,
        }
        model_dir = job_output_dir(cfg.paths.model_dir)
        save_outputs(model_dir, saved, rows, run_info)
    mlflow.log_artifact(str(model_dir / "history.csv"))
    return run_info, model_dir
