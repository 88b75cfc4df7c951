"""The served network written as an OpenVINO graph from its Keras layers (pipeline.openvino_graph)."""

import keras
import numpy as np
import openvino
import pytest
from keras import layers

from pipeline import config, fitting, openvino_graph, resnet, serving
from tests.conftest import tiny_classifier


def run(graph: openvino.Model, pixels: np.ndarray, precision: str = "f32") -> np.ndarray:
    compiled = openvino.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    return np.asarray(compiled(pixels.astype(np.float32))[0])


def convolutions(graph: openvino.Model) -> int:
    return sum(op.get_type_name() == "Convolution" for op in graph.get_ops())


def rescaled_then_convolved() -> keras.Model:
    """Raw pixels rescaled, then padded and convolved (as a ResNet-50's stem), convolved again, and
    added to themselves: the rescaling folded into both convolutions and applied for the sum."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((12, 10, 3))
    rescaled = layers.Rescaling(1 / 255)(inputs)
    stem = layers.Conv2D(3, 3)(layers.ZeroPadding2D(1)(rescaled))
    other = layers.Conv2D(3, 2, padding="same")(rescaled)
    return keras.Model(inputs, layers.Add()([stem, rescaled, other]))


def every_written_layer() -> keras.Model:
    """Each layer and setting the writer knows, on odd sizes where the side "same" pads matters."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((11, 9, 3))
    x = layers.Rescaling(1 / 255, offset=-0.5)(inputs)
    x = layers.ZeroPadding2D(((1, 2), (0, 3)))(x)
    x = layers.Conv2D(6, (3, 2), strides=2, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    branch = layers.Conv2D(6, 1, padding="valid", use_bias=False)(x)
    x = layers.ReLU()(layers.Add()([x, branch]))
    x = layers.Conv2D(5, 2, strides=(1, 2), padding="valid")(x)
    x = layers.AveragePooling2D(2, strides=1, padding="same")(x)
    x = layers.Flatten()(x)  # several pixels: the order of its values is Keras' (H, W, C)
    outputs = layers.Activation("softmax")(layers.Dense(7)(x))
    return keras.Model(inputs, outputs)


def test_every_written_layer_computes_what_keras_does():
    model = every_written_layer()
    pixels = np.random.default_rng(0).integers(0, 256, (4, 11, 9, 3)).astype(np.float32)
    graph = openvino_graph.graph(model)
    assert graph is not None
    expected = np.asarray(model(pixels))
    assert expected.std() > 0.01  # answers that tell the orders of values apart
    np.testing.assert_allclose(run(graph, pixels), expected, atol=1e-6)
    np.testing.assert_allclose(run(graph, pixels[:1]), expected[:1], atol=1e-6)  # any batch size


def rescaled_alone() -> keras.Model:
    inputs = keras.Input((4, 4, 3))
    return keras.Model(inputs, layers.Rescaling(0.5)(inputs))


@pytest.mark.parametrize(
    "build, split",
    [(rescaled_then_convolved, 2), (every_written_layer, 0), (rescaled_alone, 0)],
    ids=["folded", "with-offset", "rescaling-alone"],
)
def test_a_graph_for_bfloat16_computes_what_keras_does(build, split):
    model = build()
    pixels = np.random.default_rng(1).integers(0, 256, (3, *model.input_shape[1:])).astype(np.float32)
    written = openvino_graph.graph(model, bfloat16=True)
    expected = np.asarray(model(pixels))
    np.testing.assert_allclose(run(written, pixels), expected, atol=1e-5 * np.abs(expected).max())
    # Each convolution of the rescaled pixels is written as two (`split` more); no other one is.
    assert convolutions(written) == convolutions(openvino_graph.graph(model)) + split


@pytest.mark.skipif(not fitting.bf16_is_native(), reason="this processor computes no bfloat16")
def test_in_bfloat16_a_split_first_convolution_computes_as_in_float32():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((16, 16, 3))
    padded = layers.ZeroPadding2D(3)(layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, layers.Conv2D(8, 7, strides=2)(padded))
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel * 30, bias + 3])  # weights of a trained stem's size
    pixels = np.random.default_rng(2).integers(0, 256, (8, 16, 16, 3)).astype(np.float32)
    expected = np.asarray(model(pixels))

    def largest_relative_error(bfloat16):
        answers = run(openvino_graph.graph(model, bfloat16=bfloat16), pixels, precision="bf16")
        return np.abs(answers - expected).max() / np.abs(expected).max()

    assert largest_relative_error(bfloat16=False) > 1e-3  # the kernel rounded to bfloat16
    assert largest_relative_error(bfloat16=True) < 1e-4


@pytest.mark.slow
def test_a_folded_resnet50_and_its_cuts_compute_what_the_converted_graphs_do():
    keras.utils.set_random_seed(1)
    model = resnet.build_resnet50((32, 32, 3), config.NUM_CLASSES)
    network = serving.inference_model(model)
    rng = np.random.default_rng(0)
    for part, _ in [(network, "f32"), *serving.precision_parts(network, (3, 4, 5))]:
        pixels = rng.uniform(0, 255 if part is network else 1, (3, *part.input_shape[1:]))
        written = openvino_graph.graph(part)
        assert written is not None, part.name
        got, expected = run(written, pixels), run(serving.converted(part), pixels)
        assert got.shape == expected.shape == (3, *part.output_shape[1:])
        np.testing.assert_allclose(got, expected, atol=1e-6 * np.abs(expected).max(), err_msg=part.name)


@pytest.mark.parametrize(
    "layer",
    [
        layers.GlobalAveragePooling2D(),
        layers.Conv2D(2, 3, dilation_rate=2),
        layers.DepthwiseConv2D(3),
        layers.ReLU(max_value=6.0),
        layers.Activation("tanh"),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_a_layer_not_written_leaves_the_model_to_the_converter(layer):
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, layer(layers.Conv2D(3, 1)(inputs)))
    assert openvino_graph.graph(model) is None


def test_a_layer_computing_in_another_precision_is_not_written():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, layers.Conv2D(3, 1, dtype="mixed_bfloat16")(inputs))
    assert openvino_graph.graph(model) is None
    assert openvino_graph.graph(keras.Model(inputs, layers.Conv2D(3, 1)(inputs))) is not None


def test_a_model_with_a_layer_not_written_is_served_converted():
    model = tiny_classifier()
    assert openvino_graph.graph(model) is None  # global pooling
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(serving.ServedNetwork(model)(pixels), np.asarray(model(pixels)), atol=1e-6)
