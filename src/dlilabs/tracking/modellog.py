"""The lab's model in MLflow: logged with its input example (and, for the line fit, a
signature inferred from its predictions), registered when asked; classifiers go as
`dlilabs.tracking.serving`'s PixelClassifier (raw pixels, CSV rows or images in).

What MLflow would do around the logging and the project does not need (its progress bars,
its requirement inference and re-checks, op determinism during its checks) is kept out here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections.abc import Iterator
from pathlib import Path

import keras
import mlflow
import numpy as np


def _save_keras_model(path, validate_serving_input=True, **kwargs):
    # MLflow 3.17's keras save_model writes the input example before it creates the model
    # folder (FileNotFoundError on input_example.json); creating the folder first fixes it.
    # (`validate_serving_input` is Model.log's own option, which it hands on to the flavor.)
    os.makedirs(path, exist_ok=True)
    return mlflow.keras.save_model(path=path, **kwargs)


@contextlib.contextmanager
def _requirements_trusted() -> Iterator[None]:
    """Skip MLflow's check that this environment satisfies the logged model's requirements:
    we list them from this environment's own versions, and the check maps every installed
    distribution's modules to say so (skipping it made a 1-epoch train 3% faster on an idle
    machine: `make bench`, section overhead, with BEFORE). MLflow runs it when it saves the
    model and again when it loads it back to check the input example
    (`mlflow.pyfunc.load_model`). A no-op if MLflow changes."""
    import mlflow.pyfunc
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    modules = [module for module in (environment, mlflow.pyfunc) if hasattr(module, name)]
    checks = [getattr(module, name) for module in modules]
    for module in modules:
        setattr(module, name, lambda requirements: None)
    try:
        yield
    finally:
        for module, check in zip(modules, checks, strict=True):
            setattr(module, name, check)


# mlflow.keras, but with the folder fix above; Model.log only needs these two attributes.
_KERAS_FLAVOR = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_model)


@contextlib.contextmanager
def _without_op_determinism() -> Iterator[None]:
    """Turn TensorFlow's op determinism off for the block if it is on (training is over: the
    block only checks the logged model), and back on after. A no-op where TF lacks the API."""
    try:
        from tensorflow.python.framework import config as tf_config

        enabled = tf_config.is_op_determinism_enabled()
    except (ImportError, AttributeError):
        enabled = False
    if enabled:
        tf_config.disable_op_determinism()
    try:
        yield
    finally:
        if enabled:
            tf_config.enable_op_determinism()


def log_keras_model(
    model: keras.Model,
    sample_inputs: np.ndarray,
    registered_name: str | None,
    class_names: list[str] | None = None,
    saved: Path | None = None,
):
    """Log `model` with `sample_inputs` (e.g. float32 (5, 28, 28) raw pixels) as its input
    example, and register it under `registered_name` if given. Returns MLflow's ModelInfo.
    `saved`: the model already written as a .keras file (a classifier's logged model holds a
    copy of it, not a second serialization).

    Classifiers (`class_names` given) go as dlilabs.tracking.serving's PixelClassifier: raw
    pixels, CSV rows or images in, class names out. Others (the line fit) with MLflow's Keras
    3 flavor and a signature inferred from `sample_inputs` and their predictions."""
    import tensorflow as tf
    from mlflow.models import Model, infer_signature

    from dlilabs.tracking.serving import log_pixel_model

    # MLflow checks the input example with its own predict() calls, each of which would draw
    # a Keras progress bar in the stage's output: nothing a user needs.
    # (Non-interactive, Keras sends them to absl's logger instead: quiet that one meanwhile.)
    interactive = keras.config.is_interactive_logging_enabled()
    absl_logger = logging.getLogger("absl")
    absl_level = absl_logger.level
    keras.config.disable_interactive_logging()
    absl_logger.setLevel(logging.WARNING)
    # That check downloads the logged model again, with a progress bar nobody asked for.
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        # MLflow's checks predict on numpy arrays; under op determinism (profile=demo) each
        # Keras predict() makes TensorFlow print an E0000 line about a rewritten map op.
        requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
        with _without_op_determinism(), _requirements_trusted():
            if class_names is not None:
                return log_pixel_model(
                    model,
                    class_names,
                    registered_name,
                    input_example=sample_inputs,
                    saved=saved,
                    # The wrapper's code is dlilabs': serve from its environment
                    # (`mlflow models serve --env-manager local`, README "Serving").
                    pip_requirements=requirements,
                )
            outputs = np.asarray(model(sample_inputs, training=False))
            return Model.log(
                artifact_path=None,
                name="model",
                flavor=_KERAS_FLAVOR,
                model=model,
                signature=infer_signature(sample_inputs, outputs),
                input_example=sample_inputs,
                registered_model_name=registered_name,
                # Listing them skips MLflow's requirement inference, which reloads the model
                # in a subprocess (another TensorFlow import) for a list we already know.
                pip_requirements=requirements,
                # MLflow would reload the saved model and predict the input example through
                # it (another model load and predict, ~0.3 s): the signature above comes from
                # this very model's prediction, and the tests load the logged model.
                validate_serving_input=False,
            )
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar
        absl_logger.setLevel(absl_level)
        if interactive:
            keras.config.enable_interactive_logging()
