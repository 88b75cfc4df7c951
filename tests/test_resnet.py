"""Pin the ResNet-50 architecture of pipeline.resnet: size, depth, shortcuts, shapes, dtypes."""

import itertools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from pipeline.resnet import build_resnet50

# Block input of each stage's convolutional block: the stem's pooling, then the
# output of the previous stage's last identity block.
CONV_BLOCK_INPUT = {2: "pool1", 3: "res2c_out", 4: "res3d_out", 5: "res4f_out"}
STAGE_OUTPUT = {
    2: ("res2c_out", 16, 256),
    3: ("res3d_out", 8, 512),
    4: ("res4f_out", 4, 1024),
    5: ("res5c_out", 2, 2048),
}
BLOCKS = {2: "abc", 3: "abcd", 4: "abcdef", 5: "abc"}


@pytest.fixture(scope="module")
def model():
    return build_resnet50((64, 64, 3), 10)


@pytest.fixture(scope="module")
def bf16_model():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        return build_resnet50((64, 64, 3), 10)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _n_params(weights):
    return int(sum(np.prod(w.shape) for w in weights))


def _producer(tensor):
    """The layer that produced a functional-graph tensor."""
    return tensor._keras_history.operation


def _pixels(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8).astype("float32")


def test_parameter_count_matches_keras_applications(model):
    reference = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    assert _n_params(model.trainable_weights) == _n_params(reference.trainable_weights)
    assert _n_params(model.non_trainable_weights) == _n_params(reference.non_trainable_weights)
    assert model.count_params() == reference.count_params() == 23_608_202


def test_fifty_weighted_layers_on_main_path(model):
    convs = [layer for layer in model.layers if isinstance(layer, layers.Conv2D)]
    dense = [layer for layer in model.layers if isinstance(layer, layers.Dense)]
    shortcuts = [layer for layer in convs if layer.name.endswith("_branch1")]
    assert sorted(s.name for s in shortcuts) == [f"res{s}a_branch1" for s in range(2, 6)]
    assert all(s.kernel_size == (1, 1) for s in shortcuts)
    assert len(convs) - len(shortcuts) + len(dense) == 50

    # Independently of names: the longest input-to-output path crosses 50 weighted layers.
    depth = {}
    for layer in model.layers:  # topologically ordered
        if isinstance(layer, layers.InputLayer):
            depth[layer.name] = 0
            continue
        parents = keras.tree.flatten(layer.input)
        weighted = isinstance(layer, (layers.Conv2D, layers.Dense))
        depth[layer.name] = max(depth[_producer(t).name] for t in parents) + weighted
    assert depth[model.layers[-1].name] == 50


@pytest.mark.parametrize("stage", sorted(CONV_BLOCK_INPUT))
def test_projection_shortcut_takes_block_input(model, stage):
    shortcut = model.get_layer(f"res{stage}a_branch1")
    first_main = model.get_layer(f"res{stage}a_branch2a")
    assert shortcut.input is first_main.input
    assert _producer(shortcut.input).name == CONV_BLOCK_INPUT[stage]
    add_inputs = {_producer(t).name for t in model.get_layer(f"res{stage}a_add").input}
    assert add_inputs == {f"bn{stage}a_branch1", f"bn{stage}a_branch2c"}


@pytest.mark.parametrize("stage", sorted(BLOCKS))
def test_identity_blocks_add_their_input(model, stage):
    blocks = BLOCKS[stage]
    for previous, block in itertools.pairwise(blocks):
        add_inputs = {_producer(t).name for t in model.get_layer(f"res{stage}{block}_add").input}
        assert add_inputs == {f"bn{stage}{block}_branch2c", f"res{stage}{previous}_out"}


@pytest.mark.parametrize("stage", sorted(STAGE_OUTPUT))
def test_stage_output_shapes(model, stage):
    name, side, channels = STAGE_OUTPUT[stage]
    assert tuple(model.get_layer(name).output.shape) == (None, side, side, channels)


def test_rescales_pixels_first(model):
    rescale = model.layers[1]
    assert isinstance(rescale, layers.Rescaling)
    assert rescale.scale == pytest.approx(1 / 255)


def test_float32_output(model):
    assert model.name == "resnet50"
    assert tuple(model.output.shape) == (None, 10)
    assert model.output.dtype == "float32"


def test_float32_output_under_mixed_bfloat16(bf16_model):
    assert keras.mixed_precision.global_policy().name == "float32"  # fixture restored it
    assert bf16_model.get_layer("conv1").compute_dtype == "bfloat16"
    assert tuple(bf16_model.output.shape) == (None, 10)
    assert bf16_model.output.dtype == "float32"
    probs = keras.ops.convert_to_numpy(bf16_model(_pixels(2), training=False))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)


def test_predictions_sum_to_one(model):
    probs = keras.ops.convert_to_numpy(model(_pixels(4), training=False))
    assert probs.shape == (4, 10)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_zero_init_residual_starts_every_block_as_its_shortcut():
    model = build_resnet50((32, 32, 3), 10, zero_init_residual=True)
    last = [layer.name for layer in model.layers if layer.name.startswith("bn") and "branch2c" in layer.name]
    assert len(last) == 16
    assert not any(np.any(model.get_layer(name).gamma.numpy()) for name in last)
    assert np.all(model.get_layer("bn2a_branch1").gamma.numpy() == 1)  # the projections stay
    assert np.all(model.get_layer("bn2a_branch2b").gamma.numpy() == 1)
    # Untrained, each identity block hands its input on unchanged.
    outputs = [model.get_layer(f"res4{block}_out").output for block in BLOCKS[4]]
    maps = keras.Model(model.input, outputs)(_pixels(2, 32), training=False)
    assert np.any(maps[0].numpy())
    for block_input, block_output in itertools.pairwise(maps):
        np.testing.assert_array_equal(block_input.numpy(), block_output.numpy())
    classic = build_resnet50((32, 32, 3), 10)
    assert all(np.all(classic.get_layer(name).gamma.numpy() == 1) for name in last)


@pytest.mark.parametrize("size", [32, 100])
def test_other_input_sizes(size):
    other = build_resnet50((size, size, 3), 10)
    assert tuple(other.get_layer("avg_pool").output.shape) == (None, 1, 1, 2048)
    probs = keras.ops.convert_to_numpy(other(_pixels(1, size), training=False))
    assert probs.shape == (1, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"input_shape": (16, 16, 3)}, "input_shape"),
        ({"input_shape": (64, 64, 1)}, "input_shape"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_rejects_bad_arguments(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        build_resnet50(**kwargs)


@pytest.mark.slow
def test_folded_batch_norm_computes_the_same_function():
    from pipeline.resnet import fold_batch_norm

    rng = np.random.default_rng(0)
    trained = build_resnet50((32, 32, 3), 10)
    for layer in trained.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.1, beta.shape),
                    rng.normal(0, 0.1, mean.shape),
                    rng.uniform(0.5, 2.0, variance.shape),
                ]
            )
    folded = fold_batch_norm(trained)
    pixels = rng.integers(0, 256, (8, 32, 32, 3)).astype("float32")
    expected = trained(pixels, training=False).numpy()
    got = folded(pixels, training=False).numpy()
    assert not any(isinstance(layer, layers.BatchNormalization) for layer in folded.layers)
    assert len(folded.layers) == len(trained.layers) - 53
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert expected.std() > 0.01  # the random statistics really changed the output


@pytest.mark.slow
def test_stage_names_the_stage_of_every_layer():
    from pipeline.resnet import stage

    trained = build_resnet50((32, 32, 3), 10)
    stages = {layer.name: stage(layer.name) for layer in trained.layers}
    assert {name for name, number in stages.items() if number == 1} == {
        "conv1_pad",
        "conv1",
        "bn_conv1",
        "conv1_relu",
        "pool1",
    }
    assert {name for name, number in stages.items() if number == 0} == {
        "pixels",
        "rescale",
        "avg_pool",
        "flatten",
        "fc",
        "probabilities",
    }
    assert stages["res3a_branch1"] == stages["bn3a_branch1"] == stages["res3d_out"] == 3
    assert stages["res5c_add"] == stages["bn5c_branch2c"] == 5
    assert sum(number == 4 for number in stages.values()) > sum(number == 3 for number in stages.values())


def test_folding_refuses_another_model():
    from pipeline.resnet import fold_batch_norm

    other = keras.Sequential([keras.Input((32, 32, 3)), layers.Flatten(), layers.Dense(10)])
    with pytest.raises(ValueError, match="build_resnet50"):
        fold_batch_norm(other)


def _keras_and_fused_norm(weights, momentum=0.9):
    from pipeline.resnet import FusedBatchNormalization

    norms = (
        layers.BatchNormalization(axis=3, momentum=momentum),
        FusedBatchNormalization(axis=3, momentum=momentum),
    )
    for norm in norms:
        norm.build((None, 5, 5, len(weights[0])))
        norm.set_weights(weights)
    return norms


def _through(norm, x, training):
    """The layer's output and the gradients of a random weighting of it by input, gamma and beta."""

    weighting = tf.constant(np.random.default_rng(1).normal(size=x.shape).astype("float32"))
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.cast(norm(tf.cast(x, norm.compute_dtype), training=training), tf.float32)
        loss = tf.reduce_sum(y * weighting)
    gradients = tape.gradient(loss, [x, norm.gamma.value, norm.beta.value])
    return [y.numpy()] + [np.asarray(g, dtype=np.float32) for g in gradients]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_computes_what_keras_computes(policy):
    rng = np.random.default_rng(0)
    channels = 16
    weights = [
        rng.uniform(0.5, 1.5, channels),
        rng.normal(0, 0.5, channels),
        rng.normal(0, 1, channels),
        rng.uniform(0.5, 2.0, channels),
    ]
    x = (rng.normal(size=(8, 5, 5, channels)) * 3 + 1).astype("float32")
    tolerance = 1e-5 if policy == "float32" else 2e-2  # bfloat16 keeps 8 bits of mantissa
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras_norm, fused = _keras_and_fused_norm([w.astype("float32") for w in weights])
        for training in (True, False):
            expected, got = _through(keras_norm, x, training), _through(fused, x, training)
            for want, have in zip(expected, got):
                assert np.abs(have - want).max() <= tolerance * np.abs(want).max()
        # One training step moved the moving statistics (by the same amount).
        for moving in (2, 3):
            np.testing.assert_allclose(
                fused.get_weights()[moving], keras_norm.get_weights()[moving], rtol=1e-5
            )
            assert np.abs(fused.get_weights()[moving] - weights[moving]).max() > 0.05
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_batch_norms_are_fused_and_the_model_reloads(model, tmp_path):
    from pipeline.resnet import FusedBatchNormalization

    norms = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    assert len(norms) == 53 and all(isinstance(norm, FusedBatchNormalization) for norm in norms)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    assert isinstance(loaded.get_layer("bn_conv1"), FusedBatchNormalization)
    pixels = _pixels(2)
    np.testing.assert_allclose(loaded(pixels).numpy(), model(pixels).numpy(), atol=1e-6)
