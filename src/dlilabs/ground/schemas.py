"""Schemas of the config groups, and the value checks every stage runs before any work.

Ground layer (no Keras, no MLflow). Each dataclass is the type of one group's options: it is
stored in Hydra's ConfigStore under `schema/<group>/<name>` and each YAML option extends it
(`defaults: [/schema/trainer/default@_here_, _self_]`), so Hydra rejects a value of the wrong
type (`trainer.epochs=abc`) while composing. The values themselves stay in `conf/` (the
single source of truth): every field is MISSING here and set by the YAML file.

`check_config` then checks what types cannot say (epochs >= 1, a metric the run logs, a
known optimizer) and raises a `UserError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, MissingMandatoryValue

from dlilabs.ground.errors import UserError

# Keras optimizer names (keras.optimizers.get); dlilabs.core.fitting.make_optimizer builds them.
OPTIMIZERS = (
    "sgd",
    "rmsprop",
    "adam",
    "adamw",
    "adagrad",
    "adadelta",
    "adamax",
    "nadam",
    "ftrl",
    "lion",
    "adafactor",
)
# Keras loss names (keras.losses.get), snake case and short aliases; the class names
# (CategoricalCrossentropy, ...) are accepted too, by asking Keras (dlilabs.entry).
LOSSES = (
    "categorical_crossentropy",
    "categorical_focal_crossentropy",
    "categorical_hinge",
    "binary_crossentropy",
    "binary_focal_crossentropy",
    "sparse_categorical_crossentropy",
    "kl_divergence",
    "kld",
    "poisson",
    "hinge",
    "squared_hinge",
    "huber",
    "log_cosh",
    "cosine_similarity",
    "mean_squared_error",
    "mse",
    "mean_absolute_error",
    "mae",
    "mean_absolute_percentage_error",
    "mape",
    "mean_squared_logarithmic_error",
    "msle",
)
# What each task logs per epoch (Keras' names), i.e. what `trainer.monitor` may watch:
# the image labs fit with validation data and accuracy; the line fit logs its loss only.
MONITORS = {
    "classification": ("val_accuracy", "val_loss", "accuracy", "loss"),
    "regression": ("loss",),
}
DEVICES = ("gpu", "cpu")
AUGMENT_ON = ("auto", "pipeline", "model")  # where augmentation runs (dlilabs.core.data)
KerasKnows = Callable[[str, str], bool]  # ("optimizer" | "loss", name) -> Keras has it


@dataclass
class TrainerConfig:
    """conf/trainer/*.yaml: how to fit (dlilabs.core.fitting, dlilabs.core.device)."""

    epochs: int = MISSING
    batch_size: int = MISSING
    optimizer: str = MISSING
    learning_rate: float | None = MISSING
    loss: str = MISSING
    seed: int = MISSING
    deterministic: bool = MISSING
    shuffle_buffer: int = MISSING
    threads: Any = MISSING  # "auto", null or a number (OmegaConf has no Union of the two)
    device: str = MISSING
    require_gpu: bool = MISSING
    memory_growth: bool = MISSING
    mixed_precision: bool = MISSING
    monitor: str = MISSING
    steps_per_execution: int = MISSING
    augment_on: str = MISSING
    checkpoint: bool = MISSING


@dataclass
class MlpConfig:
    """conf/model/mlp.yaml (dlilabs.core.models.build_mlp)."""

    name: str = MISSING
    hidden_units: list[int] = MISSING
    activation: str = MISSING


@dataclass
class ConvBlock:
    """One Conv2D block of the CNN: its filters and the dropout after it (0: none)."""

    filters: int = MISSING
    dropout: float = 0.0


@dataclass
class CnnConfig:
    """conf/model/cnn.yaml (dlilabs.core.models.build_cnn)."""

    name: str = MISSING
    conv_blocks: list[ConvBlock] = MISSING
    kernel_size: int = MISSING
    pool_size: int = MISSING
    dense_units: int = MISSING
    dropout: float = MISSING


@dataclass
class LinearConfig:
    """conf/model/linear.yaml (dlilabs.core.models.build_linear)."""

    name: str = MISSING
    units: int = MISSING


@dataclass
class NoAugmentConfig:
    """conf/augment/none.yaml: train on the images as they are."""

    name: str = MISSING


@dataclass
class AugmentConfig:
    """conf/augment/dli.yaml: ImageDataGenerator's settings (dlilabs.core.data.build_augmenter)."""

    name: str = MISSING
    rotation_degrees: float = MISSING
    zoom: float = MISSING
    width_shift: float = MISSING
    height_shift: float = MISSING
    horizontal_flip: bool = MISSING
    vertical_flip: bool = MISSING


# (group, option) -> schema; conf/<group>/<option>.yaml extends schema/<group>/<option>.
SCHEMAS = {
    ("trainer", "default"): TrainerConfig,
    ("model", "mlp"): MlpConfig,
    ("model", "cnn"): CnnConfig,
    ("model", "linear"): LinearConfig,
    ("augment", "none"): NoAugmentConfig,
    ("augment", "dli"): AugmentConfig,
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; dlilabs.ground.config calls it)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for (group, name), schema in SCHEMAS.items():
        store.store(group=f"schema/{group}", name=name, node=schema)


def _refuse(key: str, value: object, allowed: str) -> None:
    raise UserError(f"{key}={value!r} is not allowed: {allowed}")


def _at_least(key: str, value: object, low: int) -> None:
    if value < low:
        _refuse(key, value, f"use a whole number >= {low}")


def _one_of(key: str, value: object, allowed: tuple[str, ...], what: str = "") -> None:
    if value not in allowed:
        _refuse(key, value, f"{what}use one of {', '.join(allowed)}")


def check_trainer(
    trainer: DictConfig, task: str = "classification", keras_knows: KerasKnows | None = None
) -> None:
    """Check the trainer's values a type cannot. Optimizer and loss names outside the lists
    above are put to `keras_knows(kind, name)` ("optimizer" | "loss") when given (dlilabs.entry
    asks Keras, which the ground layer cannot import). Raises UserError naming the first bad
    key, its value and what is allowed."""
    _at_least("trainer.epochs", trainer.epochs, 1)
    _at_least("trainer.batch_size", trainer.batch_size, 1)
    _at_least("trainer.shuffle_buffer", trainer.shuffle_buffer, 1)
    _at_least("trainer.seed", trainer.seed, 0)
    if trainer.learning_rate is not None and not trainer.learning_rate > 0:
        _refuse("trainer.learning_rate", trainer.learning_rate, "use a number > 0, or null")
    threads = trainer.threads
    if threads not in ("auto", None) and not (
        isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1
    ):
        _refuse("trainer.threads", threads, "use auto, null or a whole number >= 1")
    _one_of("trainer.device", trainer.device, DEVICES)
    _at_least("trainer.steps_per_execution", trainer.steps_per_execution, 1)
    _one_of("trainer.augment_on", trainer.augment_on, AUGMENT_ON)
    monitors = MONITORS.get(task, MONITORS["classification"])
    _one_of(
        "trainer.monitor", trainer.monitor, monitors, f"the {task} labs log only these metrics: "
    )
    for kind, names in (("optimizer", OPTIMIZERS), ("loss", LOSSES)):
        name = trainer[kind]
        if name not in names and not (keras_knows and keras_knows(kind, name)):
            _one_of(f"trainer.{kind}", name, names, f"Keras has no {kind} of that name: ")
    if task == "classification" and trainer.loss.lower().startswith("sparse"):
        _refuse(
            "trainer.loss",
            trainer.loss,
            "the labels are one-hot: use categorical_crossentropy",
        )


def check_model(model: DictConfig) -> None:
    """Layer sizes >= 1 and dropout rates in [0, 1), for whichever model `model` is."""
    for index, units in enumerate(model.get("hidden_units") or []):
        _at_least(f"model.hidden_units[{index}]", units, 1)
    for key in ("units", "kernel_size", "pool_size", "dense_units"):
        if key in model:
            _at_least(f"model.{key}", model[key], 1)
    rates = [("model.dropout", model.get("dropout"))]
    for index, block in enumerate(model.get("conv_blocks") or []):
        _at_least(f"model.conv_blocks[{index}].filters", block.filters, 1)
        rates.append((f"model.conv_blocks[{index}].dropout", block.dropout))
    for key, rate in rates:
        if rate is not None and not 0 <= rate < 1:
            _refuse(key, rate, "use a rate in [0, 1)")


def check_config(cfg: DictConfig, keras_knows: KerasKnows | None = None) -> None:
    """Every check a stage runs before it loads data or opens a run (trainer, model)."""
    try:
        task = cfg.get("dataset", {}).get("task", "classification")
        if "trainer" in cfg:
            check_trainer(cfg.trainer, task, keras_knows)
        if "model" in cfg:
            check_model(cfg.model)
    except MissingMandatoryValue as error:
        raise UserError(f"{error.full_key} has no value: set it (`{error.full_key}=...`)") from None
