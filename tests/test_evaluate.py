"""The evaluate stage: metrics.json and confusion.csv for DVC, the same metrics in MLflow."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import write_prepared
from dlilabs.evaluate import class_report, score
from dlilabs.evaluate import run as evaluate_run
from dlilabs.ground.config import compose
from dlilabs.ground.errors import UserError
from dlilabs.train import run as train_run

TINY = ["experiment=mnist_mlp", "model.hidden_units=[32]", "trainer.epochs=2"]


def test_class_report_counts_rows_as_actual_classes():
    labels = np.array([0, 0, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0])
    matrix, per_class = class_report(labels, predictions, ["a", "b", "c", "d"])
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert per_class == {"a": 0.5, "b": 1.0, "c": 0.0, "d": 0.0}


def test_evaluate_writes_dvc_outputs_and_logs_to_the_train_run(project, tiny_mnist):
    summary = train_run(compose(TINY))
    metrics = evaluate_run(compose(TINY))

    eval_dir = project / "eval" / "mnist_mlp"
    written = json.loads((eval_dir / "metrics.json").read_text())
    assert written["val"]["accuracy"] == pytest.approx(metrics["val"]["accuracy"])
    assert written["gap"]["accuracy"] == pytest.approx(
        written["train"]["accuracy"] - written["val"]["accuracy"]
    )
    per_class = pd.read_csv(eval_dir / "class_accuracy.csv", dtype={"class": str})
    assert list(per_class["class"]) == [str(d) for d in range(10)]
    assert per_class.accuracy.between(0, 1).all()
    # The saved model is the best epoch: its val accuracy is the history's best, and its val
    # loss the one Keras reported for that epoch (the same computation, not a clipped copy).
    assert written["val"]["accuracy"] == pytest.approx(summary["best/val/accuracy"], abs=1e-6)
    history = pd.read_csv(project / "models" / "mnist_mlp" / "history.csv")
    at_best = history.set_index("epoch").loc[summary["best_epoch"]]
    assert written["val"]["loss"] == pytest.approx(at_best["val_loss"], rel=1e-5)
    confusion = pd.read_csv(eval_dir / "confusion.csv", dtype=str)
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 80
    assert (confusion.actual == confusion.predicted).mean() == pytest.approx(
        written["val"]["accuracy"]
    )

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/val_accuracy"] == pytest.approx(written["val"]["accuracy"])
    assert run.data.metrics["eval/gap_accuracy"] == pytest.approx(written["gap"]["accuracy"])
    assert "eval/class_accuracy/7" in run.data.metrics
    paths = {item.path for item in client.list_artifacts(run.info.run_id, "evaluation")}
    assert paths == {
        "evaluation/confusion_matrix.json",
        "evaluation/metrics.json",
        "evaluation/class_accuracy.csv",
    }


def test_evaluate_without_a_model_says_to_train_first(project, tiny_mnist):
    with pytest.raises(UserError, match=r"train@mnist_mlp"):
        evaluate_run(compose(TINY))


def test_loss_is_keras_own_even_for_confident_mistakes():
    """A model sure of the wrong class (softmax of logits [60, 0]): Keras' cross-entropy, from
    the logits, is 60 per image; from probabilities clipped at 1e-7 it would be 16.1."""
    model = keras.Sequential(
        [keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")]
    )
    kernel, _ = model.layers[-1].get_weights()
    model.layers[-1].set_weights([np.zeros_like(kernel), np.array([60.0, 0.0], np.float32)])
    images, labels = np.zeros((8, 28, 28), np.uint8), np.ones(8, np.int64)
    loss, accuracy, predictions = score(model, images, labels, num_classes=2)
    assert loss == pytest.approx(60.0, rel=1e-4)
    assert accuracy == 0.0 and predictions.tolist() == [0] * 8


@pytest.mark.parametrize("mismatch", ["classes", "shape"])
def test_dataset_that_does_not_fit_the_model_is_a_clear_error(project, tiny_mnist, mismatch):
    train_run(compose(TINY))
    if mismatch == "classes":  # the MNIST model (10 classes) on Sign Language data (24)
        write_prepared(project / "data" / "prepared" / "asl", 48, 24, 24)
        overrides, expected = ["dataset=asl"], "with 24 classes"
    else:  # images of another size in place of the prepared MNIST splits
        for split in ("train", "val"):
            np.savez(tiny_mnist / f"{split}.npz", x=np.zeros((4, 14, 14), np.uint8), y=np.arange(4))
        overrides, expected = [], "images of shape (14, 14)"
    with pytest.raises(UserError) as caught:
        evaluate_run(compose(TINY + overrides))
    message = str(caught.value)
    assert "model.keras" in message and "takes images of shape (28, 28)" in message
    assert "predicts 10 classes" in message and expected in message
    assert "dataset it was trained on" in message


def test_a_failing_evaluate_records_its_outcome_and_leaves_the_train_run_finished(
    project, tiny_mnist
):
    summary = train_run(compose(TINY))
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    before = client.get_run(summary["run_id"]).info
    blocked = project / "eval" / "mnist_mlp"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where evaluate's output folder should be")

    with pytest.raises(OSError):
        evaluate_run(compose(TINY))
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.info.end_time == before.end_time
    assert run.data.tags["eval.status"] == "failed"
    assert "mnist_mlp" in run.data.tags["eval.error"]

    blocked.unlink()  # fixed: the next evaluate succeeds and says so
    evaluate_run(compose(TINY))
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["eval.status"] == "finished"
    assert "eval.error" not in run.data.tags


def test_a_model_saved_before_raw_pixels_is_not_mis_scored(project, tiny_mnist):
    # model.keras from before the models scaled their own input: the pipeline's raw pixels
    # would reach it unscaled. Evaluate says to retrain instead of scoring it wrong.
    train_run(compose(TINY))
    model_file = project / "models" / "mnist_mlp" / "model.keras"
    model = keras.saving.load_model(model_file)
    keras.Sequential([keras.Input((28, 28)), *model.layers[1:]]).save(model_file)
    with pytest.raises(UserError, match=r"saved before .* retrain it \(`dvc repro train@"):
        evaluate_run(compose(TINY))
