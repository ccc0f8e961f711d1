"""The tf.data input pipeline and the augmentation layers."""

import numpy as np
import pytest

from conftest import make_images
from dlilabs.config import compose
from dlilabs.data import build_augmenter, load_split, make_dataset
from dlilabs.errors import UserError


def test_batches_are_scaled_one_hot_and_cover_the_set_once():
    images, labels = make_images(100, 10)
    batches = list(make_dataset(images, labels, 10, batch_size=32))
    assert [len(x) for x, _ in batches] == [32, 32, 32, 4]
    x, y = batches[0]
    assert x.dtype.name == "float32" and x.shape[1:] == (28, 28)
    np.testing.assert_allclose(x.numpy(), images[:32] / 255.0, rtol=1e-6)
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
    assert float(x_aug.numpy().min()) >= 0.0 and float(x_aug.numpy().max()) <= 1.0 + 1e-6


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
