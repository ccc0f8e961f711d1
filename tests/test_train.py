"""The train stage on tiny synthetic data: what lands in MLflow and in the DVC outputs."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import stage_env, write_prepared
from dlilabs.core import fitting
from dlilabs.ground.config import compose
from dlilabs.train import run as train_run

TINY = ["experiment=mnist_mlp", "model.hidden_units=[32]", "trainer.epochs=3"]


def runs_of(project, experiment="dlilabs"):
    """All runs of `experiment` in the project's store, oldest first."""
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def test_train_logs_a_complete_mlflow_run(project, tiny_mnist):
    summary = train_run(compose(TINY))

    client, runs = runs_of(project)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "mnist_mlp"
    assert run.info.run_id == summary["run_id"]
    # Per-epoch metrics under stable grouped names, with the overfitting gap.
    gap = client.get_metric_history(run.info.run_id, "gap/accuracy")
    train_acc = client.get_metric_history(run.info.run_id, "train/accuracy")
    val_acc = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in gap] == [1, 2, 3]
    for g, t, v in zip(gap, train_acc, val_acc, strict=True):
        assert g.value == pytest.approx(t.value - v.value)
    assert {
        "val/loss",
        "train/loss",
        "gap/loss",
        "best/val/accuracy",
        "final/val/accuracy",
        "best_epoch",
    } <= set(run.data.metrics)
    # Params: the resolved config, flattened; no machine-specific paths.
    assert run.data.params["trainer.epochs"] == "3"
    assert run.data.params["model.hidden_units"] == "[32]"
    assert run.data.params["trainer.optimizer"] == "rmsprop"
    assert not any(key.startswith("paths.") for key in run.data.params)
    tags = run.data.tags
    assert tags["lab"] == "mnist_mlp" and tags["device"] == "cpu"
    assert tags["dvc.stage"] == "train@mnist_mlp"
    assert tags["data.train.rows"] == "320" and len(tags["data.train.sha256"]) == 64
    assert tags["keras.version"].startswith("3.")
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "history.csv"} <= artifacts
    # DVC outputs: the model, the history, and run.json pointing at the run.
    model_dir = project / "models" / "mnist_mlp"
    history = pd.read_csv(model_dir / "history.csv")
    assert list(history.epoch) == [1, 2, 3]
    assert {"train_accuracy", "val_accuracy", "gap_accuracy"} <= set(history.columns)
    run_info = json.loads((model_dir / "run.json").read_text())
    assert run_info["run_id"] == run.info.run_id and run_info["device"]["device"] == "cpu"
    assert history.val_accuracy.max() == pytest.approx(run.data.metrics["best/val/accuracy"])


def test_logged_model_is_registered_and_predicts_probabilities(project, tiny_mnist):
    summary = train_run(compose(TINY))

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    versions = client.search_model_versions("name='mnist_mlp'")
    assert [int(v.version) for v in versions] == [1]
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    for uri in (summary["model_uri"], "models:/mnist_mlp/1"):
        model = mlflow.pyfunc.load_model(uri)
        images = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32) * 255  # raw
        predictions = model.predict(images)  # class, probability, then one column per digit
        probabilities = predictions[[str(digit) for digit in range(10)]].to_numpy()
        assert probabilities.shape == (4, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
        assert list(predictions["class"]) == [str(i) for i in probabilities.argmax(axis=1)]
    signature = model.metadata.signature
    assert signature is not None
    assert list(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 28, 28]
    assert model.metadata.saved_input_example_info is not None
    # The requirements `mlflow models serve` installs: listed, not inferred, and pinned.
    requirements = Path(mlflow.pyfunc.get_model_dependencies(summary["model_uri"])).read_text()
    pinned = {line.split("==")[0] for line in requirements.split() if "==" in line}
    assert {"mlflow", "tensorflow", "keras"} <= pinned
    # The model is serialized once: the logged model holds the very file DVC tracks.
    logged = Path(mlflow.artifacts.download_artifacts(summary["model_uri"], dst_path=project / "x"))
    output = project / "models" / "mnist_mlp" / "model.keras"
    assert (logged / "artifacts" / "model.keras").read_bytes() == output.read_bytes()


def test_saved_model_holds_the_best_epoch_weights(project, tiny_mnist):
    train_run(compose([*TINY, "trainer.epochs=4"]))
    model_dir = project / "models" / "mnist_mlp"
    history = pd.read_csv(model_dir / "history.csv")
    run_info = json.loads((model_dir / "run.json").read_text())
    best = int(history.val_accuracy.idxmax()) + 1
    assert run_info["best_epoch"] == best

    import keras

    from dlilabs.core.data import load_split

    model = keras.saving.load_model(model_dir / "model.keras")
    images, labels = load_split(tiny_mnist / "val.npz")
    accuracy = np.mean(model.predict(images, verbose=0).argmax(1) == labels)  # raw pixels
    assert accuracy == pytest.approx(history.val_accuracy[best - 1], abs=1e-6)


def test_same_seed_gives_identical_metrics(project, tiny_mnist):
    first = train_run(compose([*TINY, "trainer.epochs=2", "tracking.register_models=false"]))
    second = train_run(compose([*TINY, "trainer.epochs=2", "tracking.register_models=false"]))
    other = train_run(
        compose([*TINY, "trainer.epochs=2", "tracking.register_models=false", "trainer.seed=7"])
    )
    keys = ["final/train/loss", "final/val/loss", "final/val/accuracy"]
    assert [first[k] for k in keys] == [second[k] for k in keys]
    assert first["final/train/loss"] != other["final/train/loss"]


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")]
)
def test_stopped_training_ends_the_run_with_epochs_logged_and_no_model(
    project, tiny_mnist, monkeypatch, error, status
):
    # The stop comes after epoch 2 has been logged (the progress line is the last callback).
    original = fitting.EpochProgress.on_epoch_end

    def stop_after_second_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 1:
            raise error("stopped by the test")

    monkeypatch.setattr(fitting.EpochProgress, "on_epoch_end", stop_after_second_epoch)
    with pytest.raises(error):
        train_run(compose(TINY))

    client, runs = runs_of(project)
    assert runs[0].info.status == status
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "gap/accuracy")] == [
        1,
        2,
    ]
    assert not (project / "models" / "mnist_mlp").exists()


@pytest.mark.slow
def test_sigterm_marks_the_run_killed(project):
    write_prepared(project / "data" / "prepared" / "mnist", 3000, 100, 10)
    command = [sys.executable, "-m", "dlilabs.train", *TINY, "trainer.epochs=200"]
    process = subprocess.Popen(
        command, env=stage_env(project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    database = project / "mlflow.db"
    deadline = time.monotonic() + 120
    logged = 0
    while time.monotonic() < deadline and logged == 0:  # wait for the first epoch's metrics
        time.sleep(0.5)
        if database.exists():
            try:
                with sqlite3.connect(database) as connection:
                    logged = connection.execute(
                        "select count(*) from metrics where key='gap/accuracy'"
                    ).fetchone()[0]
            except sqlite3.OperationalError:
                pass  # schema not created yet
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)

    assert logged, output
    assert process.returncode == 130, output
    assert "Traceback" not in output
    client, runs = runs_of(project)
    assert runs[0].info.status == "KILLED"
    assert client.get_metric_history(runs[0].info.run_id, "gap/accuracy")
    assert not (project / "models" / "mnist_mlp" / "model.keras").exists()
