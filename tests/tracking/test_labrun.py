"""A lab's MLflow run ends with a true status, even when Python swallows the stop signal."""

from __future__ import annotations

import os
import signal
import weakref

import keras
import mlflow
import pytest

from conftest import tiny_classifier
from dlilabs.core.fitting import fit
from dlilabs.ground.config import compose
from dlilabs.tracking.labrun import EpochLogger, lab_run
from dlilabs.tracking.store import connect


class StopSignalInsideAWeakrefCallback(keras.callbacks.Callback):
    """At the end of the first epoch, SIGTERM arrives while Python runs a weakref callback:
    the KeyboardInterrupt the handler raises there is printed as "Exception ignored" and
    dropped (seen in CI: the job then trained to its end and exited 0)."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch != 0:
            return

        class Gone:
            pass

        def deliver(_reference):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs at the next bytecode: here, inside the callback

        target = Gone()
        reference = weakref.ref(target, deliver)
        del target
        assert reference() is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # what is swallowed
def test_a_swallowed_stop_signal_still_stops_the_run_at_the_next_epoch(project):
    connect(compose().tracking)
    model, batches = tiny_classifier()
    logger = EpochLogger()
    with pytest.raises(KeyboardInterrupt), lab_run("stopped", {"lab": "tiny"}) as run:
        callbacks = [StopSignalInsideAWeakrefCallback(), logger]
        fit(model, lambda epoch: batches, batches, 5, "val_accuracy", callbacks)
    client = mlflow.MlflowClient()
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    history = client.get_metric_history(run.info.run_id, "train/accuracy")
    assert [point.step for point in history] == [1]  # epoch 2 never started
