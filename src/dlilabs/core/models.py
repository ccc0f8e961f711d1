"""Keras 3 models built from the `model` config group, layer lists spelled out as in LABS.md."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import keras
from keras import layers
from omegaconf import DictConfig

from dlilabs.ground.errors import UserError
from dlilabs.ground.io import reading

# The first layer of every image model: raw pixels 0-255 in, [0, 1] out. Scaling is part of
# the model so Keras, MLflow's pyfunc and `mlflow models serve` all take what users have
# (CSV rows, image files).
SCALE_LAYER = "scale_pixels"


def scale_pixels() -> layers.Normalization:
    """The layer that maps raw pixels 0-255 to [0, 1]: (x - 0) / sqrt(255**2), in float32.

    Not Rescaling(1/255): x * (1/255) differs from x / 255 in the last bit for 126 of the
    256 pixel values; this division gives exactly the float32 x / 255 the input pipeline
    computed before scaling moved into the model. float32 even under mixed precision, as the
    pipeline's output was (the next layer casts it to float16 as before)."""
    return layers.Normalization(
        axis=None, mean=0.0, variance=255.0**2, dtype="float32", name=SCALE_LAYER
    )


def takes_raw_pixels(model: keras.Model) -> bool:
    """True for models that scale their own input (built here since raw-pixel serving);
    False for older ones, saved before, which expect pixels already scaled to [0, 1]."""
    return any(layer.name == SCALE_LAYER for layer in model.layers)


def build_mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden_units=(512, 512), activation="relu"
) -> keras.Model:
    """Labs 1-2: raw pixels (batch, 28, 28) 0-255 -> /255 -> Flatten (784) -> Dense relu ...
    -> softmax (batch, classes)."""
    model = keras.Sequential(name="mlp")
    model.add(keras.Input(shape=input_shape, name="image"))
    model.add(scale_pixels())
    model.add(layers.Flatten())
    for units in hidden_units:
        model.add(layers.Dense(units, activation=activation))
    # float32 softmax keeps probabilities exact when mixed precision computes in float16.
    model.add(
        layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")
    )
    return model


def build_cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    conv_blocks=(
        {"filters": 75, "dropout": 0.0},
        {"filters": 50, "dropout": 0.2},
        {"filters": 25, "dropout": 0.0},
    ),
    kernel_size: int = 3,
    pool_size: int = 2,
    dense_units: int = 512,
    dropout: float = 0.3,
) -> keras.Model:
    """Labs 3-4: raw pixels (batch, 28, 28) 0-255 -> /255 -> (28, 28, 1) -> [Conv2D relu ->
    (Dropout) -> BatchNorm -> MaxPool] x 3 -> Flatten -> Dense relu -> Dropout -> softmax
    (batch, classes)."""
    model = keras.Sequential(name="cnn")
    model.add(keras.Input(shape=input_shape, name="image"))
    model.add(scale_pixels())
    model.add(layers.Reshape((*input_shape[:2], 1)))
    for block in conv_blocks:
        model.add(layers.Conv2D(block["filters"], kernel_size, padding="same", activation="relu"))
        if block["dropout"]:
            model.add(layers.Dropout(block["dropout"]))
        model.add(layers.BatchNormalization())
        model.add(layers.MaxPool2D(pool_size, strides=2, padding="same"))
    model.add(layers.Flatten())
    model.add(layers.Dense(dense_units, activation="relu"))
    model.add(layers.Dropout(dropout))
    model.add(
        layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")
    )
    return model


def build_linear(units: int = 1) -> keras.Model:
    """Warm-up: x (batch, 1) -> y = m*x + b (batch, units)."""
    return keras.Sequential(
        [keras.Input(shape=(1,), name="x"), layers.Dense(units, name="line")], name="linear"
    )


def load_keras_file(path: str | Path, stage: str | None = None) -> keras.Model:
    """A .keras file (written by DVC stage `stage`, e.g. "train@mnist_mlp", if known) -> the
    Keras model, in safe mode (no arbitrary code). A missing or damaged file is one UserError
    (`reading`: the file and the way back); so is one that holds a layer or function this
    Keras does not know (saved by other code, or a newer Keras: Keras' own message carries
    the whole model config)."""
    with reading(path, stage, "Keras model file") as source:
        if not zipfile.is_zipfile(source):  # Keras would say "File not found" of it
            raise ValueError("not a zip archive")
        try:
            return keras.saving.load_model(source, safe_mode=True)
        except TypeError as error:
            unknown = re.search(r"Could not (?:locate|deserialize) (\w+) '([^']+)'", str(error))
            what = f"the {unknown.group(1)} {unknown.group(2)!r}" if unknown else "a layer or class"
            raise UserError(
                f"{path}: holds {what}, which this Keras ({keras.__version__}) does not know: "
                "it was saved by other code (a custom layer) or a newer Keras; load it where "
                "that code is, or retrain it here"
            ) from None


def build_model(model_cfg: DictConfig, input_shape=(28, 28), num_classes: int = 10) -> keras.Model:
    """Build the model a `model` config group entry describes (not compiled)."""
    if model_cfg.name == "mlp":
        return build_mlp(
            tuple(input_shape), num_classes, list(model_cfg.hidden_units), model_cfg.activation
        )
    if model_cfg.name == "cnn":
        return build_cnn(
            tuple(input_shape),
            num_classes,
            [dict(block) for block in model_cfg.conv_blocks],
            model_cfg.kernel_size,
            model_cfg.pool_size,
            model_cfg.dense_units,
            model_cfg.dropout,
        )
    if model_cfg.name == "linear":
        return build_linear(model_cfg.units)
    raise ValueError(f"unknown model.name {model_cfg.name!r}: expected mlp, cnn or linear")
