"""Each lab's model builds from its config with the architecture LABS.md gives."""

import keras
import pytest

from dlilabs.core.models import build_model
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
    assert model.get_layer(index=11).output.shape[1:] == (4 * 4 * 25,)


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
