"""fitting: the run's summary numbers mean what their names say; a stop never leaves the
checkpoint behind what was logged."""

import logging

import keras
import pytest

from conftest import tiny_classifier
from dlilabs.core.checkpoint import Plan, load
from dlilabs.core.fitting import fit, history_row, summary_metrics


def rows() -> list[dict[str, float]]:
    """Three epochs where the best validation accuracy (epoch 2) is not the lowest val loss
    (epoch 3) nor the last epoch's accuracy."""
    logs = [
        {"loss": 0.9, "accuracy": 0.70, "val_loss": 0.50, "val_accuracy": 0.80},
        {"loss": 0.5, "accuracy": 0.85, "val_loss": 0.45, "val_accuracy": 0.90},
        {"loss": 0.3, "accuracy": 0.95, "val_loss": 0.40, "val_accuracy": 0.88},
    ]
    return [history_row(epoch, entry) for epoch, entry in enumerate(logs, 1)]


def test_best_is_the_best_over_epochs_and_best_epoch_is_the_saved_model():
    summary = summary_metrics(rows(), best_epoch=2)
    assert summary["best_epoch"] == 2
    # best/: the best value over all epochs, whichever epoch it came from.
    assert summary["best/val/accuracy"] == 0.90
    assert summary["best/val/loss"] == 0.40  # lowest, epoch 3
    assert summary["best/train/accuracy"] == 0.95
    assert summary["best/train/loss"] == 0.3
    # best_epoch/: the saved model's epoch, every column.
    assert summary["best_epoch/val/loss"] == 0.45
    assert summary["best_epoch/gap/accuracy"] == pytest.approx(0.85 - 0.90)
    # final/: the last epoch.
    assert summary["final/val/accuracy"] == 0.88
    assert summary["final/gap/loss"] == pytest.approx(0.40 - 0.3)
    assert not any(name.startswith("best/gap") for name in summary)  # no "best" gap


def test_no_epochs():
    assert summary_metrics([], best_epoch=0) == {"best_epoch": 0.0}


class StopAtEpochTwo(keras.callbacks.Callback):
    """A stop that lands in the lab's own callbacks (the MLflow logger's place)."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("stopped at the end of epoch 2")


def test_an_epoch_the_lab_callbacks_saw_is_already_checkpointed(tmp_path):
    # The logger logs what its epoch_end sees: a stop right after it must not leave the
    # checkpoint an epoch behind, or the resumed run would train and log that epoch again.
    model, batches = tiny_classifier()
    plan = Plan(tmp_path / "checkpoint")
    with pytest.raises(KeyboardInterrupt):
        stop = [StopAtEpochTwo()]
        fit(model, lambda epoch: batches, batches, 4, "val_accuracy", stop, checkpoint=plan)
    assert load(plan.folder).epoch == 2


def test_progress_counts_every_epoch_out_of_all_of_them(capsys):
    model, batches = tiny_classifier()
    fit(model, lambda epoch: batches, batches, 3, "val_accuracy")
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch")]
    assert shown == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]


def test_a_sweep_of_new_models_in_one_process_prints_no_retracing_advice(caplog):
    # Each job of an in-process sweep builds a new model, whose step is traced once; from
    # the fifth on TensorFlow would warn about "retracing" (seen in a 7-job sweep's output).
    with caplog.at_level(logging.WARNING):
        for _ in range(7):
            model, batches = tiny_classifier()
            fit(model, batches, batches, 1, "val_accuracy")
    assert not [record for record in caplog.records if "retracing" in record.getMessage()]
