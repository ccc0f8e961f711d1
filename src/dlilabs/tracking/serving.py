"""The registered image models as MLflow pyfunc models that take what users have.

`mlflow models serve -m models:/<lab>/<version>` and `mlflow.pyfunc.load_model` run
`PixelClassifier`: the lab's Keras model (an artifact, `model.keras`, whose first layer scales
raw pixels) behind a wrapper that accepts

    pixels     0-255, shaped (n, 28, 28), (n, 784) (CSV rows) or (n, 28, 28, 1)
    a frame    with the Kaggle CSV columns pixel1..pixel784 (`label` ignored)
    images     PNG/JPEG files, base64-encoded (decoded as `dlilabs.predict` decodes files)

and answers one row per image: `class` (the class name: ASL letters, MNIST digits), its
`probability`, then one column per class name. Everything else, including input already
scaled to 0-1, is refused with a message (HTTP 400) that says what the model takes.

The signature says (-1, 28, 28) float32 `pixels`, the canonical layout. MLflow enforces a
tensor signature strictly (the exact rank, before the wrapper runs), which would refuse the
other layouts with numpy's repr of the array as the message: the signature is marked as one
the model checks itself (as MLflow does for models whose signature comes from type hints),
and `as_pixels` checks it, with a message in words.
"""

from __future__ import annotations

import base64
import binascii
import logging
import tempfile
import types
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from dlilabs.core.pixels import EXPECTED, InputError, as_pixels, decode_image, score

PIXELS_INPUT, IMAGES_INPUT = "pixels", "images"
KERAS_ARTIFACT = "keras_model"
INPUT_DESCRIPTION = (
    "raw pixels 0-255: float32 (-1, 28, 28) `pixels`; also (n, 784) CSV rows, (n, 28, 28, 1) "
    "and base64 PNG/JPEG `images`"
)


class PixelClassifier(mlflow.pyfunc.PythonModel):
    """A lab's Keras classifier for MLflow: inputs as the module doc lists, outputs a frame
    (`class`, `probability`, one probability column per class name)."""

    # No type hints to validate against: `to_pixels` checks the input (MLflow would otherwise
    # warn at import that the predict method has none).
    _skip_type_hint_validation = True

    def __init__(self, class_names: list[str]):
        self.class_names = [str(name) for name in class_names]
        self.model = None

    def load_context(self, context) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], safe_mode=True)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        try:
            pixels = to_pixels(model_input)
        except InputError as error:
            # MLflow's server answers an MlflowException with INVALID_PARAMETER_VALUE as 400.
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
        return predictions_frame(score(self.model, pixels), self.class_names)


def predictions_frame(probabilities: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Probabilities (n, classes) -> frame: `class` name, its `probability`, one column each."""
    best = probabilities.argmax(axis=1)
    frame = pd.DataFrame(
        {
            "class": [class_names[i] for i in best],
            "probability": probabilities[np.arange(len(best)), best].astype(np.float64),
        }
    )
    columns = pd.DataFrame(probabilities.astype(np.float64), columns=class_names)
    return pd.concat([frame, columns], axis=1)


def decode_images(encoded, source: str = IMAGES_INPUT) -> np.ndarray:
    """Base64 strings (or bytes) of PNG/JPEG files -> float32 (n, 28, 28) pixels 0-255."""
    items = np.atleast_1d(np.asarray(encoded, dtype=object)).ravel().tolist()
    if not items:
        raise InputError(f"{source}: no images; expected {EXPECTED}")
    decoded = []
    for number, item in enumerate(items, start=1):
        where = f"{source} item {number}"
        try:
            data = item if isinstance(item, bytes) else base64.b64decode(str(item), validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{where}: not base64; expected {EXPECTED}") from None
        decoded.append(decode_image(data, where))
    return np.stack(decoded)


def to_pixels(model_input) -> np.ndarray:
    """What the server or a pyfunc caller passes -> float32 (n, 28, 28) pixels 0-255."""
    from dlilabs.core.rawdata import pixel_names

    if isinstance(model_input, pd.DataFrame):
        columns = pixel_names()
        if set(columns) <= set(model_input.columns):
            return as_pixels(model_input[columns].to_numpy(), "CSV rows")
        if list(model_input.columns) == [IMAGES_INPUT]:
            return decode_images(model_input[IMAGES_INPUT].to_numpy())
        named = ", ".join(map(str, model_input.columns[:5]))
        raise InputError(
            f"a table with columns {named}{'...' if model_input.shape[1] > 5 else ''}: expected "
            f"pixel1..pixel784 (the Kaggle CSV layout) or one column `{IMAGES_INPUT}`; "
            f"the model takes {EXPECTED}"
        )
    if isinstance(model_input, dict):
        keys = sorted(map(str, model_input))
        if keys == [PIXELS_INPUT]:
            return as_pixels(model_input[PIXELS_INPUT], PIXELS_INPUT)
        if keys == [IMAGES_INPUT]:
            return decode_images(model_input[IMAGES_INPUT])
        raise InputError(
            f"inputs named {keys}: expected one of `{PIXELS_INPUT}` (numbers) or "
            f"`{IMAGES_INPUT}` (base64 files); the model takes {EXPECTED}"
        )
    return as_pixels(model_input)


def signature(class_names: list[str]) -> ModelSignature:
    """(-1, 28, 28) float32 raw pixels in; class name, its probability and each class's out.
    Marked as checked by the model (see the module doc) so the other layouts reach it."""
    outputs = [ColSpec("string", "class"), ColSpec("double", "probability")]
    outputs += [ColSpec("double", str(name)) for name in class_names]
    result = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28), PIXELS_INPUT)]),
        outputs=Schema(outputs),
    )
    result._is_signature_from_type_hint = True
    return result


def _save_pyfunc_model(path, validate_serving_input=True, **kwargs):
    # `validate_serving_input` is Model.log's own option, which it hands on to the flavor.
    return mlflow.pyfunc.save_model(path=path, **kwargs)


# mlflow.pyfunc for Model.log, which then takes `validate_serving_input` (log_model does not).
_PYFUNC_FLAVOR = types.SimpleNamespace(__name__="mlflow.pyfunc", save_model=_save_pyfunc_model)


def check_example(model, class_names: list[str], example: np.ndarray) -> pd.DataFrame:
    """Answer `example` (raw pixels) through PixelClassifier's own predict on `model`, as a
    served version would; raise if the frame does not have the signature's columns."""
    wrapper = PixelClassifier(class_names)
    wrapper.model = model
    frame = wrapper.predict(None, example)
    expected = signature(class_names).outputs.input_names()
    if list(frame.columns) != expected or len(frame) != len(example):
        raise ValueError(f"PixelClassifier answered columns {list(frame.columns)}, not {expected}")
    return frame


def log_pixel_model(
    model, class_names: list[str], registered_name: str | None, saved=None, **kwargs
):
    """Log `model` (raw-pixel Keras classifier) as a PixelClassifier named "model" on the
    active run, register it as `registered_name` if given; `saved`: `model` already written
    to a .keras file (else it is saved here); `kwargs` go to Model.log (pip_requirements,
    input_example). Returns MLflow's ModelInfo.

    The input example goes through the wrapper's predict on this very model first
    (`check_example`); MLflow's own check, which loads the logged copy back (a Keras model
    load, ~0.15 s a run) to do the same and only warns when it fails, is off."""
    if kwargs.get("input_example") is not None:
        check_example(model, class_names, kwargs["input_example"])
    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_logger.level
    # Its notes on every log would fill each train stage's output: that the wrapper is
    # cloudpickled (it is our own class, loaded by reference from dlilabs).
    pyfunc_logger.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.keras"
            if saved is None:
                model.save(path)
            else:  # MLflow copies the file in, as artifacts/<its name>: model.keras
                path = Path(saved)
            python_model = PixelClassifier(class_names)
            return Model.log(
                artifact_path=None,
                name="model",
                flavor=_PYFUNC_FLAVOR,
                flavor_name="pyfunc.CustomPythonModel",  # what mlflow.pyfunc.log_model records
                python_model=python_model,
                artifacts={KERAS_ARTIFACT: str(path)},
                signature=signature(class_names),
                registered_model_name=registered_name,
                metadata={"input": INPUT_DESCRIPTION, "class_names": list(map(str, class_names))},
                validate_serving_input=False,
                **kwargs,
            )
    finally:
        pyfunc_logger.setLevel(level)


def is_pixel_model(model_uri: str) -> bool:
    """True for versions logged as PixelClassifier (raw pixels), False for the older Keras
    flavor ones (scaled input); `model_uri` as mlflow.models.get_model_info takes it."""
    return "keras" not in mlflow.models.get_model_info(model_uri).flavors


def load_pixel_model(model_uri: str):
    """(Keras model, class names) of a PixelClassifier version."""
    wrapper = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    return wrapper.model, wrapper.class_names


# The model card's section on input, from the run: new versions carry INPUT_TAG (set by
# labrun.finish_run); older ones (no tag) were logged with the Keras flavor, scaled input.
# The run tag the train stage sets on models that scale their own input (raw-pixel serving).
INPUT_TAG = "model.input"


def raw_input(run) -> bool:
    """True when the run's model takes raw pixels; older versions (no tag) take [0, 1]."""
    return run.data.tags.get(INPUT_TAG, "").startswith("raw")


def input_section(name: str, version: str, run) -> list[str]:
    """What the version takes and answers, and how to serve it (image labs only)."""
    classes = run.data.params.get("dataset.class_names")
    if not classes:
        return []
    if raw_input(run):
        takes = (
            f"{run.data.tags[INPUT_TAG]}; input already scaled to 0-1 is refused "
            "(the served model is a dlilabs PixelClassifier)"
        )
    else:
        takes = (
            "pixels scaled to [0, 1]: float32 (n, 28, 28) (a version from before raw-pixel "
            "serving, logged with the Keras flavor); divide raw pixels by 255 first "
            "(`dlilabs.predict` does)"
        )
    return [
        "## Input and classes",
        f"- Takes: {takes}.",
        f"- Answers class names {classes.strip('[]').replace(chr(39), '')}.",
        f"- Serve: `mlflow models serve -m models:/{name}/{version} --env-manager local` "
        '(README "Serving").',
        "",
    ]


def note_older_inputs(client, name: str, limit: int = 5000) -> list[str]:
    """Add the "Input and classes" section (and `input: scaled 0-1` on the summary line) to
    the cards of `name`'s versions written before it existed, in the registry description
    (kept under `limit` characters). Returns the versions changed. Called whenever a new
    version's card is written."""
    from dlilabs.tracking.store import retry_if_locked

    changed = []
    quoted = name.replace("'", "")
    for found in retry_if_locked(client.search_model_versions, f"name = '{quoted}'"):
        text = found.description or ""
        if not text.startswith("# Model card") or "## Input and classes" in text:
            continue
        run = retry_if_locked(client.get_run, found.run_id) if found.run_id else None
        section = input_section(name, str(found.version), run) if run else []
        if not section or "\n## Data\n" not in text:
            continue
        head, summary, rest = text.split("\n", 2)
        if summary.startswith("> ") and "input:" not in summary:
            summary += " · input: raw pixels 0-255" if raw_input(run) else " · input: scaled 0-1"
        rest = rest.replace("\n## Data\n", "\n" + "\n".join(section) + "\n## Data\n", 1)
        description = "\n".join([head, summary, rest])
        if len(description) > limit:
            note = f"\n… (the whole card: runs:/{found.run_id}/model_card.md)\n"
            description = description[: limit - len(note)] + note
        retry_if_locked(
            client.update_model_version, name, str(found.version), description=description
        )
        changed.append(str(found.version))
    return changed
