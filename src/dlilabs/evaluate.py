"""evaluate stage: `python -m dlilabs.evaluate experiment=<lab>` scores the trained model.

Loads `model.keras` (safe mode) and the prepared splits; writes to `paths.eval_dir`:
`metrics.json` (DVC metrics: loss and accuracy on both splits, the gap), `class_accuracy.csv`
(validation accuracy per class, a DVC bar chart) and `confusion.csv` (one row per validation
image, actual and predicted class name: DVC's confusion template counts them). Logs the same
metrics, the confusion matrix and a per-class table to the lab's MLflow run, whose id the
train stage left in `run.json`. Also draws `learning_curves.png`, `confusion.png` and
`train_inputs.png` (dlilabs.core.plots; logged under the run's `plots/`), and moves the registry
alias `champion` to this model version when its eval/val_accuracy beats the current
champion's (dlilabs.tracking.registry.update_champion). Evaluate never changes the train
run's status: its own outcome is the run's `eval.status` tag (and `eval.error`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from dlilabs import tracking
from dlilabs.entry import stage_main
from dlilabs.ground.errors import UserError
from dlilabs.ground.io import DamagedFile, atomic_path, read_json, shown, way_back, write_json

if TYPE_CHECKING:
    import keras

log = logging.getLogger("dlilabs.evaluate")


def read_run_info(model_dir: Path) -> dict:
    """The train stage's run.json beside `model.keras` in `model_dir`; either missing, or
    run.json damaged, is one UserError naming it and the way back (read without Keras)."""
    model_file, run_file = model_dir / "model.keras", model_dir / "run.json"
    stage = f"train@{model_dir.name}"
    run_info = read_json(run_file, stage, cached=False)  # run.json is not in DVC's cache
    if not isinstance(run_info.get("run_id"), str):
        raise DamagedFile(
            f"{shown(run_file)} is damaged: it names no MLflow run (run_id); "
            f"{way_back(run_file, stage, cached=False)}"
        )
    if not model_file.is_file():
        raise UserError(f"{shown(model_file)} does not exist: run `dvc repro {stage}` first")
    return run_info


def load_trained(model_dir: Path) -> keras.Model:
    """The saved model (safe mode: no arbitrary code); damaged is a UserError naming it."""
    # Keras (and TensorFlow, ~4 s) loads when the stage needs it: `--help` and a config or
    # missing-file error answer at once.
    from dlilabs.core.models import load_keras_file

    return load_keras_file(model_dir / "model.keras", f"train@{model_dir.name}")


def check_fits(model: keras.Model, images: np.ndarray, num_classes: int, where: str) -> None:
    """Raise UserError unless `images` (n, *shape) have the model's input shape, the model
    outputs `num_classes` probabilities and scales raw pixels itself; `where` names the data
    and model for the message."""
    expected, given = tuple(model.input_shape[1:]), tuple(images.shape[1:])
    outputs = model.output_shape[-1]
    if expected != given or outputs != num_classes:
        raise UserError(
            f"{where}: the model takes images of shape {expected} and predicts {outputs} "
            f"classes, but the data holds images of shape {given} with {num_classes} classes. "
            "Evaluate a lab on the dataset it was trained on (drop the `dataset=` override), "
            "or train it on this one first (`python -m dlilabs.train experiment=<lab> "
            "dataset=<dataset>`)"
        )
    from dlilabs.core.models import takes_raw_pixels

    if not takes_raw_pixels(model):  # the input pipeline now feeds raw pixels 0-255
        raise UserError(
            f"{where}: the model was saved before the image models scaled their own input "
            "(it takes pixels divided by 255; the pipeline now feeds raw pixels, which it "
            "would mis-score): retrain it (`dvc repro train@<lab>`)"
        )


def scorer(model: keras.Model, loss: str = "categorical_crossentropy"):
    """A compiled step for `model`: (float images (b, ...), one-hot labels (b, classes)) ->
    (the batch's summed `loss`, float64, predicted class indices (b,)). One trace serves
    every batch of every split (the batch dimension is left open)."""
    import keras
    import tensorflow as tf

    loss_function = keras.losses.get(loss)
    if isinstance(loss_function, keras.losses.Loss):  # "CategoricalCrossentropy": per image
        loss_function = loss_function.call

    @tf.function(reduce_retracing=True)
    def step(images, targets):
        # Called inside one graph, the softmax's output keeps its logits (Keras' TensorFlow
        # backend tags it), so the loss is computed from them, as in fit and evaluate.
        probabilities = model(images, training=False)
        losses = tf.cast(loss_function(targets, probabilities), tf.float64)
        return tf.reduce_sum(losses), tf.argmax(probabilities, axis=-1)

    return step


def score(
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    batch_size: int = 32,
    loss: str = "categorical_crossentropy",
    step=None,
) -> tuple[float, float, np.ndarray]:
    """uint8 images (n, 28, 28), int labels (n,) -> (mean `loss`, accuracy, predicted class
    indices (n,)), in one pass over the input pipeline's batches (`step`: a `scorer` to
    reuse across splits; made here if None).

    The loss is Keras' own, as fit reports `val_loss`: cross-entropy computed from the
    softmax's logits, the mean over images. (From predicted probabilities it would be clipped
    at 1e-7, understating confident mistakes.)"""
    from dlilabs.core.data import make_dataset

    step = step or scorer(model, loss)
    total, predicted = 0.0, []
    for batch_images, batch_targets in make_dataset(images, labels, num_classes, batch_size):
        batch_loss, batch_classes = step(batch_images, batch_targets)
        total += float(batch_loss)
        predicted.append(batch_classes.numpy())
    predictions = np.concatenate(predicted) if predicted else np.zeros(0, np.int64)
    return total / max(len(labels), 1), float(np.mean(predictions == labels)), predictions


def class_report(
    labels: np.ndarray, predictions: np.ndarray, class_names: list[str]
) -> tuple[np.ndarray, dict[str, float]]:
    """Confusion matrix (classes, classes) with rows = actual, and accuracy per class name
    (recall; NaN-free: a class absent from `labels` gets 0.0)."""
    classes = len(class_names)
    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    known = (labels >= 0) & (labels < classes) & (predictions >= 0) & (predictions < classes)
    pairs = labels[known] * classes + predictions[known]
    matrix = np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)
    totals = matrix.sum(axis=1)
    per_class = np.divide(matrix.diagonal(), totals, out=np.zeros(len(totals)), where=totals > 0)
    return matrix, {name: float(value) for name, value in zip(class_names, per_class, strict=True)}


def evaluate_lab(cfg: DictConfig) -> dict:
    """Score the lab's model on both splits, write metrics.json, class_accuracy.csv and
    confusion.csv, draw the figures and log them all to the lab's MLflow run. Returns the
    metrics dict written to metrics.json.

    The MLflow side (import, connect, the run's eval.status, then the logging) runs in a
    process of its own while this one loads Keras and scores (`tracking.aside`)."""
    model_dir = Path(cfg.paths.model_dir)
    run_info = read_run_info(model_dir)

    def work(receive) -> None:  # MLflow loads in the process that runs it, only
        tracking.record_evaluation(cfg, run_info, receive)

    # Any failure in the block is recorded as the run's eval.status, not its status.
    with tracking.aside(work) as send:
        model = load_trained(model_dir)
        metrics, logged = score_and_write(cfg, model, run_info)
        send(logged)
    log.info(
        "%s: val accuracy %.4f, train accuracy %.4f, gap %.4f (run %s)",
        cfg.lab,
        metrics["val"]["accuracy"],
        metrics["train"]["accuracy"],
        metrics["gap"]["accuracy"],
        run_info["run_id"],
    )
    return metrics


def score_and_write(cfg: DictConfig, model: keras.Model, run_info: dict) -> tuple[dict, dict]:
    """Score `model` on the prepared splits; write the eval outputs and figures. Returns
    (metrics.json's content, what `tracking.log_evaluation` logs: metrics by MLflow name, the
    confusion matrix (classes, classes), the class names, the files and the figures)."""
    import pandas as pd  # loaded with Keras anyway; not before the MLflow side forks

    from dlilabs.core.data import load_split

    prepared, eval_dir = Path(cfg.paths.prepared_dir), Path(cfg.paths.eval_dir)
    class_names = [str(name) for name in cfg.dataset.class_names]
    num_classes = len(class_names)
    x_train, y_train = load_split(prepared / "train.npz")
    x_val, y_val = load_split(prepared / "val.npz")
    where = f"{cfg.paths.model_dir}/model.keras on {prepared}"
    check_fits(model, x_val, num_classes, where)
    check_fits(model, x_train, num_classes, where)
    # One compiled step for both splits, each split one pass; a call takes as many images
    # as a training call (batch_size x steps_per_execution): in inference mode images do
    # not affect each other, so bigger batches give the same numbers, with less Python.
    per_call = cfg.trainer.batch_size * cfg.trainer.steps_per_execution
    scoring = {"batch_size": per_call, "step": scorer(model, cfg.trainer.loss)}
    train_loss, train_accuracy, _ = score(model, x_train, y_train, num_classes, **scoring)
    val_loss, val_accuracy, predictions = score(model, x_val, y_val, num_classes, **scoring)
    matrix, per_class = class_report(y_val, predictions, class_names)
    metrics = {
        "train": {"loss": train_loss, "accuracy": train_accuracy},
        "val": {"loss": val_loss, "accuracy": val_accuracy},
        # The saved (best-epoch) model's overfitting gap, both splits scored without dropout
        # or augmentation: comparable across labs.
        "gap": {"accuracy": train_accuracy - val_accuracy, "loss": val_loss - train_loss},
        "best_epoch": run_info.get("best_epoch"),
    }
    write_json(eval_dir / "metrics.json", metrics)
    # Per-class accuracy is a chart (24 columns would swamp `dvc metrics show`).
    with atomic_path(eval_dir / "class_accuracy.csv") as temporary:
        pd.DataFrame({"class": list(per_class), "accuracy": list(per_class.values())}).to_csv(
            temporary, index=False
        )
    names = np.asarray(class_names)
    with atomic_path(eval_dir / "confusion.csv") as temporary:
        pd.DataFrame({"actual": names[y_val], "predicted": names[predictions]}).to_csv(
            temporary, index=False
        )
    from dlilabs.core import plots  # matplotlib is imported by the stages that draw, only

    figures = plots.write_eval_figures(
        cfg, matrix, (x_train, y_train), val_accuracy, run_info.get("best_epoch")
    )
    logged = {f"eval/{split}_{name}": value for split in ("train", "val", "gap")
              for name, value in metrics[split].items()}  # fmt: skip
    logged.update({f"eval/class_accuracy/{name}": value for name, value in per_class.items()})
    files = [eval_dir / name for name in ("metrics.json", "class_accuracy.csv")]
    return metrics, {
        "metrics": logged,
        "matrix": matrix,
        "class_names": class_names,
        "files": files,
        "figures": figures,
    }


def run(cfg: DictConfig) -> dict:
    """Evaluate an image lab; the line fit evaluates itself in its train stage."""
    if cfg.dataset.task != "classification":
        raise UserError(
            f"lab {cfg.lab!r} is a {cfg.dataset.task} lab: its train stage writes "
            "its own metrics; there is nothing to evaluate"
        )
    return evaluate_lab(cfg)


main = stage_main(run)

if __name__ == "__main__":
    from dlilabs.ground.startup import run_command

    run_command(main)
