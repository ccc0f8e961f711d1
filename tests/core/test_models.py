"""Each lab's model builds from its config with the architecture LABS.md gives."""

import keras
import numpy as np
import pytest

from conftest import make_images
from dlilabs.core.models import SCALE_LAYER, build_model, takes_raw_pixels
from dlilabs.ground.config import compose


def build(lab):
    cfg = compose([f"experiment={lab}"])
    return build_model(cfg.model, (28, 28), cfg.dataset.get("num_classes", 1))


def test_mlp_is_784_512_512_softmax():
    model = build("mnist_mlp")
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [512, 512, 10]
    assert dense[-1].activation.__name__ == "softmax"
    # 784*512+512 + 512*512+512 + 512*10+10
    assert model.count_params() == 669_706


def test_asl_models_end_in_24_classes():
    assert build("asl_mlp").output_shape == (None, 24)
    assert build("asl_cnn").output_shape == (None, 24)


def test_cnn_layers_follow_the_lab():
    model = build("asl_cnn")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == [
        "Normalization",  # scale_pixels: raw 0-255 in
        "Reshape",
        "Conv2D",
        "BatchNormalization",
        "MaxPooling2D",
        "Conv2D",
        "Dropout",
        "BatchNormalization",
        "MaxPooling2D",
        "Conv2D",
        "BatchNormalization",
        "MaxPooling2D",
        "Flatten",
        "Dense",
        "Dropout",
        "Dense",
    ]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [75, 50, 25]
    assert all(c.padding == "same" and c.kernel_size == (3, 3) for c in convs)
    dropouts = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert dropouts == [0.2, 0.3]
    # Three stride-2 'same' pools: 28 -> 14 -> 7 -> 4, 25 channels.
    assert model.get_layer(index=12).output.shape[1:] == (4 * 4 * 25,)


def test_dropout_override_reaches_the_model():
    cfg = compose(["experiment=asl_cnn", "model.dropout=0.1"])
    model = build_model(cfg.model, (28, 28), 24)
    assert [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)][
        -1
    ] == pytest.approx(0.1)


def test_line_model_is_one_unit():
    model = build("line_fit")
    assert model.count_params() == 2 and model.output_shape == (None, 1)


def test_unknown_model_name_is_a_clear_error():
    cfg = compose(["model.name=transformer"])
    with pytest.raises(ValueError, match="transformer"):
        build_model(cfg.model)


@pytest.mark.parametrize("lab", ["asl_mlp", "asl_cnn"])
def test_scaling_in_the_model_gives_the_old_path_s_predictions(lab):
    # Before: the pipeline fed x / 255 to a model without the scaling layer. Now: raw pixels
    # to the model, whose first layer divides. Same weights -> the first layer sees the same
    # float32 numbers, and the predictions are the same.
    model = build(lab)
    assert takes_raw_pixels(model) and model.layers[0].name == SCALE_LAYER
    old = keras.Sequential([keras.Input((28, 28)), *model.layers[1:]])  # shares the weights
    assert not takes_raw_pixels(old)
    images = make_images(64, 24)[0]
    scaled = images.astype(np.float32) / 255.0  # what make_dataset computed before
    np.testing.assert_array_equal(np.asarray(model.layers[0](images.astype(np.float32))), scaled)
    new_predictions = model.predict(images.astype(np.float32), verbose=0)
    np.testing.assert_array_equal(new_predictions, old.predict(scaled, verbose=0))
    np.testing.assert_array_equal(model.predict(images, verbose=0), new_predictions)  # uint8 too
