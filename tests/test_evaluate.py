"""The evaluate stage: metrics.json and confusion.csv for DVC, the same metrics in MLflow."""

import json

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from dlilabs.config import compose
from dlilabs.errors import UserError
from dlilabs.evaluate import class_report
from dlilabs.evaluate import run as evaluate_run
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
    # The saved model is the best epoch: its val accuracy is the history's best.
    assert written["val"]["accuracy"] == pytest.approx(summary["best/val/accuracy"], abs=1e-6)
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
