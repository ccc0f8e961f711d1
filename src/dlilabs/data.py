"""Input pipeline: prepared `.npz` splits -> batched, scaled, one-hot `tf.data` datasets.

The `augment` config group lives here too: Lab 4's ImageDataGenerator settings become Keras 3
preprocessing layers mapped over batches inside the same pipeline, so one augmented epoch is
one pass over the (augmented) training set.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from dlilabs.errors import UserError


def load_split(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a prepared split: x uint8 (n, 28, 28), y int class indices (n,)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: run the preprocess stage first "
            f"(`dvc repro preprocess@{path.parent.name}`)"
        )
    with np.load(path, allow_pickle=False) as split:
        return split["x"], split["y"]


def build_augmenter(augment_cfg: DictConfig, seed: int | None = None) -> keras.Sequential | None:
    """Keras preprocessing layers for the `augment` group, or None for `augment=none`.

    Works on (batch, 28, 28, 1) float images; factors follow ImageDataGenerator's meaning."""
    if augment_cfg.name == "none":
        return None
    flip = {(True, True): "horizontal_and_vertical", (True, False): "horizontal",
            (False, True): "vertical"}.get((augment_cfg.horizontal_flip, augment_cfg.vertical_flip))
    augmentation_layers = [
        # RandomRotation takes a fraction of a full turn; ImageDataGenerator took degrees.
        keras.layers.RandomRotation(augment_cfg.rotation_degrees / 360, fill_mode="nearest",
                                    seed=seed),
        keras.layers.RandomZoom(augment_cfg.zoom, fill_mode="nearest", seed=seed),
        keras.layers.RandomTranslation(augment_cfg.height_shift, augment_cfg.width_shift,
                                       fill_mode="nearest", seed=seed),
    ]
    if flip:
        augmentation_layers.append(keras.layers.RandomFlip(flip, seed=seed))
    return keras.Sequential(augmentation_layers, name=f"augment_{augment_cfg.name}")


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int | None = None,
    augmenter: keras.Sequential | None = None,
    shuffle_buffer: int = 65536,
) -> tf.data.Dataset:
    """uint8 images (n, 28, 28) and int labels (n,) -> batches of (float32 (b, 28, 28) in [0, 1],
    one-hot float32 (b, num_classes)), shuffled each epoch when `shuffle`, augmented when given."""
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        dataset = dataset.shuffle(min(len(images), shuffle_buffer), seed=seed,
                                  reshuffle_each_iteration=True)
    # Batch first: scaling, one-hot and augmentation then run once per batch, vectorised.
    dataset = dataset.batch(batch_size)

    def scale_and_encode(batch_images, batch_labels):
        scaled = tf.cast(batch_images, tf.float32) / 255.0
        return scaled, tf.one_hot(batch_labels, num_classes)

    dataset = dataset.map(scale_and_encode, num_parallel_calls=tf.data.AUTOTUNE)
    if augmenter is not None:

        def augment(batch_images, batch_labels):
            augmented = augmenter(batch_images[..., tf.newaxis], training=True)
            return tf.squeeze(augmented, axis=-1), batch_labels

        dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
