"""What a model takes from what users have: the layouts accepted, the input refused and why."""

import numpy as np
import pytest
from PIL import Image

from conftest import make_images
from dlilabs.core.pixels import InputError, as_pixels, decode_image


def test_the_three_layouts_give_the_same_images():
    images = make_images(5, 10)[0]
    expected = images.astype(np.float32)
    for layout in (images, images.reshape(5, 784), images[..., np.newaxis]):
        np.testing.assert_array_equal(as_pixels(layout), expected)
        np.testing.assert_array_equal(as_pixels(layout.astype(np.float64)), expected)
    assert as_pixels(images[0].reshape(784)).shape == (1, 28, 28)  # one row without the n


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (np.zeros((2, 27, 27)), "got shape (2, 27, 27)"),
        (np.zeros((2, 783)), "got shape (2, 783)"),
        (np.zeros((2, 28, 28, 3)), "got shape (2, 28, 28, 3)"),
        (np.zeros((0, 28, 28)), "got shape (0, 28, 28)"),
        (np.full((1, 784), 256.0), "values range from 256 to 256"),
        (np.full((1, 784), -1), "values range from -1 to -1"),
        (np.full((1, 784), np.nan), "NaN or infinity"),
        (np.array([["a"] * 784]), "not numbers"),
        (make_images(2, 10)[0] / 255.0, "look scaled to 0-1 already"),
    ],
)
def test_other_input_says_what_the_model_takes(values, words):
    with pytest.raises(InputError) as raised:
        as_pixels(values, "rows")
    assert str(raised.value).startswith("rows: ") and words in str(raised.value)
    assert "0-255" in str(raised.value) and "(n, 784)" in str(raised.value)


def test_black_and_binary_images_are_raw_pixels_not_scaled_ones():
    # Integers 0 and 1 are valid raw pixels (near-black): only fractions look scaled.
    assert as_pixels(np.zeros((1, 28, 28), np.uint8)).max() == 0
    assert as_pixels(np.eye(28)[np.newaxis]).max() == 1


def test_an_image_file_and_its_bytes_decode_alike(tmp_path):
    pixels = make_images(1, 10)[0][0]
    path = tmp_path / "sign.png"
    Image.fromarray(pixels).resize((56, 56), Image.NEAREST).convert("RGB").save(path)
    from_file = decode_image(path, "sign.png")
    np.testing.assert_array_equal(from_file, decode_image(path.read_bytes(), "sign bytes"))
    np.testing.assert_array_equal(from_file, pixels.astype(np.float32))  # gray, resized back
    with pytest.raises(InputError, match="notes: not a readable image"):
        decode_image(b"hello", "notes")
