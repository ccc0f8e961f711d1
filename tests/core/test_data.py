"""The tf.data input pipeline and the augmentation layers."""

import numpy as np
import pytest

from conftest import make_images
from dlilabs.core.data import augment_in_model, build_augmenter, load_split, make_dataset
from dlilabs.core.fitting import fit, seed_everything
from dlilabs.core.models import build_model
from dlilabs.ground.config import compose
from dlilabs.ground.errors import UserError


def test_batches_are_raw_pixels_one_hot_and_cover_the_set_once():
    images, labels = make_images(100, 10)
    batches = list(make_dataset(images, labels, 10, batch_size=32))
    assert [len(x) for x, _ in batches] == [32, 32, 32, 4]
    x, y = batches[0]
    assert x.dtype.name == "float32" and x.shape[1:] == (28, 28)
    # Unscaled: the model's first layer divides by 255 (see tests/core/test_models.py).
    np.testing.assert_array_equal(x.numpy(), images[:32].astype(np.float32))
    np.testing.assert_array_equal(y.numpy().argmax(1), labels[:32])
    assert y.shape == (32, 10)


def test_shuffle_reorders_every_epoch_but_keeps_the_set():
    images, labels = make_images(64, 8)
    dataset = make_dataset(images, labels, 8, batch_size=64, shuffle=True, seed=3)
    first, second = (next(iter(dataset))[1].numpy().argmax(1) for _ in range(2))
    assert sorted(first) == sorted(labels) and not np.array_equal(first, second)


def test_augmented_epoch_has_the_same_batches_with_changed_images():
    cfg = compose(["augment=dli"])
    augmenter = build_augmenter(cfg.augment, seed=1)
    images, labels = make_images(96, 10)
    plain = list(make_dataset(images, labels, 10, batch_size=32))
    augmented = list(make_dataset(images, labels, 10, batch_size=32, augmenter=augmenter))
    assert len(augmented) == len(plain)  # one augmented epoch = one pass over the set
    x_plain, y_plain = plain[0]
    x_aug, y_aug = augmented[0]
    assert x_aug.shape == x_plain.shape
    np.testing.assert_array_equal(y_aug.numpy(), y_plain.numpy())
    assert not np.allclose(x_aug.numpy(), x_plain.numpy())
    assert float(x_aug.numpy().min()) >= 0.0 and float(x_aug.numpy().max()) <= 255.0 + 1e-3


def test_augmenting_raw_pixels_is_the_maths_of_augmenting_scaled_ones():
    # Before scaling moved into the model the pipeline augmented x / 255; now it augments x
    # and the model divides. The image layers are linear, so the two agree to float rounding.
    import tensorflow as tf

    augment = compose(["augment=dli"]).augment
    images = make_images(16, 10)[0][..., np.newaxis].astype(np.float32)
    tf.random.set_seed(0)
    scaled_first = build_augmenter(augment, seed=4)(images / 255.0, training=True).numpy()
    tf.random.set_seed(0)
    raw = build_augmenter(augment, seed=4)(images, training=True).numpy()
    assert not np.allclose(raw, images)  # the draws did transform the images
    np.testing.assert_allclose(raw / 255.0, scaled_first, atol=1e-6)


def test_augment_none_builds_nothing():
    assert build_augmenter(compose(["augment=none"]).augment) is None


def test_dli_augmenter_uses_the_course_settings():
    layers = build_augmenter(compose(["augment=dli"]).augment).layers
    names = [type(layer).__name__ for layer in layers]
    assert names == ["RandomRotation", "RandomZoom", "RandomTranslation", "RandomFlip"]
    assert layers[0].factor == pytest.approx((-10 / 360, 10 / 360))
    assert layers[3].mode == "horizontal"


def test_missing_split_says_which_stage_to_run(tmp_path):
    with pytest.raises(UserError, match=r"preprocess@asl"):
        load_split(tmp_path / "asl" / "train.npz")


def epochs_of(dataset, count=2):
    """`count` epochs of (images, one-hot labels) batches as numpy arrays."""
    return [[(x.numpy(), y.numpy()) for x, y in dataset] for _ in range(count)]


@pytest.mark.parametrize("shuffle_buffer", [65536, 40])  # one permutation; a windowed shuffle
def test_one_input_thread_gives_the_batches_tf_data_autotune_gives(shuffle_buffer):
    # The input pipeline's threads are a speed setting: the same batches, same order, per epoch.
    images, labels = make_images(300, 10)
    options = dict(batch_size=32, shuffle=True, seed=5, shuffle_buffer=shuffle_buffer)
    tuned = epochs_of(make_dataset(images, labels, 10, threads=1, **options))
    autotuned = epochs_of(make_dataset(images, labels, 10, threads=None, **options))
    assert [len(epoch) for epoch in tuned] == [10, 10]
    for tuned_epoch, autotuned_epoch in zip(tuned, autotuned, strict=True):
        for (x, y), (x_auto, y_auto) in zip(tuned_epoch, autotuned_epoch, strict=True):
            np.testing.assert_array_equal(x, x_auto)
            np.testing.assert_array_equal(y, y_auto)
    assert not np.array_equal(tuned[0][0][1], tuned[1][0][1])  # still reshuffled every epoch


def test_augmented_epochs_repeat_with_the_same_seed():
    # One map call at a time draws the augmentation in batch order: lab 4 is reproducible.
    augment = compose(["augment=dli"]).augment
    images, labels = make_images(96, 10)
    runs = [
        epochs_of(
            make_dataset(
                images,
                labels,
                10,
                32,
                shuffle=True,
                seed=2,
                augmenter=build_augmenter(augment, seed=7),
            )  # fmt: skip
        )
        for _ in range(2)
    ]
    for first, second in zip(runs[0], runs[1], strict=True):
        for (x, _), (x_again, _) in zip(first, second, strict=True):
            np.testing.assert_array_equal(x, x_again)


def fit_tiny_mlp(steps_per_execution, augmenter=None, epochs=2):
    """Train a small MLP on 300 learnable images (10 batches, the last partial) from seed 0;
    returns (history rows, weights, model)."""
    images, labels = make_images(300, 10)
    seed_everything(0)
    model = build_model(compose(["model=mlp", "model.hidden_units=[16]"]).model, (28, 28), 10)
    model.compile(
        optimizer="rmsprop",
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    train = make_dataset(images, labels, 10, 32, shuffle=True, seed=0)
    val = make_dataset(images[:64], labels[:64], 10, 32)
    rows, _ = fit(model, train, val, epochs, "val_accuracy", augmenter=augmenter)
    return rows, model.get_weights(), model


def test_steps_per_execution_keeps_every_epochs_metrics_and_weights():
    # trainer.steps_per_execution (default 32) runs the same optimizer steps on the same
    # batches: per-epoch metrics and the trained weights are bit-identical to one step a call.
    one_rows, one_weights, _ = fit_tiny_mlp(1)
    rows, weights, _ = fit_tiny_mlp(4)  # 10 batches: calls of 4, 4 and 2
    assert rows == one_rows
    for weight, one_weight in zip(weights, one_weights, strict=True):
        np.testing.assert_array_equal(weight, one_weight)
    assert compose([]).trainer.steps_per_execution > 1


def test_augmentation_runs_in_the_pipeline_on_the_cpu_unless_asked():
    # The opt-in lever is off by default: the default config augments in the input pipeline
    # on the CPU (the results of earlier runs), inside the model on a GPU.
    default = compose([]).trainer.augment_on
    assert augment_in_model(default, "cpu") is False
    assert augment_in_model(default, "gpu") is True
    assert augment_in_model("model", "cpu") is True
    assert augment_in_model("pipeline", "gpu") is False
    with pytest.raises(UserError, match=r"trainer.augment_on='device'.*auto, model or pipeline"):
        augment_in_model("device", "gpu")


def test_augmentation_in_the_model_trains_the_model_and_leaves_validation_alone():
    augmenter = build_augmenter(compose(["augment=dli"]).augment, seed=1)
    plain_rows, plain_weights, _ = fit_tiny_mlp(1, epochs=1)
    rows, weights, model = fit_tiny_mlp(1, augmenter=augmenter, epochs=1)
    # Trained on other (augmented) images: other weights, other training loss ...
    assert rows[0]["train_loss"] != plain_rows[0]["train_loss"]
    assert not np.array_equal(weights[0], plain_weights[0])
    # ... and the saved model has no augmentation layers; its validation loss is the model's
    # own on the plain images.
    assert all("augment" not in layer.name for layer in model.layers)
    assert int(model.optimizer.iterations) == 10  # saved with the optimizer that trained it
    images, labels = make_images(300, 10)
    val = make_dataset(images[:64], labels[:64], 10, 32)
    model.compile(loss="categorical_crossentropy")
    loss = model.evaluate(val, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(rows[0]["val_loss"], rel=1e-6)
