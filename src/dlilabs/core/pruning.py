"""Early stopping of hopeless hyperparameter-search trials (pruning), as a Keras callback.

Core layer (Keras, no MLflow, no Optuna import): `TrialPruning` takes any trial object with
Optuna's `report(value, step)` and `should_prune()` (an `optuna.trial.Trial`, reopened in the
job by `dlilabs.tracking.trial`). After each epoch it reports one history column (e.g.
`val_accuracy`) at step = the epoch (1-based) and, when the trial's pruner says so, stops
training after that epoch: the run keeps its partial curves and the best epoch's weights.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from dlilabs.core.fitting import history_row


class TrialPruning(keras.callbacks.Callback):
    """Report `monitor` (a history column: val_accuracy, val_loss, gap_accuracy, ...) to
    `trial` every epoch; stop training when `trial.should_prune()`.

    `pruned_at` is the epoch (1-based) training stopped after, None while not pruned;
    `on_prune(epoch, value)` is called once when it happens (to record it elsewhere)."""

    def __init__(
        self,
        trial,
        monitor: str = "val_accuracy",
        on_prune: Callable[[int, float], None] | None = None,
    ):
        super().__init__()
        self.trial = trial
        self.monitor = monitor
        self.on_prune = on_prune
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        row = history_row(epoch + 1, logs or {})
        if self.monitor not in row:
            known = ", ".join(column for column in row if column != "epoch")
            raise ValueError(f"pruning monitors {self.monitor!r}, not logged (logged: {known})")
        value = row[self.monitor]
        self.trial.report(value, epoch + 1)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = epoch + 1
            self.model.stop_training = True
            if self.on_prune is not None:
                self.on_prune(epoch + 1, value)
