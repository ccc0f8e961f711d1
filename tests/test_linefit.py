"""The line-fit warm-up: the closed-form floor and an optimizer run against it."""

import json

import pytest
from mlflow import MlflowClient

from dlilabs.ground.config import compose
from dlilabs.linefit import least_squares
from dlilabs.train import run as train_run


def test_least_squares_matches_the_published_floor():
    cfg = compose(["experiment=line_fit"])
    import numpy as np

    floor = least_squares(np.asarray(cfg.dataset.x, float), np.asarray(cfg.dataset.y, float))
    assert floor["slope"] == pytest.approx(5.1212, abs=1e-4)
    assert floor["intercept"] == pytest.approx(14.4545, abs=1e-4)
    assert floor["mse"] == pytest.approx(14.879, abs=1e-3)


def test_sgd_gets_close_to_the_floor_and_logs_the_distance(project):
    summary = train_run(compose(["experiment=line_fit"]))

    assert 0 <= summary["gap/mse"] < 1.0  # SGD at 0.01 for 500 epochs: near, never below
    metrics = json.loads((project / "eval" / "line_fit" / "metrics.json").read_text())
    assert metrics["floor/mse"] == pytest.approx(14.879, abs=1e-3)
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["lab"] == "line_fit"
    assert run.data.metrics["gap/mse"] == pytest.approx(summary["gap/mse"])
    history = client.get_metric_history(summary["run_id"], "train/loss")
    assert len(history) == 500 and history[-1].value < history[0].value
