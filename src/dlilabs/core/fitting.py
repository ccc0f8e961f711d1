"""What every trainer shares: seeding, optimizers by name, the fit loop and its history.

Core layer (Keras and arrays, no MLflow): the train stage and the line-fit lab both build on
it, and hand `fit` whatever extra callbacks they need (the MLflow epoch logger, say).

History rows use `_`-joined names (`train_accuracy`), which DVC's plot templates read more
easily; `metric_name` turns them into the grouped MLflow names (`train/accuracy`). The gap
is `gap_accuracy` = train - val and `gap_loss` = val - train: positive means overfitting.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import keras
import pandas as pd

from dlilabs.core import checkpoint
from dlilabs.core.checkpoint import EpochCheckpoint, Plan
from dlilabs.ground.errors import UserError
from dlilabs.ground.io import atomic_path, write_json

log = logging.getLogger("dlilabs.fitting")

HISTORY_COLUMNS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "gap_loss",
    "gap_accuracy",
)
from dlilabs.ground.schemas import OPTIMIZERS  # noqa: E402 (one list, shared with the config checks)


def make_optimizer(optimizer: str, learning_rate: float | None) -> keras.optimizers.Optimizer:
    """A Keras optimizer by name; `learning_rate=None` keeps Keras' default (RMSprop: 1e-3)."""
    config = {} if learning_rate is None else {"learning_rate": learning_rate}
    try:
        return keras.optimizers.get({"class_name": optimizer, "config": config})
    except ValueError as error:
        raise UserError(
            f"trainer.optimizer={optimizer!r} is not a Keras optimizer: use one of "
            f"{', '.join(OPTIMIZERS)}"
        ) from error


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and TensorFlow; optionally make TF ops deterministic."""
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


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


class EpochHistory(keras.callbacks.Callback):
    """Collects one `history_row` per finished epoch in `rows` (kept if training stops)."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict[str, float]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append(history_row(epoch + 1, logs or {}))


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


class NewModelRetracing(logging.Filter):
    """Drops TensorFlow's "N out of the last M calls to <function ...> triggered tf.function
    retracing" warning: in a sweep run in one process every job builds a new model, whose
    training step is traced once, as it must be; from the fifth job on, TensorFlow would
    print that advice to the user twice per job."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


class EpochProgress(keras.callbacks.ProgbarLogger):
    """Keras' progress bar (or one line per epoch), numbered out of all `total` epochs while
    `fit` is called once per epoch (Keras alone would print "Epoch 3/3", then "Epoch 4/4")."""

    def __init__(self, total: int):
        super().__init__()
        self.total = total

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total


def fit(
    model: keras.Model,
    train_data,
    val_data,
    epochs: int,
    monitor: str,
    callbacks: list | None = None,
    augmenter: keras.Sequential | None = None,
    checkpoint: Plan | None = None,
) -> tuple[list[dict[str, float]], int]:
    """Fit a compiled model on tf.data batches, with `callbacks` (e.g. an MLflow logger);
    leave the best epoch's weights in `model`. Returns (history rows, best epoch, 1-based).

    `train_data`: a tf.data dataset, one epoch per iteration; or a function epoch (0-based)
    -> that epoch's batches (`data.make_dataset(epochs=range(e, e + 1))`), called once per
    epoch, so that each epoch's batches depend on the seed and the epoch alone.
    `augmenter` (dlilabs.core.data.build_augmenter) runs inside the training step, on the
    model's device (a GPU's, see data.augment_in_model), in front of the model; `model`
    itself, the one to save, stays without it. None when the input pipeline augments, or
    nothing does.
    `checkpoint` (dlilabs.core.checkpoint.Plan; needs `train_data` by epoch): write an epoch
    checkpoint after every epoch and, if the plan has one to resume, start after its epoch
    with its variables, history and best epoch."""
    tensorflow_logger = logging.getLogger("tensorflow")
    if not any(isinstance(each, NewModelRetracing) for each in tensorflow_logger.filters):
        tensorflow_logger.addFilter(NewModelRetracing())
    history = EpochHistory()
    best = KeepBestWeights(monitor)
    # One line per epoch when logs go to a file (DVC, SLURM); a live bar in a terminal.
    verbose = 1 if sys.stdout.isatty() else 2
    trained = model
    if augmenter is not None:
        from dlilabs.core.data import with_augmenter

        trained = with_augmenter(model, augmenter)
    extra = []
    if checkpoint is not None:
        resume_from(checkpoint, trained, history, best)
        extra.append(
            EpochCheckpoint(
                checkpoint.folder, best, history.rows, checkpoint.augmenter, checkpoint.extra
            )
        )
    # The checkpoint goes before `callbacks` (the MLflow logger): a stop between the two then
    # leaves an epoch checkpointed but not logged, which the resumed run logs from the
    # checkpoint, never an epoch logged but not checkpointed, which it would train and log
    # again (seen on SLURM: epoch 3 logged twice after a scancel).
    every = [history, best, *extra, *(callbacks or []), EpochProgress(epochs)]
    # shuffle=False: the tf.data pipeline already shuffles every epoch.
    if callable(train_data):
        # One fit call per epoch, each on that epoch's own batches. (Keras' steps_per_epoch
        # over one long stream would run whole steps_per_execution chunks, past the epoch.)
        for epoch in range(checkpoint.first_epoch if checkpoint else 0, epochs):
            trained.fit(
                train_data(epoch),
                validation_data=val_data,
                initial_epoch=epoch,
                epochs=epoch + 1,
                shuffle=False,
                callbacks=every,
                verbose=verbose,
            )
            if trained.stop_training:  # a pruned trial
                break
    else:
        trained.fit(
            train_data,
            validation_data=val_data,
            epochs=epochs,
            shuffle=False,
            callbacks=every,
            verbose=verbose,
        )
    best.restore()  # the wrapper shares the model's layers: this restores the model's weights
    if trained is not model:  # save the model with the optimizer that trained it
        model.optimizer = trained.optimizer
    return history.rows, best.best_epoch or len(history.rows)


def resume_from(plan: Plan, trained: keras.Model, history: EpochHistory, best) -> None:
    """Load `plan`'s checkpoint, if any, into the compiled model being trained, the history
    rows and the best-epoch tracker (a KeepBestWeights)."""
    resumed = plan.resumed
    if resumed is None:
        return
    checkpoint.restore(resumed, trained, plan.augmenter)
    best.set_model(trained)  # restored after fit even when no epoch is left to train
    history.rows.extend(resumed.rows)
    best.best_value, best.best_epoch = resumed.best_value, resumed.best_epoch
    best.best_weights = checkpoint.best_weights(resumed)
    log.info("Resuming from the checkpoint of epoch %d in %s", resumed.epoch, resumed.folder)


def summary_metrics(rows: list[dict[str, float]], best_epoch: int) -> dict[str, float]:
    """One number per name, each saying what it is, from the history rows and the saved
    model's epoch (1-based; 0 = the last):

        best_epoch                 the epoch whose weights were saved (by trainer.monitor)
        best/{train,val}/accuracy  the highest over all epochs
        best/{train,val}/loss      the lowest over all epochs
        best_epoch/<column>        every history column at best_epoch (what the saved model
                                   scored: best_epoch/val/loss, best_epoch/gap/accuracy, ...)
        final/<column>             every history column at the last epoch

    With the default monitor (val_accuracy), best/val/accuracy = best_epoch/val/accuracy."""
    summary: dict[str, float] = {"best_epoch": float(best_epoch)}
    if not rows:
        return summary
    best_row = rows[best_epoch - 1] if best_epoch else rows[-1]
    for column in HISTORY_COLUMNS:
        if column not in rows[-1]:
            continue
        summary[f"final/{metric_name(column)}"] = rows[-1][column]
        summary[f"best_epoch/{metric_name(column)}"] = best_row[column]
        if not column.startswith("gap_"):  # a gap has no "best": smaller is not better
            pick = max if column.endswith("accuracy") else min
            summary[f"best/{metric_name(column)}"] = pick(row[column] for row in rows)
    return summary


def save_outputs(model_dir: Path, model_file: Path, rows: list[dict], run_info: dict) -> None:
    """Move `model_file` (the model saved once, e.g. for MLflow too) to `model_dir`/model.keras,
    write history.csv, then run.json (last: its presence means the outputs are complete)."""
    with atomic_path(model_dir / "model.keras") as temporary:
        shutil.move(model_file, temporary)  # a rename, or a copy across filesystems
    with atomic_path(model_dir / "history.csv") as temporary:
        pd.DataFrame(rows).to_csv(temporary, index=False)
    write_json(model_dir / "run.json", run_info)
