"""The pictures: learning curves, confusion matrix, sample and augmented grids, as PNG files
written by the real stages and logged to the lab's MLflow run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from mlflow import MlflowClient
from PIL import Image

from conftest import make_images
from dlilabs.core import plots
from dlilabs.evaluate import run as evaluate_run
from dlilabs.ground.config import compose
from dlilabs.preprocess import run as preprocess_run
from dlilabs.train import run as train_run

TINY = ["experiment=mnist_mlp", "model.hidden_units=[32]", "trainer.epochs=3"]
ASL_LETTERS = list("abcdefghiklmnopqrstuvwxy")


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG file, failing if it is not one or is a blank canvas."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10, f"{path} looks blank"
    return image.size


def legend_texts(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_learning_curves_shade_the_gap_and_mark_the_best_epoch(tmp_path):
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3, 4],
            "train_accuracy": [0.6, 0.8, 0.9, 0.97],
            "val_accuracy": [0.55, 0.7, 0.78, 0.74],
            "train_loss": [1.2, 0.6, 0.3, 0.1],
            "val_loss": [1.3, 0.9, 0.7, 0.8],
        }
    )
    figure = plots.learning_curves(history, best_epoch=3, title="asl_mlp: learning curves")
    accuracy, loss = figure.axes[:2]
    assert accuracy.get_shared_x_axes().joined(accuracy, loss)  # one epoch axis for both
    for ax, gap in ((accuracy, "gap (train - validation)"), (loss, "gap (validation - train)")):
        assert legend_texts(ax) == [
            f"train {ax.get_title()}",
            f"validation {ax.get_title()}",
            gap,
            "best epoch 3",
        ]
        shaded = [c for c in ax.collections if isinstance(c, PolyCollection)]
        # The shaded band spans exactly the train-validation gap at every epoch.
        band = shaded[0].get_paths()[0].vertices
        column = ax.get_title()
        at_epoch_4 = sorted(set(band[np.isclose(band[:, 0], 4), 1].round(6)))  # closed path
        assert at_epoch_4 == pytest.approx(
            sorted(history.loc[3, [f"train_{column}", f"val_{column}"]])
        )
        assert 3 in [line.get_xdata()[0] for line in ax.get_lines()]  # the best-epoch line
    width, height = png_size(plots.save(figure, tmp_path / "curves.png"))
    assert width > 2 * height  # two panels side by side


def test_a_one_epoch_run_still_shows_its_gap():
    history = pd.DataFrame(
        {
            "epoch": [1],
            "train_accuracy": [0.84],
            "val_accuracy": [0.9],
            "train_loss": [0.5],
            "val_loss": [0.3],
        }
    )
    accuracy = plots.learning_curves(history, 1, "demo").axes[0]
    (bar,) = [c for c in accuracy.collections if c.get_label().startswith("gap")]
    assert sorted(bar.get_segments()[0][:, 1]) == pytest.approx([0.84, 0.9])
    low, high = accuracy.get_xlim()
    shown = [tick for tick in accuracy.get_xticks() if low <= tick <= high]
    assert shown == [1]  # whole epochs only, not 0.96 ... 1.04


def test_confusion_matrix_names_the_asl_letters(tmp_path):
    matrix = np.diag(np.arange(1, 25))
    matrix[0, 1] = 7  # seven a's taken for b's
    figure = plots.confusion(matrix, ASL_LETTERS, "asl_cnn: validation confusion")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ASL_LETTERS
    assert [t.get_text() for t in ax.get_yticklabels()] == ASL_LETTERS
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "actual class")
    counts = {(t.get_position(), t.get_text()) for t in ax.texts}
    assert ((1, 0), "7") in counts and ((23, 23), "24") in counts
    png_size(plots.save(figure, tmp_path / "confusion.png"))


def test_augmented_draws_come_from_the_real_pipeline():
    images, labels = make_images(8, 10)
    augment = compose(["augment=dli"]).augment
    draws = plots.augmented_batches(images, labels, 10, augment, seed=0, draws=2)
    assert [d.shape for d in draws] == [(8, 28, 28)] * 2
    assert all(d.min() >= 0 and d.max() <= 1 for d in draws)
    originals = images / 255.0
    assert not np.allclose(draws[0], originals, atol=0.05)  # rotated, zoomed, shifted
    assert not np.allclose(draws[0], draws[1])  # each pass draws new transforms
    plain = plots.augmented_batches(images, labels, 10, compose().augment, seed=0, draws=1)
    np.testing.assert_allclose(plain[0], originals, atol=1e-6)  # augment=none: as stored


def test_preprocess_writes_a_sample_grid_with_every_class(project):
    images, labels = make_images(60, 10)
    (project / "data/raw/mnist").mkdir(parents=True)
    np.savez(
        project / "data/raw/mnist/mnist.npz",
        x_train=images[:50],
        y_train=labels[:50].astype(np.uint8),
        x_test=images[50:],
        y_test=labels[50:].astype(np.uint8),
    )
    preprocess_run(compose(["dataset=mnist"]))
    chosen = plots.pick_samples(labels[:50], 32)
    assert set(labels[chosen[:10]]) == set(range(10))  # every digit shown first
    png_size(project / "data/prepared/mnist/samples.png")


def test_evaluate_writes_the_pictures_and_logs_them_to_the_run(project, tiny_mnist):
    summary = train_run(compose(TINY))
    evaluate_run(compose(TINY))

    eval_dir = project / "eval" / "mnist_mlp"
    names = ["confusion.png", "learning_curves.png", "train_inputs.png"]
    for name in names:
        png_size(eval_dir / name)
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    logged = sorted(item.path for item in client.list_artifacts(summary["run_id"], "plots"))
    assert logged == [f"plots/{name}" for name in names]
    copy = client.download_artifacts(summary["run_id"], "plots/confusion.png", str(project))
    assert Path(copy).read_bytes() == (eval_dir / "confusion.png").read_bytes()
    # The first evaluated version of a lab becomes its champion.
    assert str(client.get_model_version_by_alias("mnist_mlp", "champion").version) == "1"
