"""train stage: `python -m dlilabs.train experiment=<lab>` trains one lab as one MLflow run.

Outputs (DVC outs) in `paths.model_dir`: `model.keras` (the best epoch by
`trainer.monitor`), `history.csv` (one row per epoch) and `run.json` (the MLflow run id the
evaluate stage logs to). The run gets the flattened config as params, per-epoch metrics,
best/final summaries, the resolved config, the history and the model (registered as the lab).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from dlilabs import tracking
from dlilabs.entry import stage_main
from dlilabs.ground.errors import UserError

log = logging.getLogger("dlilabs.train")


def train_lab(cfg: DictConfig) -> dict:
    """Train the image lab `cfg` describes; returns the run summary also written to run.json."""
    # Keras and TensorFlow load here, after the entry point has quieted their start-up.
    from dlilabs.core.data import load_split
    from dlilabs.core.device import configure_threads, select_device
    from dlilabs.core.fitting import seed_everything

    trainer = cfg.trainer
    # The device is settled before any data is loaded, so "GPU required" fails fast.
    try:
        device = select_device(
            trainer.device, trainer.require_gpu, trainer.memory_growth, trainer.mixed_precision
        )
    except UserError as error:  # on a cluster node, a FAILED run says where and why
        tracking.record_failed_start(cfg, str(error))
        raise
    configure_threads(trainer.threads)
    seed_everything(trainer.seed, trainer.deterministic)
    prepared = Path(cfg.paths.prepared_dir)
    x_train, y_train = load_split(prepared / "train.npz")
    x_val, y_val = load_split(prepared / "val.npz")
    split_tags = tracking.data_tags(
        prepared / "train.npz", prepared / "val.npz", len(x_train), len(x_val)
    )
    data_digest = f"{split_tags['data.train.sha256']} {split_tags['data.val.sha256']}"
    experiment_id = tracking.connect(cfg.tracking)
    splits = (x_train, y_train, x_val, y_val)
    with tracking.restartable(cfg, data_digest) as (plan, previous_run):
        return fit_lab(cfg, experiment_id, device, splits, split_tags, plan, previous_run)


def fit_lab(cfg, experiment_id, device, splits, split_tags, plan, previous_run) -> dict:
    """Build, fit and log the lab on `splits` (x_train (n, 28, 28) uint8, y_train (n,),
    x_val, y_val) in a new MLflow run of `experiment_id`, or in `previous_run` from
    `plan`'s checkpoint (dlilabs.tracking.restart); returns run.json's content."""
    from dlilabs.core.data import augment_in_model, build_augmenter, make_dataset
    from dlilabs.core.fitting import fit, make_optimizer, summary_metrics
    from dlilabs.core.models import build_model

    trainer = cfg.trainer
    x_train, y_train, x_val, y_val = splits
    num_classes = cfg.dataset.num_classes
    augmenter = build_augmenter(cfg.augment, trainer.seed)
    # On a GPU the augmentation runs inside the training step, on the device (README "Speed").
    in_model = augment_in_model(trainer.augment_on, device["device"])
    if plan is not None and not in_model:
        plan.augmenter = augmenter  # its random state goes into the checkpoint
    # One dataset per epoch, its order a function of (seed, epoch) alone: a run resumed
    # from a checkpoint sees the batches an uninterrupted one would have seen.
    first_epoch = plan.first_epoch if plan else 0

    def epoch_data(epoch: int):
        return make_dataset(
            x_train,
            y_train,
            num_classes,
            trainer.batch_size,
            shuffle=True,
            seed=trainer.seed,
            augmenter=None if in_model else augmenter,
            shuffle_buffer=trainer.shuffle_buffer,
            epochs=range(epoch, epoch + 1),
        )

    val_data = make_dataset(x_val, y_val, num_classes, trainer.batch_size)

    model = build_model(cfg.model, x_train.shape[1:], num_classes)
    model.compile(
        optimizer=make_optimizer(trainer.optimizer, trainer.learning_rate),
        loss=trainer.loss,
        metrics=["accuracy"],
        steps_per_execution=trainer.steps_per_execution,
    )

    tags = tracking.run_tags(
        cfg,
        f"train@{cfg.lab}",
        {
            "device": device["device"],
            "device.name": device["device_name"],
            "precision": device["precision"],
            **split_tags,
            **tracking.lineage_tags(cfg, model),  # overrides, data.verified, model size
            **tracking.resume_tags(plan, tracking.run_tag(previous_run, "resume.count")),
        },
    )
    # `run_name` (profile=demo) names the run by what it is; by default it is the lab.
    sweep_tags, run_name = tracking.child_tags_and_name(
        cfg.get("run_name") or cfg.lab, tracking.job_overrides()
    )
    with tracking.lab_run(
        run_name, {**tags, **sweep_tags}, run_id=previous_run, tracking_cfg=cfg.tracking
    ) as run:
        if previous_run is None:
            log.info("MLflow run %s (%s) in experiment %s", run.info.run_id, cfg.lab, experiment_id)
            tracking.log_config(cfg)
            tracking.log_datasets(cfg)  # the splits as MLflow dataset inputs, tied to DVC
        else:
            log.info("Continuing MLflow run %s after epoch %d", previous_run, first_epoch)
            tracking.log_missing_epochs(previous_run, plan.resumed.rows)
        if plan is not None:
            plan.extra["run_id"] = run.info.run_id
        epoch_logger = tracking.EpochLogger()
        # In an Optuna search: report each epoch to the trial, stop when it is pruned.
        callbacks = [epoch_logger, *tracking.search_callbacks(cfg)]
        try:
            rows, best_epoch = fit(
                model,
                epoch_data,
                val_data,
                trainer.epochs,
                trainer.monitor,
                callbacks,
                augmenter=augmenter if in_model else None,
                checkpoint=plan,
            )
        finally:
            epoch_logger.flush()  # epochs done so far reach MLflow even if training stops early
        summary = summary_metrics(rows, best_epoch)
        tracking.log_metrics(summary)
        sample = x_val[:5].astype(np.float32)  # raw pixels: the model scales them
        run_info, _ = tracking.finish_run(
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
    # A resumed sweep whose combination FINISHED, or a run stopped after it FINISHED.
    done = tracking.finished_in_sweep(cfg) or tracking.finished_before_stop(cfg)
    if done is not None:
        return done
    if cfg.dataset.task == "regression":
        from dlilabs.linefit import fit_line_lab

        return fit_line_lab(cfg)
    return train_lab(cfg)


main = stage_main(run)

if __name__ == "__main__":
    from dlilabs.ground.startup import run_command

    run_command(main)
