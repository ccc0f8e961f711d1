"""The warm-up lab: fit y = m*x + b to ten points with a one-unit Keras model, and compare
with the closed-form least-squares fit, whose MSE is the floor any optimizer can reach."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from dlilabs import tracking
from dlilabs.core.fitting import make_optimizer, seed_everything
from dlilabs.ground.io import write_json

log = logging.getLogger("dlilabs.linefit")


def least_squares(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Closed-form fit of y = m*x + b to points x (n,), y (n,): slope, intercept and its MSE."""
    slope, intercept = np.polyfit(x, y, deg=1)
    mse = float(np.mean((slope * x + intercept - y) ** 2))
    return {"slope": float(slope), "intercept": float(intercept), "mse": mse}


def fit_line(x: np.ndarray, y: np.ndarray, trainer: DictConfig):
    """Fit the one-unit model to x (n,), y (n,) with the trainer's optimizer inside an active
    MLflow run. Returns (model, history rows, {"slope", "intercept", "mse"})."""
    import tensorflow as tf

    from dlilabs.core.models import build_linear

    model = build_linear()
    model.compile(
        optimizer=make_optimizer(trainer.optimizer, trainer.learning_rate), loss=trainer.loss
    )
    epoch_logger = tracking.EpochLogger()
    inputs = x.reshape(-1, 1).astype(np.float32)
    # A repeated dataset with a fixed number of steps lets Keras keep one iterator for all
    # epochs; a fresh iterator per epoch costs more than the 10-point epoch itself.
    points = tf.data.Dataset.from_tensor_slices((inputs, y.astype(np.float32)))
    batches = points.batch(trainer.batch_size).repeat()
    steps = -(-len(x) // trainer.batch_size)
    try:
        model.fit(
            batches,
            epochs=trainer.epochs,
            steps_per_epoch=steps,
            shuffle=False,
            verbose=0,
            callbacks=[epoch_logger],
        )
    finally:
        epoch_logger.flush()
    weights, bias = model.layers[-1].get_weights()
    predictions = np.asarray(model(inputs, training=False)).ravel()  # no predict(): no tf.data
    fitted = {
        "slope": float(weights.ravel()[0]),
        "intercept": float(bias[0]),
        "mse": float(np.mean((predictions - y) ** 2)),
    }
    return model, epoch_logger.rows, fitted


def fit_line_lab(cfg: DictConfig) -> dict:
    """Run the line-fit lab as one MLflow run; write models/line_fit/* and eval/line_fit/."""
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    x = np.asarray(cfg.dataset.x, dtype=np.float64)
    y = np.asarray(cfg.dataset.y, dtype=np.float64)
    floor = least_squares(x, y)
    experiment_id = tracking.connect(cfg.tracking)
    extra = {"device": "cpu", "task": "regression", **tracking.lineage_tags(cfg)}
    tags = tracking.run_tags(cfg, "line_fit", extra)
    sweep_tags, run_name = tracking.child_tags_and_name(cfg.lab, tracking.job_overrides())
    with tracking.lab_run(run_name, {**tags, **sweep_tags}, tracking_cfg=cfg.tracking) as run:
        tracking.log_config(cfg)
        model, rows, fitted = fit_line(x, y, cfg.trainer)
        metrics = {
            "fit/mse": fitted["mse"],
            "fit/slope": fitted["slope"],
            "fit/intercept": fitted["intercept"],
            "floor/mse": floor["mse"],
            "floor/slope": floor["slope"],
            "floor/intercept": floor["intercept"],
            # How far the optimizer stopped above the best any line can do.
            "gap/mse": fitted["mse"] - floor["mse"],
        }
        tracking.log_metrics(metrics)
        sample = x[:3].reshape(-1, 1).astype(np.float32)
        run_info, model_dir = tracking.finish_run(
            cfg, run, experiment_id, model, sample, rows, metrics
        )
        eval_dir = model_dir if tracking.in_sweep() else Path(cfg.paths.eval_dir)
        write_json(eval_dir / "metrics.json", metrics)
    log.info(
        "line_fit (%s): y = %.4f x + %.4f, MSE %.3f; least squares y = %.4f x + %.4f, MSE %.3f",
        cfg.trainer.optimizer,
        fitted["slope"],
        fitted["intercept"],
        fitted["mse"],
        floor["slope"],
        floor["intercept"],
        floor["mse"],
    )
    return run_info
