"""train stage: `python -m dlilabs.train experiment=<lab>` trains one lab as one MLflow run.

Outputs (DVC outs) in `paths.model_dir`: `model.keras` (the best epoch by
`trainer.monitor`), `history.csv` (one row per epoch) and `run.json` (the MLflow run id the
evaluate stage logs to). The run gets the flattened config as params, per-epoch metrics,
best/final summaries, the resolved config, the history and the model (registered as the lab).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from dlilabs import tracking
from dlilabs.config import stage_main
from dlilabs.errors import UserError
from dlilabs.io import atomic_path, sha256_file, write_json
from dlilabs.sweep import child_tags_and_name, job_output_dir, job_overrides

log = logging.getLogger("dlilabs.train")


def make_optimizer(optimizer: str, learning_rate: float | None) -> keras.optimizers.Optimizer:
    """A Keras optimizer by name; `learning_rate=None` keeps Keras' default (RMSprop: 1e-3)."""
    config = {} if learning_rate is None else {"learning_rate": learning_rate}
    try:
        return keras.optimizers.get({"class_name": optimizer, "config": config})
    except ValueError as error:
        raise UserError(
            f"trainer.optimizer={optimizer!r} is not a Keras optimizer: use one of sgd, rmsprop, "
            "adam, adamw, adagrad, adadelta, adamax, nadam, ftrl, lion"
        ) from error


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and TensorFlow; optionally make TF ops deterministic."""
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def fit(
    model: keras.Model, train_data, val_data, epochs: int, monitor: str
) -> tuple[list[dict[str, float]], int]:
    """Fit inside an active MLflow run, logging every epoch; leave the best epoch's weights
    in `model`. Returns (history rows, best epoch, 1-based)."""
    epoch_logger = tracking.EpochLogger()
    best = tracking.KeepBestWeights(monitor)
    # One line per epoch when logs go to a file (DVC, SLURM); a live bar in a terminal.
    verbose = 1 if sys.stdout.isatty() else 2
    try:
        # shuffle=False: the tf.data pipeline already reshuffles every epoch.
        model.fit(
            train_data,
            validation_data=val_data,
            epochs=epochs,
            shuffle=False,
            callbacks=[epoch_logger, best],
            verbose=verbose,
        )
    finally:
        epoch_logger.flush()  # epochs done so far reach MLflow even if training stops early
    best.restore()
    return epoch_logger.rows, best.best_epoch or len(epoch_logger.rows)


def save_outputs(model_dir: Path, model: keras.Model, rows: list[dict], run_info: dict) -> None:
    """Write model.keras, history.csv, then run.json (last: its presence means complete)."""
    with atomic_path(model_dir / "model.keras") as temporary:
        model.save(temporary)
    with atomic_path(model_dir / "history.csv") as temporary:
        pd.DataFrame(rows).to_csv(temporary, index=False)
    write_json(model_dir / "run.json", run_info)


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
    write the DVC outputs and log the history. Returns (run.json's content, model folder)."""
    registered = cfg.tracking.model_name if cfg.tracking.register_models else None
    model_info = tracking.log_keras_model(model, sample, registered)
    run_info = {
        "lab": cfg.lab,
        "run_id": run.info.run_id,
        "experiment_id": experiment_id,
        "model_uri": model_info.model_uri,
        "registered_model": registered,
        "registered_version": getattr(model_info, "registered_model_version", None),
        "epochs": len(rows),
        **extra,
        **metrics,
    }
    model_dir = job_output_dir(cfg.paths.model_dir)
    save_outputs(model_dir, model, rows, run_info)
    mlflow.log_artifact(str(model_dir / "history.csv"))
    return run_info, model_dir


def data_tags(train_file: Path, val_file: Path, train_rows: int, val_rows: int) -> dict:
    """Tags that pin the exact data: sha256 and row counts of the prepared splits."""
    return {
        "data.train.sha256": sha256_file(train_file),
        "data.val.sha256": sha256_file(val_file),
        "data.train.rows": str(train_rows),
        "data.val.rows": str(val_rows),
    }


def train_lab(cfg: DictConfig) -> dict:
    """Train the image lab `cfg` describes; returns the run summary also written to run.json."""
    from dlilabs.data import build_augmenter, load_split, make_dataset
    from dlilabs.device import configure_threads, select_device
    from dlilabs.models import build_model

    trainer = cfg.trainer
    # The device is settled before any data is loaded, so "GPU required" fails fast.
    device = select_device(
        trainer.device, trainer.require_gpu, trainer.memory_growth, trainer.mixed_precision
    )
    configure_threads(trainer.threads)
    seed_everything(trainer.seed, trainer.deterministic)
    prepared = Path(cfg.paths.prepared_dir)
    x_train, y_train = load_split(prepared / "train.npz")
    x_val, y_val = load_split(prepared / "val.npz")
    num_classes = cfg.dataset.num_classes
    train_data = make_dataset(
        x_train,
        y_train,
        num_classes,
        trainer.batch_size,
        shuffle=True,
        seed=trainer.seed,
        augmenter=build_augmenter(cfg.augment, trainer.seed),
        shuffle_buffer=trainer.shuffle_buffer,
    )
    val_data = make_dataset(x_val, y_val, num_classes, trainer.batch_size)

    model = build_model(cfg.model, x_train.shape[1:], num_classes)
    model.compile(
        optimizer=make_optimizer(trainer.optimizer, trainer.learning_rate),
        loss=trainer.loss,
        metrics=["accuracy"],
    )

    experiment_id = tracking.connect(cfg.tracking)
    tags = tracking.run_tags(
        cfg,
        f"train@{cfg.lab}",
        {
            "device": device["device"],
            "device.name": device["device_name"],
            "precision": device["precision"],
            **data_tags(prepared / "train.npz", prepared / "val.npz", len(x_train), len(x_val)),
        },
    )
    sweep_tags, run_name = child_tags_and_name(cfg.lab, job_overrides())
    with tracking.lab_run(run_name, {**tags, **sweep_tags}) as run:
        log.info("MLflow run %s (%s) in experiment %s", run.info.run_id, cfg.lab, experiment_id)
        mlflow.log_params(tracking.flatten_config(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        rows, best_epoch = fit(model, train_data, val_data, trainer.epochs, trainer.monitor)
        summary = tracking.summary_metrics(rows, best_epoch)
        mlflow.log_metrics(summary)
        sample = x_val[:5].astype(np.float32) / 255.0
        run_info, _ = finish_run(
            cfg, run, experiment_id, model, sample, rows, summary, device=device
        )
    log.info(
        "%s: best epoch %d, val/accuracy %.4f (final %.4f), gap/accuracy %.4f, on %s",
        cfg.lab,
        best_epoch,
        summary.get("best/val/accuracy", float("nan")),
        summary.get("final/val/accuracy", float("nan")),
        summary.get("final/gap/accuracy", float("nan")),
        device["device"],
    )
    return run_info


def run(cfg: DictConfig) -> dict:
    """Dispatch on the dataset's task: image classification labs, or the line-fit warm-up."""
    if cfg.dataset.task == "regression":
        from dlilabs.linefit import fit_line_lab

        return fit_line_lab(cfg)
    return train_lab(cfg)


main = stage_main(run)

if __name__ == "__main__":
    main()
