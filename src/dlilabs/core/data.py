"""Input pipeline: prepared `.npz` splits -> batched, one-hot `tf.data` datasets of raw pixels.

The `augment` config group lives here too: Lab 4's ImageDataGenerator settings become Keras 3
preprocessing layers mapped over batches inside the same pipeline, so one augmented epoch is
one pass over the (augmented) training set.
"""

from __future__ import annotations

import functools
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from dlilabs.ground.errors import UserError
from dlilabs.ground.io import DamagedFile, read_npz, shown, way_back

# The input pipeline's own threads and how many batches it keeps ready (see make_dataset).
INPUT_THREADS, PREFETCH = 1, 4


def load_split(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a prepared split (`data/prepared/<dataset>/<split>.npz`): x uint8 (n, 28, 28),
    y int class indices (n,). Missing or damaged, it is one UserError naming the file and the
    way back (DVC's cached copy, or the preprocess stage)."""
    path = Path(path)
    stage = f"preprocess@{path.parent.name}"
    x, y = read_npz(path, ("x", "y"), stage)
    if x.ndim != 3 or y.shape != x.shape[:1]:
        raise DamagedFile(
            f"{shown(path)} is damaged: x {x.shape} and y {y.shape} are not (n, h, w) images "
            f"and (n,) labels; {way_back(path, stage)}"
        )
    return x, y


def build_augmenter(augment_cfg: DictConfig, seed: int | None = None) -> keras.Sequential | None:
    """Keras preprocessing layers for the `augment` group, or None for `augment=none`.

    Works on (batch, 28, 28, 1) float images; factors follow ImageDataGenerator's meaning."""
    if augment_cfg.name == "none":
        return None
    flip = {
        (True, True): "horizontal_and_vertical",
        (True, False): "horizontal",
        (False, True): "vertical",
    }.get((augment_cfg.horizontal_flip, augment_cfg.vertical_flip))
    augmentation_layers = [
        # RandomRotation takes a fraction of a full turn; ImageDataGenerator took degrees.
        keras.layers.RandomRotation(
            augment_cfg.rotation_degrees / 360, fill_mode="nearest", seed=seed
        ),
        keras.layers.RandomZoom(augment_cfg.zoom, fill_mode="nearest", seed=seed),
        keras.layers.RandomTranslation(
            augment_cfg.height_shift, augment_cfg.width_shift, fill_mode="nearest", seed=seed
        ),
    ]
    if flip:
        augmentation_layers.append(keras.layers.RandomFlip(flip, seed=seed))
    return keras.Sequential(augmentation_layers, name=f"augment_{augment_cfg.name}")


def augment_in_model(augment_on: str, device: str) -> bool:
    """Where augmentation runs: True = inside the training step (`fitting.fit(augmenter=)`),
    on the model's device; False = in the CPU input pipeline (`make_dataset(augmenter=)`).

    `augment_on` is trainer.augment_on: "auto" (the model on a GPU, the pipeline on the CPU),
    "model" or "pipeline"; `device` is what dlilabs.core.device.select_device used ("gpu"/"cpu").
    On a GPU the pipeline's CPU threads would feed a step that takes a millisecond; on the
    CPU both places compute the same thing, and the pipeline keeps the results of earlier
    runs (the random draws differ between the two places)."""
    if augment_on not in ("auto", "model", "pipeline"):
        raise UserError(
            f"trainer.augment_on={augment_on!r} is not valid: use auto, model or pipeline"
        )
    return augment_on == "model" or (augment_on == "auto" and device == "gpu")


def with_augmenter(model: keras.Model, augmenter: keras.Sequential) -> keras.Model:
    """A model for training: images (batch, 28, 28) -> `augmenter` (active in training only,
    so validation sees the images as they are) -> `model`, compiled as `model` is. It shares
    `model`'s layers, so training it trains `model`."""
    shape = tuple(model.input_shape[1:])
    inputs = keras.Input(shape=shape, name="image")
    images = inputs if len(shape) == 3 else keras.layers.Reshape((*shape, 1))(inputs)
    augmented = augmenter(images)
    if len(shape) != 3:
        augmented = keras.layers.Reshape(shape)(augmented)
    wrapper = keras.Model(inputs, model(augmented), name=f"{model.name}_{augmenter.name}")
    # "auto": Keras keeps XLA off for the random image layers (on a GPU `model` alone had it
    # on; passing that on would only earn a warning).
    wrapper.compile_from_config({**model.get_compile_config(), "jit_compile": "auto"})
    return wrapper


def steps_per_epoch(count: int, batch_size: int) -> int:
    """Batches in one epoch of `count` examples (the last one may be partial)."""
    return -(-count // batch_size)


def split_batches(count: int, batch_size: int, indices: tf.Tensor) -> tf.data.Dataset:
    """An epoch's order, int64 (count,) -> its batches of indices, the last one partial."""
    whole = count // batch_size * batch_size
    batches = tf.data.Dataset.from_tensor_slices(tf.reshape(indices[:whole], (-1, batch_size)))
    if whole < count:  # the last, partial batch
        batches = batches.concatenate(tf.data.Dataset.from_tensors(indices[whole:]))
    return batches


def epoch_batches(
    count: int, batch_size: int, seed: int, epochs: range, shuffle_buffer: int
) -> tf.data.Dataset:
    """Batches of indices for `epochs` (0-based) back to back, epoch e shuffled from (seed, e)
    alone: one permutation when `shuffle_buffer` covers the set, a windowed shuffle else."""
    if shuffle_buffer < count:
        windowed = [
            tf.data.Dataset.range(count)
            .shuffle(shuffle_buffer, seed=seed * 100_003 + epoch)
            .batch(batch_size)
            for epoch in epochs
        ]
        return functools.reduce(tf.data.Dataset.concatenate, windowed)
    orders = tf.data.Dataset.range(epochs.start, epochs.stop).map(
        lambda epoch: tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
    )
    return orders.flat_map(functools.partial(split_batches, count, batch_size))


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int | None = None,
    augmenter: keras.Sequential | None = None,
    shuffle_buffer: int = 65536,
    threads: int | None = INPUT_THREADS,
    epochs: range | None = None,
) -> tf.data.Dataset:
    """uint8 images (n, 28, 28) and int labels (n,) -> batches of (float32 (b, 28, 28) raw
    pixels 0-255, one-hot float32 (b, num_classes)), shuffled each epoch when `shuffle`,
    augmented when given. The models scale the pixels themselves (their first layer).

    Vectorised like Keras' own pipeline for numpy arrays: the arrays stay whole (uint8, a
    quarter of the course's float32), each epoch shuffles the indices (one permutation when
    `shuffle_buffer` covers the set, the same uniform shuffle as a full buffer; a windowed
    index shuffle otherwise) and one parallel map per batch gathers, casts, one-hot encodes
    and augments. Shuffling the n examples through a tf.data buffer instead held up the start
    of every epoch (half a second on MNIST) until the buffer was full.

    `threads`: the threads tf.data may use (one map call at a time, PREFETCH batches ahead, no
    autotuner); None leaves it to tf.data's autotuner. The batches are the same either way.
    `epochs` (with `shuffle`): the epochs to hold, back to back in one pass, e.g. range(3, 10)
    for epochs 4..10; each epoch's order is then a function of (seed, epoch) alone, so a
    training resumed at epoch k sees the batches an uninterrupted one saw (fit it with
    steps_per_epoch = steps_per_epoch(count, batch_size)). None: one epoch per iteration,
    reshuffled from `seed` on every new iteration."""
    count = len(images)
    if shuffle and epochs is not None:
        batches = epoch_batches(count, batch_size, seed or 0, epochs, shuffle_buffer)
    elif shuffle and shuffle_buffer < count:
        # A windowed shuffle, as a tf.data shuffle buffer smaller than the set gives.
        batches = (
            tf.data.Dataset.range(count)
            .shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size)
        )
    else:
        if shuffle:
            # A fresh draw per iteration (epoch) from `seed`: reproducible, new every epoch.
            draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
            order = draws.map(
                lambda draw: tf.random.experimental.stateless_shuffle(
                    tf.range(count, dtype=tf.int64), seed=tf.stack([draw, tf.constant(0, tf.int64)])
                )
            )
        else:
            order = tf.data.Dataset.from_tensors(tf.range(count, dtype=tf.int64))
        batches = order.flat_map(functools.partial(split_batches, count, batch_size))
    arrays = tf.data.Dataset.from_tensors((images, labels)).repeat()

    def gather_cast_encode(indices, arrays):
        batch_images, batch_labels = (tf.gather(array, indices) for array in arrays)
        # Raw pixels: the model's first layer scales them (dlilabs.core.models.scale_pixels).
        pixels = tf.cast(batch_images, tf.float32)
        if augmenter is not None:
            # The image layers are linear in the pixel values (bilinear interpolation,
            # "nearest" fill, flips), so augmenting 0-255 and then scaling is the maths of
            # scaling first (test_data checks the two agree to float rounding).
            pixels = tf.squeeze(augmenter(pixels[..., tf.newaxis], training=True), axis=-1)
        return pixels, tf.one_hot(batch_labels, num_classes)

    zipped = tf.data.Dataset.zip(batches, arrays)
    if threads == 1:
        # One call at a time is a plain map: a parallel map of 1 would be the same batches, but
        # under op determinism (profile=demo) TensorFlow rewrites it into a plain map and
        # prints an E0000 line about an attribute the plain op lacks.
        dataset = zipped.map(gather_cast_encode)
    else:
        dataset = zipped.map(gather_cast_encode, num_parallel_calls=threads or tf.data.AUTOTUNE)
    # As Keras does for arrays: the static graph rewrites would serialise the whole arrays
    # into every new iterator, i.e. at the start of every epoch, for nothing to optimise.
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    if threads:
        # A batch costs 0.1 ms (1 ms augmented) against a 5-30 ms training step: one thread
        # keeps ahead. A private pool and no autotuner leave both cores of a small machine
        # to the training step's threads; the autotuner's own threads and its extra map calls
        # preempt them mid-op, and a 2-thread op then waits for its straggler.
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        options.autotune.enabled = False
    # flat_map hides the epoch's length; stating it lets Keras show progress out of N batches
    # and end each epoch without "input ran out of data" warnings.
    batches = steps_per_epoch(count, batch_size) * (len(epochs) if shuffle and epochs else 1)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
    return dataset.with_options(options).prefetch(PREFETCH if threads else tf.data.AUTOTUNE)
