"""What a lab model takes, from what users have: image files and pixel arrays -> raw pixels.

One code path for `dlilabs.predict` (files) and the served pyfunc model (arrays and base64
image bytes), so both hand the model the same numbers: float32 (n, 28, 28), pixel values
0-255, unscaled (the model's first layer divides by 255). Bad input is an InputError whose
message says, in words, which shapes and ranges the model takes.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np

from dlilabs.ground.errors import UserError

IMAGE_SIZE = (28, 28)
PIXELS = IMAGE_SIZE[0] * IMAGE_SIZE[1]
EXPECTED = (
    "raw pixel values 0-255 (integers or floats, not scaled to 0-1), shaped (n, 28, 28), "
    "(n, 784) as in the Sign Language MNIST CSV rows, or (n, 28, 28, 1); "
    "or PNG/JPEG files, base64-encoded"
)


class InputError(UserError):
    """Input a model cannot take; the message says what it takes instead."""


def decode_image(data: bytes | Path, source: str, expected: str = EXPECTED) -> np.ndarray:
    """An image (file path or its bytes) of any size and mode -> float32 (28, 28) pixels 0-255:
    grayscale, resized with Keras' `load_img` as the course does (nearest neighbour).
    `source` names it in errors, which end with `expected` (what the caller takes)."""
    import keras
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice it: refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            stream = io.BytesIO(data) if isinstance(data, bytes) else data
            image = keras.utils.load_img(stream, color_mode="grayscale", target_size=IMAGE_SIZE)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        size = re.search(r"\(\d+ pixels\)", str(error))
        raise InputError(
            f"{source}: too large to open safely {size.group(0) if size else ''}: over Pillow's "
            f"limit of {Image.MAX_IMAGE_PIXELS} pixels against decompression bombs; "
            "shrink the image first"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(
            f"{source}: not a readable image ({type(error).__name__}); expected {expected}"
        ) from None
    return keras.utils.img_to_array(image)[..., 0].astype(np.float32)


def as_pixels(values, source: str = "input") -> np.ndarray:
    """Pixel values in any accepted layout -> float32 (n, 28, 28) 0-255, checked.

    Accepts (n, 28, 28), (n, 784) and (n, 28, 28, 1) (one image without the n too). Refuses
    anything else, values outside 0-255, and input that looks already scaled to [0, 1]
    (fractions, none above 1): scored as raw pixels it would be almost black, and wrong."""
    array = np.asarray(values)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InputError(f"{source}: got {array.dtype} values, not numbers; expected {EXPECTED}")
    shape = array.shape
    if shape in ((PIXELS,), IMAGE_SIZE, (*IMAGE_SIZE, 1)):
        array = array[np.newaxis]
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 and array.shape[1] == PIXELS:
        array = array.reshape(-1, *IMAGE_SIZE)
    if array.ndim != 3 or array.shape[1:] != IMAGE_SIZE or not len(array):
        raise InputError(f"{source}: got shape {shape}; expected {EXPECTED}")
    pixels = array.astype(np.float32)
    if not np.isfinite(pixels).all():
        raise InputError(f"{source}: values include NaN or infinity; expected {EXPECTED}")
    if pixels.min() < 0 or pixels.max() > 255:
        raise InputError(
            f"{source}: values range from {pixels.min():g} to {pixels.max():g}; expected {EXPECTED}"
        )
    if pixels.max() <= 1 and (pixels != np.round(pixels)).any():
        raise InputError(
            f"{source}: the values look scaled to 0-1 already (fractions, none above 1); "
            f"send the raw pixels 0-255 instead (multiply by 255). Expected {EXPECTED}"
        )
    return pixels


# Keras predict()'s default batch: inputs up to this size are scored in one call.
ONE_BATCH = 32


def score(model, pixels: np.ndarray) -> np.ndarray:
    """float32 pixels (n, 28, 28) 0-255 -> probabilities (n, classes) from a Keras `model`,
    reshaped to its input ((28, 28) or (28, 28, 1)). Models saved before scaling moved into
    the model (no scaling layer) get the pixels divided by 255, as they were trained."""
    from dlilabs.core.models import takes_raw_pixels

    shape = tuple(model.input_shape[1:])
    if int(np.prod(shape)) != PIXELS:
        raise InputError(f"the model takes inputs of shape {shape}, not 28x28 images")
    if not takes_raw_pixels(model):
        pixels = pixels / np.float32(255.0)
    pixels = pixels.reshape(-1, *shape)
    if len(pixels) <= ONE_BATCH:  # a direct call: predict() would first trace a function
        return np.asarray(model(pixels, training=False))  # (~0.1 s) for this one batch
    return np.asarray(model.predict(pixels, verbose=0))
